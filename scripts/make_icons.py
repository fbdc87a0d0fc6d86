"""Draw the extension and module icons (PIL): a chat bubble holding an axial slice with a box and a mask.

Run with `.venv/bin/python scripts/make_icons.py`; writes Resources/MedMLLMSlicer.png (extension,
128x128) and MedMLLMSlicer/Resources/Icons/MedMLLMSlicer.png (module, 128x128).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (
    ROOT / "Resources" / "MedMLLMSlicer.png",
    ROOT / "MedMLLMSlicer" / "Resources" / "Icons" / "MedMLLMSlicer.png",
)
SCALE = 4  # draw large, then downsample for smooth edges


def draw(size: int = 128) -> Image.Image:
    s = size * SCALE
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple:
        return (x0 * s, y0 * s, x1 * s, y1 * s)

    d.rounded_rectangle(box(0.03, 0.03, 0.97, 0.97), radius=0.18 * s, fill=(24, 62, 112, 255))
    d.rounded_rectangle(box(0.12, 0.12, 0.88, 0.74), radius=0.12 * s, fill=(245, 247, 250, 255))
    d.polygon([(0.26 * s, 0.72 * s), (0.44 * s, 0.72 * s), (0.22 * s, 0.90 * s)], fill=(245, 247, 250, 255))
    d.ellipse(box(0.22, 0.18, 0.78, 0.68), fill=(70, 70, 74, 255))
    d.ellipse(box(0.30, 0.28, 0.47, 0.58), fill=(25, 25, 28, 255))
    d.ellipse(box(0.53, 0.28, 0.70, 0.58), fill=(25, 25, 28, 255))
    d.ellipse(box(0.555, 0.33, 0.675, 0.52), fill=(80, 200, 120, 230))
    d.rectangle(box(0.27, 0.25, 0.50, 0.61), outline=(255, 160, 30, 255), width=int(0.035 * s))
    return image.resize((size, size), Image.LANCZOS)


def main() -> None:
    icon = draw()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target)
        print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
