"""`medmllm ask VOLUME QUESTION`: one question, answer streamed to the terminal, results in --out.

In-process with an engine by default (`--engine`, builtin unless told), or through a running
server (`--server URL --token T`), which writes the same files and is downloaded from.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from medmllm.cli import UsageError
from medmllm.cli._terminal import printable
from medmllm.cli.serve import TOKEN_ENV, add_engine_arguments, engine_from_args
from medmllm.protocol import ORIENTATIONS, roi_from_bounds


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ask", help="ask one question about a volume file; writes Slicer-loadable results"
    )
    p.add_argument("volume", type=Path, help="NRRD / NIfTI / MHA file or DICOM folder")
    p.add_argument("question")
    add_engine_arguments(p)
    p.add_argument("--server", help="ask a running server at this URL instead of an in-process engine")
    p.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV), help=f"token of that server (default: ${TOKEN_ENV})"
    )
    p.add_argument(
        "--slice", help="the view: AXIS:INDEX, AXIS one of axial/coronal/sagittal (e.g. axial:120)"
    )
    p.add_argument("--roi", help="region in RAS mm: R1,A1,S1,R2,A2,S2 (two opposite corners)")
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the results (default ./out)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=run)


def parse_slice(text: Optional[str], volume) -> Tuple[str, Optional[int]]:
    """`axial:120` -> ("axial", 120), checking the index against the volume's slice axis."""
    if not text:
        return "axial", None
    axis, _, index = text.partition(":")
    axis = axis.strip().lower()
    if axis not in ORIENTATIONS:
        raise UsageError(f"--slice axis must be one of {', '.join(ORIENTATIONS)}; got {axis!r}")
    if not index:
        return axis, None
    if not index.strip().isdigit():
        raise UsageError(f"--slice index must be a whole number >= 0; got {index!r}")
    from medmllm.geometry.transforms import nearest_axis
    from medmllm.preview import NORMALS

    count = volume.shape[2 - nearest_axis(volume.ijk_to_ras, NORMALS[axis])]
    if int(index) >= count:
        raise UsageError(
            f"--slice {axis} index {index} is out of range: this volume has {count} {axis} slices "
            f"(0..{count - 1})"
        )
    return axis, int(index)


def parse_roi(text: Optional[str]):
    if not text:
        return None
    try:
        return roi_from_bounds([float(v) for v in text.split(",")])
    except ValueError as exc:
        raise UsageError(f"--roi: {exc}") from None


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise UsageError("--temperature must be between 0 and 2")
    if not args.question.strip():
        raise UsageError("the question is empty")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    from medmllm.geometry.volume import Volume, VolumeError

    _check_args(args)
    if args.volume.suffix.lower() == ".npy":
        return _ask_demo_npy(args)
    try:
        volume = Volume.from_file(args.volume)
    except VolumeError as exc:
        raise UsageError(str(exc)) from None
    view = parse_slice(args.slice, volume)
    roi = parse_roi(args.roi)
    args.out.mkdir(parents=True, exist_ok=True)
    ask = _ask_server if args.server else _ask_engine
    ok = ask(args, volume, view, roi)
    print(f"\nresults in {args.out}/", file=sys.stderr)
    return 0 if ok else 1


