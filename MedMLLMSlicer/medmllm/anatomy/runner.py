"""Run TotalSegmentator once per volume and keep its multilabel answer for every later question.

TotalSegmentator runs through its Python API (`totalsegmentator.python_api.totalsegmentator`) in
a child process, so Stop really stops it (it computes for seconds to minutes and has no cancel
of its own) and its progress lines can be shown while it works. The result, a label image on the
volume's own grid, is kept per volume id under a folder of the server's store: a restart, the
next question and the report reuse it. On CPU it runs `fast` (one 3 mm model for all classes);
on a GPU at full resolution, where `roi_subset` saves running the parts of the model nobody asked
for. Weights are never downloaded unless the caller allows it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from medmllm.anatomy import child, nifti
from medmllm.geometry.volume import Volume
from medmllm.protocol import is_volume_id

DEFAULT_ENTRY = "totalsegmentator.python_api:totalsegmentator"
NOT_INSTALLED = (
    "Naming every organ needs TotalSegmentator, which is not installed here (pip install 'medmllm[anatomy]')."
)
ROI_SUBSET_MAX = 5  # at full resolution, fewer classes than this run as a roi_subset
HEARTBEAT_S = 15.0  # a progress note at least this often, so the answer never looks stalled
# TotalSegmentator's own crop models for roi_subset (python_api.py: 298 for CT, 852 for MR).
ROI_CROP_TASK_ID = {"total": 298, "total_mr": 852}
_PROGRESS_PREFIXES = ("Converting", "Resampling", "Predicting", "Generating", "Saving", "Downloading")


class AnatomyUnavailable(RuntimeError):
    """TotalSegmentator cannot run here; the message says, in one sentence, what it needs."""


class RunCancelled(RuntimeError):
    """Stop was pressed while TotalSegmentator ran; the child process is gone."""


class RunFailed(RuntimeError):
    """TotalSegmentator ran and failed; the message is its own error."""


@dataclass(frozen=True)
class Settings:
    """How to run: `device` "auto" picks the GPU at full resolution when there is one, else the
    CPU with `fast`; `fast` None follows the device. `allow_download` lets TotalSegmentator fetch
    missing weights (a one-time download, only when the user agreed)."""

    device: str = "auto"
    fast: Optional[bool] = None
    allow_download: bool = False
    entry: str = DEFAULT_ENTRY

    def resolved(self) -> Tuple[str, bool]:
        """(device for TotalSegmentator: "gpu" or "cpu", fast)."""
        device = self.device
        if device == "auto":
            import torch

            device = "gpu" if torch.cuda.is_available() else "cpu"
        return device, (device == "cpu") if self.fast is None else self.fast


@dataclass(frozen=True)
class Plan:
    """One run: task, device, fast, and the classes to keep (None = all)."""

    task: str
    device: str
    fast: bool
    roi_subset: Optional[Tuple[str, ...]]

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "full"

    def covers(self, classes: Sequence[str]) -> bool:
        return self.roi_subset is None or set(classes) <= set(self.roi_subset)


def plan_for(task: str, classes: Sequence[str], settings: Settings) -> Plan:
    """Everything at once on `fast` (one model predicts all classes, and later questions reuse it);
    at full resolution a short list runs as a `roi_subset`."""
    device, fast = settings.resolved()
    subset = tuple(sorted(set(classes))) if not fast and 0 < len(set(classes)) < ROI_SUBSET_MAX else None
    return Plan(task, device, fast, subset)


def missing_requirement(plan: Plan, settings: Settings) -> Optional[str]:
    """None when TotalSegmentator can run this plan here, else one sentence saying what it needs."""
    if importlib.util.find_spec("totalsegmentator") is None:
        return NOT_INSTALLED
    if settings.entry != DEFAULT_ENTRY or settings.allow_download:
        return None
    absent = missing_weights(plan)
    if not absent:
        return None
    return (
        f"TotalSegmentator's {plan.task} weights ({plan.mode}) are not on this machine ({absent[0]}); "
        "allow its one-time download (option anatomy_download=yes, or the Slicer panel's checkbox) "
        "on a machine with internet."
    )


def missing_weights(plan: Plan) -> List[str]:
    """The weight folders this plan needs that are not in TotalSegmentator's weights folder."""
    from totalsegmentator.config import get_weights_dir
    from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

    ids = TASK_CONFIGS[plan.task]["sub_modes"]["fast" if plan.fast else "default"]["task_id"]
    ids = list(ids) if isinstance(ids, list) else [ids]
    if plan.roi_subset is not None:
        ids.append(ROI_CROP_TASK_ID[plan.task])
    missing = []
    for task_id in ids:
        info = TASK_ID_WEIGHTS_CONFIGS[task_id]
        folder = Path(get_weights_dir()) / info.get("rel_path", "") / info["foldername"]
        if not folder.exists():
            missing.append(str(folder))
    return missing


