"""`medmllm demo`: the whole job on real scans, offline after the first run.

A real contrast chest CT, then a real abdominal CT (both from the TotalSegmentator 2.18.0 sdist),
then a real head MRI (MNI152 template, read out of the nilearn wheel) go through a local model
server (HTTP upload by content hash, streamed answer, result download) with the built-in engine;
answers, ROI markups, segmentations and preview pictures land in --out, ready to drag into
3D Slicer. Sources, licences and attribution of the data are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from medmllm.cli import UsageError

EventSink = Callable[[Dict[str, Any]], None]

CHEST_QUESTIONS = (
    "report",
    "where is the trachea?",
    "show me the lungs",
    "how big is the left lung?",
    "segment the bones",
    "显示右肺",
    "where is the liver?",
)
ABDOMEN_QUESTIONS = ("show me the lungs", "where is the trachea?", "segment the bones", "报告")
MRI_QUESTIONS = ("report", "where is the brain?", "how big is the brain?", "显示脑")
REAL_CT_CASES = (
    ("chest-ct", "ct-chest", "Chest CT (real, contrast)", CHEST_QUESTIONS),
    ("abdomen-ct", "ct-abdomen", "Abdominal CT (real)", ABDOMEN_QUESTIONS),
)
SERVER_START_S = 30.0


@dataclass(frozen=True)
class DemoCase:
    name: str  # folder name under --out
    title: str
    volume: Any  # medmllm.geometry.volume.Volume
    source: str  # where the data comes from and under which licence
    questions: Tuple[str, ...]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="ask the built-in engine about sample volumes; writes Slicer files"
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="results folder (default ./demo-output)"
    )
    p.add_argument(
        "--in-process", action="store_true", help="call the engine directly instead of a local server"
    )
    p.add_argument(
        "--no-download", action="store_true", help="use only cached samples (skip what is missing)"
    )
    p.add_argument(
        "--anatomy",
        choices=("off", "auto"),
        default="off",
        help="off (default): the built-in classical tools answer, as the demo teaches; auto: "
        "TotalSegmentator answers the structures it knows where it and its weights are installed",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    cases = demo_cases(console, download=not args.no_download)
    run_demo(cases, args.out, via_server=not args.in_process, console=console, anatomy=args.anatomy)
    print_slicer_help(console, args.out, cases)
    return 0


def demo_cases(console: Any, download: bool = True) -> List[DemoCase]:
    """The real chest CT, the real abdominal CT, then the MNI152 MRI (each when it can be fetched or
    is cached; what is missing is said and skipped)."""
    from medmllm import samples
    from medmllm.geometry.volume import Volume

    cases = [
        c for c in (real_ct_case(*spec, console=console, download=download) for spec in REAL_CT_CASES) if c
    ]
    get = samples.fetch_asset if download else samples.find_asset
    try:
        for weights in (samples.DEEPBET_MODEL, samples.DEEPBET_BBOX):
            if get(weights) is None:
                raise samples.SampleError("deepbet weights are not cached")
        console.print(
            f"[green]brain network:[/] deepbet weights ({samples.licence_of(samples.DEEPBET_MODEL)})"
        )
    except samples.SampleError as exc:
        console.print(f"[yellow]deepbet unavailable ({exc}); the brain mask uses the classical method[/]")
    try:
        path = get(samples.MNI_T1)
        if path is None:
            raise samples.SampleError("not cached")
        source = f"{samples.MNI_T1.description}; {samples.licence_of(samples.MNI_T1)}"
        cases.append(DemoCase("mri-mni152", "Head MRI (real)", Volume.from_file(path), source, MRI_QUESTIONS))
    except samples.SampleError as exc:
        console.print(f"[yellow]MNI152 MRI skipped: {exc}[/]")
    return cases


def real_ct_case(
    scan_name: str, folder: str, title: str, questions: Tuple[str, ...], console: Any, download: bool = True
) -> Optional[DemoCase]:
    """A real CT of medmllm.samples as a demo case, with its description, licence and attribution."""
    from medmllm import samples

    scan = samples.real_scan(scan_name)
    try:
        if download:
            samples.fetch_sdist(scan.sdist)
        volume = samples.load_real_scan(scan)
    except samples.SampleError as exc:
        console.print(f"[yellow]{title} skipped: {exc}[/]")
        return None
    return DemoCase(folder, title, volume, f"{scan.description}; {scan.attribution}", questions)


def run_demo(
    cases: Sequence[DemoCase], out_dir: Path, via_server: bool, console: Any, anatomy: str = "off"
) -> List[Path]:
    """Ask every case's questions; returns the result folders, one per question."""
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.registry import create_engine

    engine = create_engine("builtin", EngineOptions(extra={"anatomy": anatomy}))
    folders: List[Path] = []
    with tempfile.TemporaryDirectory(prefix="medmllm-demo-store-") as store:
        asker = _ServerAsker(engine, Path(store)) if via_server else _LocalAsker(engine)
        with asker:
            console.print(f"[bold]engine:[/] builtin, {asker.describe()}")
            for case in cases:
                folders += _run_case(case, Path(out_dir), asker, console)
    engine.close()
    return folders


