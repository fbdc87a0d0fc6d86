"""Time one real TotalSegmentator run through medmllm's runner on the sdist's real CT: prints
numbers, asserts nothing. Needs the `anatomy` extra and TotalSegmentator's weights; with
`--download` TotalSegmentator may fetch them (internet). Without weights it says so and exits 2.

    .venv/bin/python scripts/bench_anatomy.py [--scan abdomen-ct] [--device cpu] [--full] [--download]

Reports the wall time of the first question (child start, TotalSegmentator import, inference,
mapping back, cache write), of a cached question, and Dice of a few organs against the output the
sdist ships for that scan and mode (the same release should agree closely; not a test).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import SimpleITK as sitk
from medmllm import samples
from medmllm.anatomy.runner import AnatomyUnavailable, Runner, Settings, finish

REFERENCE = {
    ("abdomen-ct-crop", True): "example_seg_fast.nii.gz",
    ("abdomen-ct-crop", False): "example_seg.nii.gz",
}
REFERENCE.update(
    {
        ("abdomen-ct", True): "example_seg_fast_force_split.nii.gz",
        ("ct-dicom", True): "example_seg_dicom.nii.gz",
    }
)
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "aorta")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", default="abdomen-ct", choices=sorted(samples.REAL_SCANS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    parser.add_argument("--full", action="store_true", help="full resolution instead of --fast")
    parser.add_argument("--download", action="store_true", help="let TotalSegmentator download weights")
    args = parser.parse_args()
    volume = samples.load_real_scan(samples.real_scan(args.scan))
    settings = Settings(device=args.device, fast=not args.full, allow_download=args.download)
    runner = Runner(Path(tempfile.mkdtemp(prefix="bench-anatomy-")), settings)
    start = time.perf_counter()
    try:
        run = runner.labels(volume, volume.sha256(), "total", [], threading.Event())
        labels = finish(run)
    except AnatomyUnavailable as exc:
        print(f"[bench_anatomy] {exc}")
        return 2
    first = time.perf_counter() - start
    start = time.perf_counter()
    finish(runner.labels(volume, volume.sha256(), "total", ["liver"], threading.Event()))
    cached = time.perf_counter() - start
    mode = "full" if args.full else "fast"
    where = f"{args.scan} {volume.shape[::-1]} {mode} on {args.device}"
    print(f"[bench_anatomy] {where}: first question {first:.1f} s, cached {cached:.3f} s")
    name = REFERENCE.get((args.scan, not args.full))
    if name:
        image = sitk.ReadImage(str(samples.TOTALSEG_SDIST.folder / "tests" / "reference_files" / name))
        reference = sitk.GetArrayFromImage(
            sitk.Resample(image, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        )
        numbers = {v: k for k, v in samples.label_map("total").items()}
        for organ in ORGANS:
            a, b = labels == numbers[organ], reference == numbers[organ]
            dice = 2 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))
            print(f"[bench_anatomy]   {organ}: Dice {dice:.3f} against {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