class LabelCache:
    """Label images per volume id and plan, on disk (`<root>/<volume id>/`) and the newest in memory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._memory: Dict[Path, np.ndarray] = {}  # the newest label image only
        self._gone: Set[str] = set()  # forgotten while a run for them went on: not stored
        self._lock = threading.Lock()

    def _file(self, volume_id: str, plan: Plan) -> Path:
        subset = "" if plan.roi_subset is None else "-" + _digest(",".join(plan.roi_subset))
        return self.root / volume_id / f"{plan.task}-{plan.mode}{subset}.npz"

    def find(self, volume_id: str, task: str, classes: Sequence[str]) -> Optional[np.ndarray]:
        """A stored label image of `task` that holds every one of `classes` (full resolution first)."""
        folder = self.root / volume_id
        paths = sorted(folder.glob(f"{task}-*.npz"), key=lambda p: ("-full" not in p.name, p.name))
        for path in paths:
            try:
                covered = json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                continue  # half-written or damaged: it runs again
            if covered is None or set(classes) <= set(covered):
                labels = self._load(path)
                if labels is not None:
                    return labels
        return None

    def _load(self, path: Path) -> Optional[np.ndarray]:
        with self._lock:
            if path in self._memory:
                return self._memory[path]
        try:
            labels = np.load(path)["labels"]
        except (OSError, ValueError, KeyError):
            return None
        with self._lock:
            self._memory = {path: labels}
        return labels

    def forget(self, volume_id: str) -> None:
        """Drop every label image of a volume (on disk and in memory): its volume is gone. A run
        for it that is under way when this is called does not store its result (`held`)."""
        if not is_volume_id(volume_id):  # never a path out of the cache
            return
        with self._lock:
            self._memory = {p: labels for p, labels in self._memory.items() if p.parent.name != volume_id}
            self._gone.add(volume_id)
        shutil.rmtree(self.root / volume_id, ignore_errors=True)

    def held(self, volume_id: str) -> None:
        """A question about this volume came in, so the server holds it (again)."""
        with self._lock:
            self._gone.discard(volume_id)

    def sweep(self, held: Callable[[str], bool]) -> List[str]:
        """Forget every volume's labels that `held` says the server no longer has (removed while it
        was down); the volume ids forgotten."""
        if not self.root.is_dir():
            return []
        orphans = [p.name for p in self.root.iterdir() if is_volume_id(p.name) and not held(p.name)]
        for volume_id in orphans:
            self.forget(volume_id)
        return orphans

    def store(self, volume_id: str, plan: Plan, labels: np.ndarray) -> None:
        """Keep a run's label image, unless its volume was forgotten while it ran."""
        with self._lock:
            if volume_id in self._gone:
                return
        path = self._file(volume_id, plan)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(partial, labels=labels)
        partial.replace(path)
        covered = None if plan.roi_subset is None else list(plan.roi_subset)
        path.with_suffix(".json").write_text(json.dumps(covered))
        with self._lock:
            self._memory = {path: labels}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Runner:
    """TotalSegmentator for one engine: settings plus the label cache."""

    def __init__(self, cache_root: Path, settings: Optional[Settings] = None) -> None:
        self.settings = settings or Settings()
        self.cache = LabelCache(cache_root)
        self._lock = threading.Lock()  # one run at a time: it takes every core (or the GPU)

    def labels(
        self, volume: Volume, volume_id: str, task: str, classes: Sequence[str], cancel: threading.Event
    ) -> Iterator[str]:
        """Progress notes while it runs; the generator's return value is the label image ([k, j, i])."""
        with self._lock:
            self.cache.held(volume_id)
            found = self.cache.find(volume_id, task, classes)
            if found is not None:
                return found
            plan = plan_for(task, classes, self.settings)
            reason = missing_requirement(plan, self.settings)
            if reason:
                raise AnatomyUnavailable(reason)
            labels = yield from self._run(volume, plan, cancel)
            self.cache.store(volume_id, plan, labels)
            return labels

    def _run(self, volume: Volume, plan: Plan, cancel: threading.Event) -> Iterator[str]:
        what = "all its classes" if plan.roi_subset is None else ", ".join(plan.roi_subset)
        yield (
            f"Running TotalSegmentator ({plan.task}, {plan.mode}, {plan.device.upper()}) for {what}; "
            "this takes seconds to minutes, once per volume. "
        )
        with tempfile.TemporaryDirectory(prefix="medmllm-totalseg-") as tmp:
            source = nifti.write_nifti(volume, Path(tmp) / "volume.nii.gz")
            target = Path(tmp) / "labels.nii.gz"
            kwargs = {
                "input": str(source),
                "output": str(target),
                "ml": True,
                "task": plan.task,
                "fast": plan.fast,
                "roi_subset": list(plan.roi_subset) if plan.roi_subset is not None else None,
                "device": plan.device,
                "nr_thr_saving": 1,
            }
            yield from _in_child(self.settings.entry, kwargs, cancel)
            if not target.is_file():
                raise RunFailed("TotalSegmentator finished without writing its label image")
            return nifti.labels_on_grid(target, volume)


