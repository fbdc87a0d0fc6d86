"""Box -> 3D mask hook: the built-in region growing on phantoms, and the plug-in registry."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume
from medmllm.segmenters import (
    ENTRY_POINT_GROUP,
    RegionGrowingSegmenter,
    SegmenterError,
    get_segmenter,
    segmenter_names,
)

SHAPE = (40, 64, 72)  # (k, j, i)
CENTRE_IJK = (41, 27, 19)  # off-centre on purpose
RADIUS_MM = 9.0
# Anisotropic and flipped: 0.8 mm along i, -1.1 mm along j (flip), 1.6 mm along k.
IJK_TO_RAS = np.array(
    [[0.8, 0.0, 0.0, -20.0], [0.0, -1.1, 0.0, 35.0], [0.0, 0.0, 1.6, -60.0], [0.0, 0.0, 0.0, 1.0]]
)


def _sphere_volume(noise: float, seed: int = 0) -> tuple:
    k, j, i = np.indices(SHAPE)
    spacing = (0.8, 1.1, 1.6)
    dist = np.sqrt(
        ((i - CENTRE_IJK[0]) * spacing[0]) ** 2
        + ((j - CENTRE_IJK[1]) * spacing[1]) ** 2
        + ((k - CENTRE_IJK[2]) * spacing[2]) ** 2
    )
    truth = dist <= RADIUS_MM
    rng = np.random.default_rng(seed)
    voxels = np.where(truth, 60.0, -100.0) + rng.normal(0.0, noise, SHAPE)
    # a second bright structure nearby that must not be swallowed
    voxels[:, 5:12, 5:12] = 60.0
    return Volume.from_array(voxels.astype(np.float32), IJK_TO_RAS), truth


def _section_box(truth: np.ndarray, slice_axis: int, index: int) -> IJKBox:
    """The box a 2D model would draw around the structure's cross-section on one slice."""
    numpy_axis = 2 - slice_axis
    section = np.take(truth, index, axis=numpy_axis)
    rows, cols = np.nonzero(section)
    lo = [0, 0, 0]
    hi = [0, 0, 0]
    in_plane = [a for a in (0, 1, 2) if a != slice_axis]  # IJK axes in plane, ascending
    # np.take drops numpy axis `numpy_axis`; remaining numpy axes are descending IJK axes
    ranges = {in_plane[1]: (rows.min(), rows.max()), in_plane[0]: (cols.min(), cols.max())}
    ranges[slice_axis] = (index, index)
    for axis, (a, b) in ranges.items():
        lo[axis], hi[axis] = int(a), int(b)
    return IJKBox.from_voxels(lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_region_growing_recovers_noisy_sphere(slice_axis: int) -> None:
    volume, truth = _sphere_volume(noise=12.0)
    box = _section_box(truth, slice_axis, CENTRE_IJK[slice_axis])
    mask = RegionGrowingSegmenter().segment(volume, box, slice_axis)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert _dice(mask, truth) >= 0.9
    assert not mask[:, 5:12, 5:12].any(), "grew into the separate structure"


def test_region_growing_from_off_centre_slice_of_sphere() -> None:
    volume, truth = _sphere_volume(noise=8.0, seed=3)
    box = _section_box(truth, 2, CENTRE_IJK[2] + 2)
    mask = RegionGrowingSegmenter().segment(volume, box, 2)
    assert _dice(mask, truth) >= 0.9


def test_region_growing_is_deterministic() -> None:
    volume, truth = _sphere_volume(noise=12.0)
    box = _section_box(truth, 2, CENTRE_IJK[2])
    first = RegionGrowingSegmenter().segment(volume, box, 2)
    second = RegionGrowingSegmenter().segment(volume, box, 2)
    assert np.array_equal(first, second)


def test_growth_is_bounded_by_the_box_in_a_uniform_volume() -> None:
    volume = Volume.from_array(np.full((50, 50, 50), 7, dtype=np.int16), np.eye(4))
    box = IJKBox.from_voxels(20, 20, 25, 24, 24, 25)  # 5x5 voxels on axial slice 25
    mask = RegionGrowingSegmenter().segment(volume, box, 2)
    k, j, i = np.nonzero(mask)
    assert i.min() >= 18 and i.max() <= 26 and j.min() >= 18 and j.max() <= 26
    assert k.max() - k.min() <= 2 * 1.25 * 5 / 2 + 2
    assert mask.sum() < volume.voxels.size / 50


def test_runaway_growth_is_refused() -> None:
    volume = Volume.from_array(np.full((30, 30, 30), 1.0, dtype=np.float32), np.eye(4))
    box = IJKBox.from_voxels(5, 5, 15, 24, 24, 15)
    with pytest.raises(SegmenterError, match="limit 100"):
        RegionGrowingSegmenter(max_voxels=100).segment(volume, box, 2)


def test_box_outside_the_volume_is_refused() -> None:
    volume, _ = _sphere_volume(noise=0.0)
    with pytest.raises(SegmenterError, match="outside the volume"):
        RegionGrowingSegmenter().segment(volume, IJKBox.from_voxels(200, 200, 3, 210, 210, 3), 2)


def test_box_partly_outside_is_clipped() -> None:
    volume, truth = _sphere_volume(noise=0.0)
    box = _section_box(truth, 2, CENTRE_IJK[2])
    wide = IJKBox((box.lo[0], box.lo[1], box.lo[2]), (box.hi[0] + 200.0, box.hi[1], box.hi[2]))
    mask = RegionGrowingSegmenter(seed_fraction=0.1).segment(volume, wide, 2)
    assert mask.shape == SHAPE


def test_bad_slice_axis() -> None:
    volume, truth = _sphere_volume(noise=0.0)
    with pytest.raises(SegmenterError, match="slice_axis"):
        RegionGrowingSegmenter().segment(volume, _section_box(truth, 2, CENTRE_IJK[2]), 3)


def test_registry_has_builtin_and_rejects_unknown() -> None:
    assert "region-growing" in segmenter_names()
    assert isinstance(get_segmenter("region-growing"), RegionGrowingSegmenter)
    with pytest.raises(SegmenterError, match=r"unknown segmenter 'medsam9'.*region-growing"):
        get_segmenter("medsam9")


def _install_plugin(tmp_path, monkeypatch, name: str, target: str, module_source: str) -> None:
    """A fake installed distribution that declares a `medmllm.segmenters` entry point."""
    (tmp_path / "fake_seg_plugin.py").write_text(textwrap.dedent(module_source))
    info = tmp_path / "fake_seg_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-seg-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_seg_plugin", raising=False)


