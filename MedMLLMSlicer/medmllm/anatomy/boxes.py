"""Box to mask with TotalSegmentator: the structure whose extent matches a box best is the answer.

A grounding model (MedRegA, Qwen, MedGemma ...) or a user's ROI frames a structure; the box is
compared with the extent of every labelled structure inside the box's slab (one slice for a 2D
box, the ROI's depth for a 3D one), and the best match by intersection over union gives its whole
3D mask. Below `MIN_IOU` nothing fits and region growing, the weight-free segmenter, answers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume
from medmllm.segmenters import RegionGrowingSegmenter, clipped_ranges

MIN_IOU = 0.3  # a box around one organ overlaps that organ's extent far more than this
Ranges = List[Tuple[int, int]]


def best_label(labels: np.ndarray, ranges: Ranges, normal: int) -> Optional[Tuple[int, float]]:
    """(label, IoU) of the labelled structure whose extent within the slab best matches the box
    ([k, j, i] half-open `ranges`; `normal` is the numpy axis the slab is thin along)."""
    slab_index = [slice(None)] * 3
    slab_index[normal] = slice(*ranges[normal])
    slab = labels[tuple(slab_index)]
    offset = ranges[normal][0]
    inside = labels[tuple(slice(a, b) for a, b in ranges)]
    best: Optional[Tuple[int, float]] = None
    for value in np.unique(inside[inside > 0]):
        hits = np.nonzero(slab == value)
        lo = [int(h.min()) for h in hits]
        hi = [int(h.max()) + 1 for h in hits]
        lo[normal] += offset
        hi[normal] += offset
        score = _iou(ranges, list(zip(lo, hi)))
        if best is None or score > best[1]:
            best = (int(value), score)
    return best


def _iou(a: Ranges, b: Ranges) -> float:
    overlap = np.prod([max(0, min(x1, y1) - max(x0, y0)) for (x0, x1), (y0, y1) in zip(a, b)])
    union = np.prod([x1 - x0 for x0, x1 in a]) + np.prod([y1 - y0 for y0, y1 in b]) - overlap
    return float(overlap / union) if union else 0.0


class AnatomySegmenter:
    """`medmllm.segmenters` box segmenter `anatomy`: TotalSegmentator's structure filling the box,
    else region growing. Runs TotalSegmentator once per volume (cached like the built-in engine's)."""

    name = "anatomy"

    def __init__(self, runner=None, task: Optional[str] = None) -> None:
        from medmllm.anatomy.runner import Runner
        from medmllm.samples import cache_dir

        self.runner = runner or Runner(Path(cache_dir()) / "anatomy")
        self.task = task
        self.fallback = RegionGrowingSegmenter()
        self.last_choice = ""  # what the last call picked, for the answer text

    def segment(self, volume: Volume, box: IJKBox, slice_axis: int) -> np.ndarray:
        from medmllm.anatomy.runner import AnatomyUnavailable, RunFailed

        ranges = clipped_ranges(box, volume.voxels.shape)
        try:
            labels = self._labels(volume)
        except (AnatomyUnavailable, RunFailed) as exc:
            self.last_choice = f"region growing ({exc})"
            return self.fallback.segment(volume, box, slice_axis)
        found = best_label(labels, ranges, 2 - slice_axis)
        if found is None or found[1] < MIN_IOU:
            self.last_choice = "region growing (no TotalSegmentator structure fills the box)"
            return self.fallback.segment(volume, box, slice_axis)
        self.last_choice = f"{self.class_name(volume, found[0])} (box overlap {found[1]:.2f})"
        return labels == found[0]

    def task_of(self, volume: Volume) -> str:
        from medmllm.engines.builtin.report import guess_modality

        return self.task or ("total" if guess_modality(volume.voxels)[0] == "CT" else "total_mr")

    def class_name(self, volume: Volume, label: int) -> str:
        from medmllm.anatomy import catalogue

        return catalogue.class_map(self.task_of(volume)).get(label, f"label {label}")

    def _labels(self, volume: Volume) -> np.ndarray:
        from medmllm.anatomy.runner import finish

        run = self.runner.labels(volume, volume.sha256(), self.task_of(volume), [], threading.Event())
        return finish(run)