def finish(run: Iterator[str]) -> np.ndarray:
    """Drive a `Runner.labels` generator to its end without showing progress; its label image."""
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def _in_child(entry: str, kwargs: Dict, cancel: threading.Event) -> Iterator[str]:
    """Call `entry` (module:function) with `kwargs` in a child Python; its progress lines come out
    as notes, and `cancel` ends it."""
    command = [sys.executable, "-u", "-m", "medmllm.anatomy.child", entry, json.dumps(kwargs)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, errors="replace"
    )
    lines: queue.Queue = queue.Queue()
    errors: List[str] = []
    threading.Thread(target=_pump, args=(process.stdout, lines.put), daemon=True).start()
    threading.Thread(target=_pump, args=(process.stderr, errors.append), daemon=True).start()
    started = last_note = time.monotonic()
    try:
        while True:
            if cancel.is_set():
                raise RunCancelled("stopped while TotalSegmentator was running")
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if process.poll() is not None and lines.empty():
                    tail = errors[-1].strip() if errors else "no message"
                    raise RunFailed(f"TotalSegmentator's process ended ({tail})") from None
                if time.monotonic() - last_note >= HEARTBEAT_S:
                    last_note = time.monotonic()
                    yield f"({time.monotonic() - started:.0f} s) "
                continue
            if line == child.DONE:
                return
            if line.startswith(child.FAILED):
                raise RunFailed(line[len(child.FAILED) :])
            if line.startswith(_PROGRESS_PREFIXES):
                last_note = time.monotonic()
                yield f"[{line.rstrip('. ')}] "
    finally:
        _stop(process)


def _pump(stream, put) -> None:
    for line in stream:
        if line.strip():
            put(line.strip())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