def test_entry_point_plugin_is_found_and_used(tmp_path, monkeypatch) -> None:
    _install_plugin(
        tmp_path,
        monkeypatch,
        "threshold",
        "fake_seg_plugin:ThresholdSegmenter",
        """
        import numpy as np

        class ThresholdSegmenter:
            name = "threshold"

            def segment(self, volume, box, slice_axis):
                return np.asarray(volume.voxels) > 0
        """,
    )
    assert "threshold" in segmenter_names()
    volume, _ = _sphere_volume(noise=0.0)
    mask = get_segmenter("threshold").segment(volume, IJKBox.from_voxels(0, 0, 0, 1, 1, 0), 2)
    assert mask.sum() == (volume.voxels > 0).sum()


def test_broken_plugin_gives_a_clear_error(tmp_path, monkeypatch) -> None:
    _install_plugin(tmp_path, monkeypatch, "broken", "fake_seg_plugin:Missing", "X = 1\n")
    with pytest.raises(SegmenterError, match=r"'broken'.*failed to load"):
        get_segmenter("broken")


def test_plugin_without_segment_method_is_refused(tmp_path, monkeypatch) -> None:
    _install_plugin(tmp_path, monkeypatch, "lazy", "fake_seg_plugin:Lazy", "class Lazy:\n    pass\n")
    with pytest.raises(SegmenterError, match="no segment"):
        get_segmenter("lazy")
