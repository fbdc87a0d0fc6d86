"""M3D-LaMed's model grid: foreground crop + resize to 32x256x256 + min-max, and its exact inverse.

Axis order. The model array is (D, H, W) = (k, j, i) of the volume: the numpy order of Slicer's
`arrayFromVolume` and SimpleITK's `GetArrayFromImage`, which is also what M3D-Seg trained on
(NIfTI z, y, x after its `swapaxes`). No reorientation is done here; the volume's own k axis is
the depth axis, so the inverse mapping is a pure per-axis scale and offset.

Preprocessing, in order (`M3DGrid.prepare`):
1. Optional HU window (centre, width): clip to [centre - width/2, centre + width/2] (issue #18).
2. Foreground crop, MONAI `CropForeground` defaults: select voxels > 0 of the image *after* its
   min-max normalisation to [0, 1] (every M3D data script normalises before cropping), margin 0,
   bounding box of all selected voxels. Since min-max is monotone, that is "voxels strictly
   above the (windowed) minimum", computed here without building the normalised copy. A
   constant volume has no foreground; MONAI would return an empty crop, which cannot be resized,
   so the whole volume is used instead.
3. Trilinear resize to (32, 256, 256), align_corners=False (the RefSeg script's mode; the
   "bilinear" of the Cap/Seg scripts cannot run on 5-D input).
4. Min-max to [0, 1]. Resizing is linear, so normalising before it (step 2) would not change this.

Inverse (M3D's `mask2box` writes index / size with the max inclusive, so the edge extent along D
is k0 + [v_min * Dc, (v_max + 1/32) * Dc) in crop-edge units; H and W likewise with 1/256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from medmllm.geometry.boxes import IJKBox
from medmllm.geometry.volume import Volume, VolumeError, window_limits

Shape3 = Tuple[int, int, int]
Window = Tuple[float, float]
MODEL_SHAPE: Shape3 = (32, 256, 256)
# Logits are clipped here before resizing so that M3D's "-inf = no mask" does not turn into NaN.
_LOGIT_LIMIT = 100.0


def _axis_weights(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's linear interpolation, align_corners=False."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    first = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    second = np.minimum(first + 1, n_in - 1)
    return first, second, (src - first).astype(np.float32)


def _resize_numpy(x: np.ndarray, shape: Shape3) -> np.ndarray:
    """Separable trilinear resize, the same formula as torch (align_corners=False)."""
    out = np.asarray(x, dtype=np.float32)
    for axis in (2, 1, 0):
        first, second, weight = _axis_weights(out.shape[axis], shape[axis])
        view = [1, 1, 1]
        view[axis] = -1
        weight = weight.reshape(view)
        out = out.take(first, axis=axis) * (1 - weight) + out.take(second, axis=axis) * weight
    return out


def resize_trilinear(x: np.ndarray, shape: Shape3) -> np.ndarray:
    """float32 trilinear resize (align_corners=False); torch when importable, else numpy."""
    if tuple(x.shape) == tuple(shape):
        return np.asarray(x, dtype=np.float32)
    try:
        import torch
    except ImportError:
        return _resize_numpy(x, shape)
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        out = torch.nn.functional.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resize_nearest(x: np.ndarray, shape: Shape3) -> np.ndarray:
    """Centre-aligned nearest resize: each output voxel takes the input voxel holding its centre.

    Exact integer arithmetic, so along each axis the result is the same box rule both ways.
    """
    index = [((2 * np.arange(n_out) + 1) * n_in) // (2 * n_out) for n_in, n_out in zip(x.shape, shape)]
    return x[np.ix_(*index)]


def _min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _foreground_bounds(x: np.ndarray) -> Tuple[Shape3, Shape3]:
    """(offset, size) in [k, j, i] of voxels strictly above the minimum; whole volume if none."""
    foreground = x > x.min()
    if not foreground.any():
        return (0, 0, 0), (x.shape[0], x.shape[1], x.shape[2])
    offset, size = [], []
    for axis in range(3):
        hits = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
        offset.append(int(hits[0]))
        size.append(int(hits[-1] - hits[0] + 1))
    return (offset[0], offset[1], offset[2]), (size[0], size[1], size[2])


@dataclass(frozen=True)
class M3DGrid:
    """Where the 32x256x256 model grid sits in the volume: all shapes/offsets in [k, j, i]."""

    volume_shape: Shape3
    crop_offset: Shape3
    crop_size: Shape3
    model_shape: Shape3 = MODEL_SHAPE

    def __post_init__(self) -> None:
        for name in ("volume_shape", "crop_offset", "crop_size", "model_shape"):
            value = tuple(int(n) for n in getattr(self, name))
            if len(value) != 3:
                raise VolumeError(f"M3DGrid.{name} needs 3 integers [k, j, i]; got {value}")
            object.__setattr__(self, name, value)
        spans = zip(self.crop_offset, self.crop_size, self.volume_shape)
        inside = all(o >= 0 and n > 0 and o + n <= v for o, n, v in spans)
        if not inside or min(self.model_shape) <= 0:
            raise VolumeError(
                f"M3DGrid crop offset {self.crop_offset} size {self.crop_size} does not fit the volume "
                f"{self.volume_shape} (model shape {self.model_shape})"
            )

    @classmethod
    def from_identity(cls) -> M3DGrid:
        """The official demo input: a (1, 32, 256, 256) npy already in [0, 1] is its own grid."""
        return cls(MODEL_SHAPE, (0, 0, 0), MODEL_SHAPE)

    @classmethod
    def prepare(cls, volume: Volume, window: Optional[Window] = None) -> Tuple[np.ndarray, M3DGrid]:
        """Model input float32 (32, 256, 256) in [0, 1] and the grid that maps answers back."""
        x = volume.voxels.astype(np.float32)
        if window is not None:
            np.clip(x, *window_limits(window), out=x)
        offset, size = _foreground_bounds(x)
        grid = cls(volume.shape, offset, size)
        return _min_max(grid.to_model(x)), grid

    @property
    def _crop(self) -> Tuple[slice, slice, slice]:
        k, j, i = (slice(o, o + n) for o, n in zip(self.crop_offset, self.crop_size))
        return k, j, i

    @property
    def _scale(self) -> np.ndarray:
        """Volume voxels per model voxel along k, j, i."""
        return np.array(self.crop_size, dtype=np.float64) / np.array(self.model_shape, dtype=np.float64)

    def to_model(self, array: np.ndarray) -> np.ndarray:
        """Crop a volume-shaped array and resize it to the model grid (float32, not normalised)."""
        if tuple(array.shape) != tuple(self.volume_shape):
            raise VolumeError(f"expected an array shaped like the volume {self.volume_shape}: {array.shape}")
        return resize_trilinear(array[self._crop], self.model_shape)

    def box_to_ijk(self, fractions: Sequence[float]) -> IJKBox:
        """M3D box [d0, h0, w0, d1, h1, w1] (index / size, max inclusive) to a volume IJKBox.

        Values must lie in [0, 1]; a min written after its max is swapped, as M3D's demo does.
        """
        f = np.asarray(fractions, dtype=np.float64)
        if f.shape != (6,) or not np.all(np.isfinite(f)):
            raise VolumeError(f"an M3D box is 6 finite numbers [d0, h0, w0, d1, h1, w1]; got {fractions!r}")
        if np.any(f < 0) or np.any(f > 1):
            raise VolumeError(f"M3D box fractions must lie in [0, 1]; got {f.tolist()}")
        size = np.array(self.crop_size, dtype=np.float64)
        start = np.array(self.crop_offset, dtype=np.float64) - 0.5
        first, last = np.minimum(f[:3], f[3:]), np.maximum(f[:3], f[3:])
        lo = start + first * size
        hi = start + np.minimum(last + 1.0 / np.array(self.model_shape), 1.0) * size
        return IJKBox(tuple(lo[::-1]), tuple(hi[::-1]))

    def ijk_box_to_fractions(self, box: IJKBox) -> Tuple[float, ...]:
        """A volume IJKBox as M3D would write it: the model voxels it covers, index / size, 3 decimals.

        The box is clipped to the crop first; a box entirely outside the crop raises VolumeError.
        """
        offset = np.array(self.crop_offset[::-1], dtype=np.float64)
        local = IJKBox(tuple(np.array(box.lo) - offset), tuple(np.array(box.hi) - offset))
        try:
            local, _ = local.clamp(self.crop_size)
        except VolumeError:
            raise VolumeError(
                f"box {box} lies outside the M3D crop (offset {self.crop_offset}, size {self.crop_size})"
            ) from None
        scale = self._scale[::-1]
        model = IJKBox(
            tuple((np.array(local.lo) + 0.5) / scale - 0.5), tuple((np.array(local.hi) + 0.5) / scale - 0.5)
        )
        first, last = model.voxel_range()
        top = np.array(self.model_shape[::-1]) - 1
        size = np.array(self.model_shape[::-1], dtype=np.float64)
        first_f = (np.clip(first, 0, top) / size)[::-1]
        last_f = (np.clip(last, 0, top) / size)[::-1]
        return tuple(round(float(v), 3) for v in (*first_f, *last_f))

    def mask_to_volume(self, mask_or_logits: Any, threshold: float = 0.5, logits: bool = False) -> np.ndarray:
        """A (32, 256, 256) model-grid mask, probability map or logits to a bool mask like the volume.

        A bool mask is resized nearest (each volume voxel takes the model voxel holding its
        centre), so a box stays a box. Probabilities are resized trilinearly and thresholded;
        with `logits=True` the logits themselves are resized and cut at logit(threshold), the same
        as sigmoid(x) > threshold without sigmoid saturation. The result is pasted at the crop
        offset. Leading singleton axes ((1, 1, 32, 256, 256) as the model returns) are accepted.
        """
        a = np.asarray(mask_or_logits)
        while a.ndim > 3 and a.shape[0] == 1:
            a = a[0]
        if tuple(a.shape) != tuple(self.model_shape):
            raise VolumeError(f"expected a model-grid mask of shape {self.model_shape}; got {a.shape}")
        out = np.zeros(self.volume_shape, dtype=bool)
        if a.dtype == bool:
            out[self._crop] = resize_nearest(a, self.crop_size)
            return out
        if not 0 < threshold < 1:
            raise VolumeError(f"threshold must lie strictly between 0 and 1; got {threshold}")
        values = a.astype(np.float32)
        if np.isnan(values).any():
            raise VolumeError("the model mask contains NaN values")
        cut = threshold
        if logits:
            np.clip(values, -_LOGIT_LIMIT, _LOGIT_LIMIT, out=values)
            cut = math.log(threshold / (1 - threshold))
        out[self._crop] = resize_trilinear(values, self.crop_size) > cut
        return out