def _run_case(case: DemoCase, out_dir: Path, asker: Any, console: Any) -> List[Path]:
    case_dir = out_dir / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    _write_volume(case.volume, case_dir / "volume.nrrd")
    console.rule(f"[bold]{case.title}")
    console.print(f"[dim]data: {case.source}[/]")
    folders = []
    for n, question in enumerate(case.questions, 1):
        folder = case_dir / f"q{n}-{_slug(question)}"
        folder.mkdir(parents=True, exist_ok=True)
        console.print(f"\n[bold cyan][{n}/{len(case.questions)}] Q:[/] {question}")
        _ask_with_progress(asker, case.volume, question, folder, console)
        folders.append(folder)
    return folders


def _ask_with_progress(asker: Any, volume: Any, question: str, folder: Path, console: Any) -> None:
    from rich.markdown import Markdown

    text: List[str] = []
    lines: List[str] = []
    reports: List[str] = []
    with console.status("asking...") as status:

        def on_event(event: Dict[str, Any]) -> None:
            kind = event["type"]
            if kind == "token":
                text.append(event["text"])
                status.update(f"answering: ...{''.join(text)[-70:]}")
            elif kind == "box":
                lines.append(f"[box] {event['label']} -> {event['file']}")
            elif kind == "mask":
                lines.append(f"[mask] {event['label']}: {event['volume_ml']:.1f} mL -> segmentation.seg.nrrd")
            elif kind == "report":
                reports.append(event["markdown"])
            elif kind in ("warning", "error"):
                lines.append(f"[{kind}] {event['message']}")
            elif kind == "done":
                lines.append(f"done in {event['timings']['total_s']:.2f} s")

        asker.ask(volume, question, folder, on_event)
    console.print(f"[bold green]A:[/] {''.join(text).strip()}")
    for report in reports:
        console.print(Markdown(report))
    for line in lines:
        console.print(f"  {line}", markup=False, style="dim")


class _LocalAsker:
    """The engine called in this process through the same result writer the server uses."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __enter__(self) -> _LocalAsker:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def describe(self) -> str:
        return "in-process (no server)"

    def ask(self, volume: Any, question: str, folder: Path, on_event: EventSink) -> None:
        from medmllm.engines.base import ChatContext, ChatTurn
        from medmllm.results import ResultWriter, answer_events

        volume_id = volume.sha256()
        messages = [ChatTurn("user", question)]
        writer = ResultWriter(folder, volume, volume_id, messages)
        for event in answer_events(
            self.engine, ChatContext(volume, volume_id, messages), writer, threading.Event()
        ):
            on_event(event)
        writer.write_files()


class _ServerAsker:
    """A real model server on a free loopback port (token required), driven by the HTTP client."""

    def __init__(self, engine: Any, store: Path) -> None:
        import uvicorn

        from medmllm.client import MedMLLMClient
        from medmllm.server.app import create_app

        token = secrets.token_urlsafe(16)
        self.port = _free_port()
        app = create_app(engine, store, token=token)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="medmllm-demo-server", daemon=True)
        self.client = MedMLLMClient(f"http://127.0.0.1:{self.port}", token=token)

    def __enter__(self) -> _ServerAsker:
        self.thread.start()
        deadline = time.monotonic() + SERVER_START_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UsageError(f"the local demo server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        self.client.health()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def describe(self) -> str:
        return f"local server http://127.0.0.1:{self.port} (HTTP client, token auth)"

    def ask(self, volume: Any, question: str, folder: Path, on_event: EventSink) -> None:
        volume_id = self.client.ensure_volume(volume.voxels, volume.ijk_to_ras)
        done: Dict[str, Any] = {}
        for event in self.client.chat(volume_id, question):
            on_event(event)
            if event["type"] == "done":
                done = event
        if done.get("result_id"):
            self.client.download_results(done["result_id"], folder)


def print_slicer_help(console: Any, out_dir: Path, cases: Sequence[DemoCase]) -> None:
    console.rule("[bold]Open the results in 3D Slicer")
    console.print(
        f"Results are in {out_dir.resolve()}/ : one folder per volume, one sub-folder per question."
    )
    for case in cases:
        console.print(f"  {out_dir / case.name}/volume.nrrd  ({case.title})")
    console.print(
        "In Slicer, drag and drop onto the window (or File > Add Data): first volume.nrrd, then a question's "
        "segmentation.seg.nrrd (masks, as segments) and its *.mrk.json files (boxes, as ROI nodes). "
        "answer.md holds the text and any report, preview.png a quick look without Slicer."
    )


def _write_volume(volume: Any, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=True)


def _slug(text: str) -> str:
    """Folder-safe name for a question; non-ASCII questions get a short hash instead."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
    return slug or hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
