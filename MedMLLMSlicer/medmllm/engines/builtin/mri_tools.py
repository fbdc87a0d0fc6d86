"""Brain mask on head MRI: deepbet's published networks when torch and its weights are at hand,
else a classical method (Otsu threshold + morphology + largest component), named as such.

deepbet (Fisch et al. 2024, MIT licence, weights shipped inside the `deepbet` wheel on PyPI) is a
two-stage 3D U-Net: a 128^3 pass finds the brain's bounding box, a 256^3 pass inside that box
gives the mask. We load its TorchScript files directly (no import of the `deepbet` package, whose
GUI dependencies are not wanted here) and follow the procedure its paper and package describe:
closest-canonical RAS array, nearest-neighbour resizing, 0.5/99.5 percentile clipping,
ImageNet-style standardisation, threshold 0.5, largest component, holes filled.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np

from medmllm import samples

DEEPBET = "deepbet (MIT; weights from the deepbet wheel)"
CLASSICAL = "classical: Otsu threshold + morphology + largest component"
SMALL_GRID = (128, 128, 128)
FULL_GRID = (256, 256, 256)


class BrainMaskError(RuntimeError):
    """The volume gave no usable brain mask; the message says why in the user's terms."""


BBOX_MARGIN = 0.1  # fraction of the coarse box added on each side before the fine pass
SKULL_GAP_MM = 4.0  # erosion that detaches brain from scalp in the classical method


def brain_mask(voxels: np.ndarray, ijk_to_ras: np.ndarray, method: str = "auto") -> Tuple[np.ndarray, str]:
    """Boolean brain mask shaped like `voxels` and the name of the method that made it.

    `method`: "auto" (deepbet if available, else classical), "deepbet" or "classical".
    """
    if method not in ("auto", "deepbet", "classical"):
        raise ValueError(f"unknown brain-mask method {method!r}; use auto, deepbet or classical")
    if method == "deepbet" or (method == "auto" and deepbet_available()):
        return _deepbet_mask(voxels, ijk_to_ras), DEEPBET
    spacing = np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)
    return _classical_mask(voxels, tuple(spacing[::-1])), CLASSICAL


def deepbet_available() -> bool:
    """torch importable and both TorchScript files found (installed wheel or the medmllm cache)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return (
        samples.find_asset(samples.DEEPBET_MODEL) is not None
        and samples.find_asset(samples.DEEPBET_BBOX) is not None
    )


def _canonical_axes(ijk_to_ras: np.ndarray) -> Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]:
    """For RAS axes x, y, z: which [k, j, i] array axis runs along it, and whether it runs backwards."""
    directions = np.asarray(ijk_to_ras, float)[:3, :3]
    axes, flips = [], []
    for ras_axis in range(3):
        column = int(np.argmax(np.abs(directions[ras_axis])))
        if 2 - column in axes:
            raise BrainMaskError("oblique grid too far from any axis order for the brain network")
        axes.append(2 - column)
        flips.append(bool(directions[ras_axis, column] < 0))
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def _to_canonical(array: np.ndarray, axes, flips) -> np.ndarray:
    out = np.transpose(array, axes)
    return out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _from_canonical(array: np.ndarray, axes, flips) -> np.ndarray:
    out = array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(out, np.argsort(axes))


def _deepbet_mask(voxels: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    import torch

    model_path = samples.find_asset(samples.DEEPBET_MODEL)
    bbox_path = samples.find_asset(samples.DEEPBET_BBOX)
    if model_path is None or bbox_path is None:
        raise BrainMaskError("deepbet weights not found; run scripts/demo once or `pip install deepbet`")
    if float(voxels.max()) <= float(voxels.min()):
        raise BrainMaskError("the volume has one constant intensity; there is no brain to find")
    axes, flips = _canonical_axes(ijk_to_ras)
    x = torch.from_numpy(np.ascontiguousarray(_to_canonical(voxels, axes, flips), dtype=np.float32))
    with torch.no_grad(), warnings.catch_warnings():
        # deepbet ships TorchScript files; torch.jit.load is the only loader for them
        warnings.simplefilter("ignore", DeprecationWarning)
        net_box = torch.jit.load(str(bbox_path), map_location="cpu").eval()
        net = torch.jit.load(str(model_path), map_location="cpu").eval()
        small = _resize(x, SMALL_GRID)
        low, high = torch.quantile(small, 0.005), torch.quantile(small, 0.995)
        coarse = net_box(_standardise(small, low, high)[None, None])[0, 1].numpy() > 0.5
        box = _box_with_margin(coarse, x.shape)
        crop = _resize(x[box], FULL_GRID)
        prob = net(_standardise(crop, low, high)[None, None])[0, 1]
        fine = _resize(prob, tuple(x[box].shape)).numpy() > 0.5
    mask = np.zeros(x.shape, bool)
    mask[box] = _clean(fine)
    return np.ascontiguousarray(_from_canonical(mask, axes, flips))


def _resize(x, shape):
    import torch.nn.functional as F

    return F.interpolate(x[None, None], size=shape, mode="nearest-exact")[0, 0]


def _standardise(x, low, high):
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def _box_with_margin(coarse: np.ndarray, shape) -> Tuple[slice, slice, slice]:
    """Slices of the full canonical array around the coarse brain, grown by `BBOX_MARGIN` per side."""
    from medmllm.engines.builtin.grid import largest_components

    parts = largest_components(coarse, 1)
    if not parts:
        raise BrainMaskError("the brain network found no brain in this volume (is it a head MRI?)")
    box = []
    for axis in range(3):
        profile = parts[0].mean(axis=tuple(a for a in range(3) if a != axis))
        idx = np.nonzero(profile > 0.02)[0]
        if idx.size == 0:
            idx = np.nonzero(profile > 0)[0]
        scale = shape[axis] / coarse.shape[axis]
        centre, size = (
            scale * (idx.min() + idx.max() + 1) / 2,
            scale * (idx.max() + 1 - idx.min()) * (1 + 2 * BBOX_MARGIN),
        )
        box.append(slice(max(0, round(centre - size / 2)), min(shape[axis], round(centre + size / 2))))
    return (box[0], box[1], box[2])


def _clean(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    from medmllm.engines.builtin.grid import largest_components

    parts = largest_components(mask, 1)
    return ndimage.binary_fill_holes(parts[0]) if parts else mask


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold maximising between-class variance of a histogram (Otsu 1979)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    # every bin of an empty gap between two modes scores the same: take the gap's middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(centres[best[len(best) // 2]])


def _classical_mask(voxels: np.ndarray, spacing_kji) -> np.ndarray:
    """Foreground by Otsu, erode to cut the scalp off, keep the largest part, grow it back."""
    from scipy import ndimage

    from medmllm.engines.builtin.grid import largest_components

    if float(voxels.max()) <= float(voxels.min()):
        raise BrainMaskError("no bright tissue found: the volume has one constant intensity")
    sample = voxels[::2, ::2, ::2].astype(np.float32)
    foreground = voxels > otsu_threshold(sample)
    radius = tuple(max(1, round(SKULL_GAP_MM / s)) for s in spacing_kji)
    ball = _ellipsoid(radius)
    core = ndimage.binary_erosion(foreground, structure=ball)
    parts = largest_components(core, 1)
    if not parts:
        raise BrainMaskError("no bright tissue found for a brain mask (is this a head MRI?)")
    grown = ndimage.binary_dilation(parts[0], structure=ball) & foreground
    return ndimage.binary_fill_holes(grown)


def _ellipsoid(radius) -> np.ndarray:
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / r) ** 2 for g, r in zip(grids, radius)) <= 1.0
