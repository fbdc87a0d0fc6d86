"""Box to mask: a MedRegA-style box on an axial slice, or a user's ROI, becomes the 3D structure.

The box is written the way MedRegA/InternVL answers (`<ref>liver</ref><box>[[x1,y1,x2,y2]]</box>`,
0-999 of the exported slice), read back by the real dialect parser and mapped through the exported
slice's geometry, exactly as the openai engine does; TotalSegmentator's labels come from the
signature-checked double (the sdist's real output), the rest runs for real.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
from medmllm import samples
from medmllm.anatomy.boxes import AnatomySegmenter, best_label
from medmllm.anatomy.runner import Runner, Settings
from medmllm.engines.base import ChatContext, ChatTurn, EngineOptions, MaskOut, TokenOut
from medmllm.engines.builtin import BuiltinEngine
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.slices import export_slice
from medmllm.grounding.registry import get_dialect
from medmllm.segmenters import get_segmenter, segmenter_names

DOUBLE = "totalseg_double:totalsegmentator"
REF = samples.TOTALSEG_SDIST.folder / "tests" / "reference_files"


@pytest.fixture(scope="module")
def crop():
    return samples.load_real_scan(samples.real_scan("abdomen-ct-crop"))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return AnatomySegmenter(Runner(tmp_path_factory.mktemp("anatomy"), Settings(device="cpu", entry=DOUBLE)))


@pytest.fixture(scope="module")
def liver(crop):
    """The liver of TotalSegmentator's --fast output (what a CPU run gives), on the scan's grid."""
    number = next(n for n, name in samples.label_map("total").items() if name == "liver")
    image = sitk.ReadImage(str(REF / "example_seg_fast.nii.gz"))
    on_grid = sitk.Resample(image, crop.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(on_grid) == number


def _medrega_box(crop, mask, shrink: float = 0.0):
    """The structure's box on the middle axial slice, as MedRegA writes it, parsed back."""
    image = export_slice(crop, "axial")
    voxels = np.argwhere(mask[image.index])  # (j, i) on this slice (axial normal is k here)
    ijk = np.column_stack([voxels[:, 1], voxels[:, 0], np.full(len(voxels), image.index)])
    pixels = image.ijk_to_pixels(ijk)
    lo, hi = pixels.min(axis=0) - 0.5, pixels.max(axis=0) + 0.5
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * (1 - shrink)
    lo, hi = centre - half, centre + half
    fractions = [lo[0] / image.width, lo[1] / image.height, hi[0] / image.width, hi[1] / image.height]
    dialect = get_dialect("internvl")
    answer = f"The liver is here: <ref>liver</ref>{dialect.format_region(fractions)}"
    (found,) = dialect.parse(answer).boxes
    assert found.label == "liver"
    return image.box_to_ijk(found.fractions), image.slice_axis


def test_a_medrega_box_around_the_liver_becomes_the_livers_3d_mask(crop, segmenter, liver):
    box, axis = _medrega_box(crop, liver)
    mask = segmenter.segment(crop, box, axis)
    assert mask.shape == crop.shape and mask.sum() > 30 * liver[crop.shape[0] // 2].sum() / 3
    assert 2 * (mask & liver).sum() / (mask.sum() + liver.sum()) >= 0.99
    assert segmenter.last_choice.startswith("liver")


def test_a_box_no_structure_fills_falls_back_to_region_growing(crop, segmenter, liver):
    box, axis = _medrega_box(crop, liver, shrink=0.8)  # a small box deep inside the liver
    mask = segmenter.segment(crop, box, axis)
    assert segmenter.last_choice.startswith("region growing")
    assert mask.any() and not np.array_equal(mask, liver)


def test_the_hook_offers_it_by_name():
    assert "anatomy" in segmenter_names()
    assert isinstance(get_segmenter("anatomy"), AnatomySegmenter)


def test_best_label_scores_extent_against_the_box():
    labels = np.zeros((4, 20, 20), np.uint8)
    labels[:, 2:12, 2:12] = 1  # a big structure the box frames
    labels[:, 10:14, 10:14] = 2  # a small neighbour poking into the box
    value, iou = best_label(labels, [(2, 3), (2, 12), (2, 12)], normal=0)
    assert value == 1 and iou == pytest.approx(1.0)
    assert best_label(labels, [(2, 3), (15, 19), (15, 19)], normal=0) is None


def test_the_builtin_engine_names_what_a_user_roi_holds(crop, liver, tmp_path):
    engine = BuiltinEngine(EngineOptions(extra={"anatomy_entry": DOUBLE, "anatomy_device": "cpu"}))
    engine.use_store(tmp_path)
    k, j, i = (np.flatnonzero(liver.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    roi = IJKBox((i[0] - 0.5, j[0] - 0.5, k[0] - 0.5), (i[-1] + 0.5, j[-1] + 0.5, k[-1] + 0.5))
    ctx = ChatContext(crop, crop.sha256(), [ChatTurn("user", "what is this?")], roi=roi)
    events = list(engine.chat(ctx, threading.Event()))
    text = "".join(e.text for e in events if isinstance(e, TokenOut))
    (mask,) = [e for e in events if isinstance(e, MaskOut)]
    assert "The box holds the liver" in text and mask.label == "Liver" and np.array_equal(mask.mask, liver)
