"""preview.png: a quick look at an answer without Slicer, good enough to teach with.

Axial, coronal and sagittal slices through the centre of the answer's structure (the centroid of
its masks, or the centre of its first box), each mask drawn as a filled translucent overlay with
an outline in its segment colour and its name beside it, on a window that suits the structure
(lung window for lungs and airway, bone window for bones, soft tissue otherwise; MR keeps its
percentile window).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medmllm.engines.base import MaskOut
from medmllm.geometry.volume import Volume

NORMALS = {"axial": (0, 0, 1), "coronal": (0, 1, 0), "sagittal": (1, 0, 0)}
FILL_ALPHA = 0.35
PANEL_MIN_PX = 360  # each panel is scaled up to at least this on its longer side
TITLE_PX = 24  # the panel title's band at the top
MIN_FOCUS_COVER = 0.25  # the centroid slice must show this share of the masks' largest cross-section
# (centre, width) in HU; chosen by words in the segment names, first match wins.
CT_WINDOWS: Tuple[Tuple[Tuple[str, ...], str, Tuple[float, float]], ...] = (
    (("lung", "airway", "trachea", "bronch"), "lung window", (-600.0, 1500.0)),
    (("bone", "skeleton", "vertebra", "rib", "skull", "spine"), "bone window", (400.0, 1800.0)),
)
SOFT_TISSUE = ("soft-tissue window", (40.0, 400.0))


def write_preview(path: Path, volume: Volume, boxes: List[Dict[str, Any]], masks: List[MaskOut]) -> Path:
    """Three labelled panels side by side, written atomically."""
    import io

    from PIL import Image

    from medmllm.atomic import write_atomic

    name, window = choose_window(volume, [m.label for m in masks] + [str(b["label"]) for b in boxes])
    focus = _focus(volume, boxes, masks)
    panels = [_panel(volume, o, focus, boxes, masks, window, name) for o in NORMALS]
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, (height - panel.height) // 2))
        x += panel.width + 4
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return write_atomic(Path(path), buffer.getvalue())


def choose_window(volume: Volume, labels: Sequence[str]) -> Tuple[str, Optional[Tuple[float, float]]]:
    """(name, (centre, width)) for a CT (minimum below -500 HU); ("", None) keeps the default."""
    if float(volume.voxels.min()) >= -500:
        return "", None
    text = " ".join(labels).lower()
    for words, name, window in CT_WINDOWS:
        if any(w in text for w in words):
            return name, window
    return SOFT_TISSUE


def _focus(volume: Volume, boxes: List[Dict[str, Any]], masks: List[MaskOut]) -> np.ndarray:
    """IJK point the slices pass through: the masks' centroid, else the first box's centre, else
    the volume centre."""
    present = [m.mask for m in masks if m.mask.any()]
    if present:
        union = np.logical_or.reduce(present)
        profiles = [union.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in (2, 1, 0)]
        return np.array([float(p @ np.arange(p.size)) / p.sum() for p in profiles])
    if boxes:
        v = boxes[0]["voxels"]
        return (np.array(v["min"]) + np.array(v["max"])) / 2.0
    return (np.array(volume.shape[::-1]) - 1) / 2.0


def _slice_index(volume: Volume, axis: int, focus: np.ndarray, masks: List[MaskOut]) -> int:
    """The focus slice; if the masks barely cross it (the sagittal midline between two lungs), the
    slice along this axis where they cover the most."""
    index = int(np.clip(round(float(focus[axis])), 0, volume.shape[2 - axis] - 1))
    present = [m.mask for m in masks if m.mask.any()]
    if not present:
        return index
    union = np.logical_or.reduce(present)
    area = union.sum(axis=tuple(a for a in range(3) if a != 2 - axis))
    return index if area[index] >= MIN_FOCUS_COVER * area.max() else int(np.argmax(area))


def _panel(volume: Volume, orientation: str, focus, boxes, masks: List[MaskOut], window, window_name: str):
    """One slice scaled to square millimetres, overlays drawn at display resolution."""
    from PIL import Image, ImageDraw

    from medmllm.geometry.slices import export_slice
    from medmllm.geometry.transforms import nearest_axis

    axis = nearest_axis(volume.ijk_to_ras, NORMALS[orientation])
    sl = export_slice(volume, orientation, _slice_index(volume, axis, focus, masks), window)
    sx, sy = np.array(sl.pixel_spacing) / min(sl.pixel_spacing)
    zoom = max(1.0, PANEL_MIN_PX / max(sl.width * sx, sl.height * sy))
    size = (max(1, round(sl.width * sx * zoom)), max(1, round(sl.height * sy * zoom)))
    rgb = np.asarray(Image.fromarray(sl.pixels).resize(size, Image.BILINEAR).convert("RGB"), np.float32)
    labels = []
    for m in masks:
        region = _mask_on_slice(m.mask, sl)
        if not region.any():
            continue
        big = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        colour = np.array([255 * c for c in m.color], np.float32)
        rgb[big] = (1 - FILL_ALPHA) * rgb[big] + FILL_ALPHA * colour
        rgb[_outline(big)] = colour
        rows, cols = np.nonzero(big)
        labels.append((m.label, (float(cols.mean()), float(rows.min())), tuple(int(c) for c in colour)))
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(14)
    for b in boxes:
        lo, hi = np.array(b["ijk"]["lo"]), np.array(b["ijk"]["hi"])
        if lo[axis] <= sl.index <= hi[axis]:
            corners = [(c * sx * zoom, r * sy * zoom) for c, r in _box_corners_on_slice(lo, hi, axis, sl)]
            colour = tuple(int(255 * c) for c in b["color"])
            draw.polygon(corners, outline=colour)
            labels.append((b["label"], corners[0], colour))
    for text, (x, y), colour in labels:
        _label(draw, text, (x, y), colour, font, image.size)
    title = f"{orientation} {sl.index}" + (f" · {window_name}" if window_name else "")
    _label(draw, title, (4, 4), (255, 255, 255), font, image.size, centred=False)
    return image


def _label(draw, text: str, xy, colour, font, size, centred: bool = True) -> None:
    """Text with a dark outline so it reads on any background, kept inside the panel."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = xy[0] - w / 2 if centred else xy[0]
    y = xy[1] - h - 6 if centred else xy[1]
    if centred and y < TITLE_PX:  # above the region there is no room: write it just inside
        y = max(xy[1] + 4, TITLE_PX)
    x = min(max(2.0, x), size[0] - w - 2)
    y = min(max(2.0, y), size[1] - h - 2)
    draw.text((x, y), text, fill=colour, font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _mask_on_slice(mask: np.ndarray, sl) -> np.ndarray:
    """Sample a [k, j, i] mask at every pixel centre of a slice through its pixel->IJK map."""
    rows, cols = np.mgrid[0 : sl.height, 0 : sl.width]
    ijk = np.rint(sl.pixels_to_ijk(np.column_stack([cols.ravel(), rows.ravel()]))).astype(int).T
    shape = np.array(mask.shape[::-1])[:, None]
    inside = np.all((ijk >= 0) & (ijk < shape), axis=0)
    out = np.zeros(ijk.shape[1], dtype=bool)
    out[inside] = mask[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return out.reshape(sl.height, sl.width)


def _outline(region: np.ndarray) -> np.ndarray:
    """Two-pixel-wide inner edge of a region."""
    from scipy import ndimage

    return region & ~ndimage.binary_erosion(region, iterations=2)


def _box_corners_on_slice(lo, hi, axis: int, sl) -> List[Tuple[float, float]]:
    """The box's four in-plane IJK edge corners as (col, row) pixel-edge coordinates."""
    a, b = (x for x in range(3) if x != axis)
    corners = np.zeros((4, 3))
    corners[:, axis] = sl.index
    corners[:, [a, b]] = [(lo[a], lo[b]), (hi[a], lo[b]), (hi[a], hi[b]), (lo[a], hi[b])]
    return [(float(c) + 0.5, float(r) + 0.5) for c, r in sl.ijk_to_pixels(corners)]