def _ask_demo_npy(args: argparse.Namespace) -> int:
    """A model's own demo input (M3D-LaMed's (1, 32, 256, 256) array in [0, 1]), read by the engine
    that declares `read_demo_input`, in process."""
    from medmllm.engines.base import EngineError
    from medmllm.engines.registry import engine_class, engine_names

    try:
        read = None if args.server else engine_class(args.engine).read_demo_input
    except EngineError as exc:
        raise UsageError(str(exc)) from None
    if read is None:
        readers = [n for n in engine_names() if engine_class(n).read_demo_input is not None]
        engines = " or ".join(f"--engine {n}" for n in readers)
        raise UsageError(f"a .npy input is a model's own demo format: use it with {engines} (in process)")
    try:
        volume, grid = read(args.volume)
    except (EngineError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    engine = engine_from_args(args)
    engine.prepare(volume, volume.sha256(), grid=grid)
    args.out.mkdir(parents=True, exist_ok=True)
    ok = _ask_engine(args, volume, ("axial", None), parse_roi(args.roi), engine=engine)
    print(f"\nresults in {args.out}/", file=sys.stderr)
    return 0 if ok else 1


def _ask_engine(args: argparse.Namespace, volume, view: Tuple[str, Optional[int]], roi, engine=None) -> bool:
    """`engine` given means it is already prepared for this volume."""
    from medmllm.engines.base import ChatContext, ChatTurn, ViewState
    from medmllm.results import ResultWriter, answer_events, roi_to_ijk

    prepared = engine is not None
    engine = engine or engine_from_args(args)
    try:
        box = roi_to_ijk(roi, volume) if roi else None
    except ValueError as exc:
        raise UsageError(f"--roi: {exc}") from None
    volume_id = volume.sha256()
    if not prepared:
        _prepare(engine, volume, volume_id)
    messages = [ChatTurn("user", args.question)]
    ctx = ChatContext(
        volume, volume_id, messages, ViewState(*view), box, args.max_new_tokens, args.temperature
    )
    writer = ResultWriter(args.out, volume, volume_id, messages)
    cancel = threading.Event()
    try:
        ok = _print_events(answer_events(engine, ctx, writer, cancel, prepare=not prepared))
    finally:
        cancel.set()
        engine.close()
    writer.write_files()
    return ok


def _prepare(engine, volume, volume_id: str) -> None:
    """Set-up problems (no model server, wrong model name, bad checkpoint) are the user's to fix:
    one line and exit status 2, before any answer starts."""
    from medmllm.engines.base import EngineError

    try:
        engine.prepare(volume, volume_id)
    except EngineError as exc:
        engine.close()
        raise UsageError(str(exc)) from None


def _ask_server(args: argparse.Namespace, volume, view: Tuple[str, Optional[int]], roi) -> bool:
    from medmllm.client import BackendError, MedMLLMClient

    client = MedMLLMClient(args.server, token=args.token)
    try:
        client.health()
        volume_id = client.ensure_volume(volume.voxels, volume.ijk_to_ras)
        events = client.chat(
            volume_id,
            args.question,
            view={"orientation": view[0], "index": view[1]},
            roi=roi,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
        )
        done: Dict[str, Any] = {}
        ok = _print_events(events, done)
        if done.get("result_id"):
            client.download_results(done["result_id"], args.out)
    except BackendError as exc:
        raise UsageError(str(exc)) from None
    return ok


def _print_events(events: Iterable[Dict[str, Any]], done: Optional[Dict[str, Any]] = None) -> bool:
    """Stream the answer to stdout, findings and problems as lines; False if an error came.
    Model text is printed through `printable` (no terminal escapes); the files keep it as is."""
    ok = True
    for event in events:
        kind = event["type"]
        if kind == "token":
            print(printable(event["text"]), end="", flush=True)
        elif kind == "box":
            roi = event["roi"]
            where = f"centre {_mm(roi['center'])} size {_mm(roi['size'])}"
            print(printable(f"\n[box] {event['label']}: {where} -> {event['file']}"))
        elif kind == "mask":
            label = printable(event["label"])
            print(f"\n[mask] {label}: {event['volume_ml']:.1f} mL ({event['voxel_count']} voxels)")
        elif kind == "report":
            print("\n" + printable(event["markdown"]))
        elif kind == "warning":
            print(f"\nwarning: {printable(event['message'])}", file=sys.stderr)
        elif kind == "error":
            ok = False
            print(f"\nerror: {printable(event['message'])}", file=sys.stderr)
        elif kind == "done":
            t = event["timings"]
            print(
                f"\n[done in {t['total_s']:.2f} s, first event after {t['first_event_s']:.2f} s]",
                file=sys.stderr,
            )
            if done is not None:
                done.update(event)
    return ok


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ") mm"
