"""Draw the extension and module icons (a stylised head with contoured structures); run once, commit the PNGs.

    python Resources/make_icons.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SCALE = 4  # draw large, then downsample for smooth edges
SIZE = 128

# Colors from the structure catalogue (structures.py), so the icon shows what the module draws.
BONE = (230, 220, 190)
MANDIBLE = (180, 165, 130)
BRAIN = (250, 250, 225)
TEMPORAL = ((240, 150, 200), (170, 110, 230))
EYE = ((130, 210, 255), (40, 110, 220))
LENS = ((0, 255, 230), (0, 170, 140))
BRAINSTEM = (200, 130, 60)
CORD = (240, 220, 80)
PAROTID = ((255, 140, 0), (210, 90, 0))
GTV = (255, 0, 0)
OUTLINE = (40, 48, 64)


def _box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    s = SCALE
    return ((cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s)


def draw_head(background: bool) -> Image.Image:
    """A frontal head and neck with brain, eyes, lenses, brainstem, cord, parotids and a tumour."""
    s = SCALE
    img = Image.new("RGBA", (SIZE * s, SIZE * s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    w = 3 * s
    if background:
        d.rounded_rectangle((2 * s, 2 * s, 126 * s, 126 * s), radius=22 * s, fill=(28, 44, 72, 255))
    # neck and skull
    d.rounded_rectangle(_box(64, 108, 18, 18), radius=8 * s, fill=BONE + (255,), outline=OUTLINE, width=w)
    d.ellipse(_box(64, 52, 42, 44), fill=BONE + (255,), outline=OUTLINE, width=w)
    # mandible
    d.arc(_box(64, 78, 30, 20), start=20, end=160, fill=MANDIBLE + (255,), width=5 * s)
    # brain above the eyes, temporal lobes at its sides (patient's left on the image right)
    d.ellipse(_box(64, 34, 33, 24), fill=BRAIN + (255,), outline=OUTLINE, width=2 * s)
    d.ellipse(_box(33, 52, 9, 11), fill=TEMPORAL[1] + (255,), outline=OUTLINE, width=2 * s)
    d.ellipse(_box(95, 52, 9, 11), fill=TEMPORAL[0] + (255,), outline=OUTLINE, width=2 * s)
    # eyes with lenses
    for cx, side in ((48, 1), (80, 0)):
        d.ellipse(_box(cx, 60, 9, 9), fill=EYE[side] + (255,), outline=OUTLINE, width=2 * s)
        d.ellipse(_box(cx, 60, 3.5, 3.5), fill=LENS[side] + (255,), outline=OUTLINE, width=s)
    # brainstem and spinal cord
    d.rounded_rectangle(_box(64, 50, 5, 12), radius=4 * s, fill=BRAINSTEM + (255,), outline=OUTLINE, width=2 * s)
    d.rounded_rectangle(_box(64, 106, 4, 18), radius=4 * s, fill=CORD + (255,), outline=OUTLINE, width=2 * s)
    # parotid glands
    d.ellipse(_box(27, 80, 7, 11), fill=PAROTID[1] + (255,), outline=OUTLINE, width=2 * s)
    d.ellipse(_box(101, 80, 7, 11), fill=PAROTID[0] + (255,), outline=OUTLINE, width=2 * s)
    # primary tumour in the nasopharynx
    d.ellipse(_box(64, 77, 8, 7), fill=GTV + (255,), outline=OUTLINE, width=2 * s)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    targets = {
        ROOT / "Resources" / "Icons" / "SegRapExtension.png": True,
        ROOT / "SegRapSegmenter" / "Resources" / "Icons" / "SegRapSegmenter.png": False,
    }
    for path, background in targets.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_head(background).save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
