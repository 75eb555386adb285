"""Draw a mock-up of the SegRapSegmenter panel from its .ui file (the real widget layout), labeled as a mock-up.

Stands in for a screenshot until one is taken in Slicer:

    python Resources/make_panel_mockup.py   # writes Resources/Screenshots/SegRapSegmenter-panel.png
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "SegRapSegmenter" / "Resources" / "UI" / "SegRapSegmenter.ui"
OUT = ROOT / "Resources" / "Screenshots" / "SegRapSegmenter-panel.png"
WIDTH, MARGIN, ROW, LABEL_W = 600, 10, 30, 160
FONT = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 13)
BOLD = ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans", weight="bold")), 13)
BG, PANEL, LINE, TEXT, GREY, ACCENT = "#f3f3f3", "#ffffff", "#9a9a9a", "#202020", "#8a8a8a", "#3874d8"

# What the mock-up shows in the selectors (example values, not real data).
EXAMPLE_TEXT = {"ctVolumeSelector": "segrap_0000 CT", "contrastCtVolumeSelector": "segrap_0000 contrast CT",
                "exportSegmentationSelector": "segrap_0000 segmentation", "modelBundleComboBox": "(none installed)"}


def _props(w: ET.Element) -> dict[str, str]:
    out = {}
    for p in w.findall("property"):
        value = next(iter(p), None)
        out[p.get("name")] = "" if value is None else (value.text or "")
    return out


class Painter:
    """Lays the .ui widgets out top to bottom, the way Qt's form and box layouts would."""

    def __init__(self, height: int):
        self.img = Image.new("RGB", (WIDTH, height), BG)
        self.d = ImageDraw.Draw(self.img)
        self.y = MARGIN

    def text(self, x, y, s, font=FONT, fill=TEXT):
        self.d.text((x, y), s, font=font, fill=fill)
        return self.d.textlength(s, font=font)

    def box(self, x0, y0, x1, y1, fill=PANEL, outline=LINE, radius=3):
        self.d.rounded_rectangle((x0, y0, x1, y1), radius=radius, fill=fill, outline=outline)

    def field(self, w: ET.Element, x0: int, x1: int, y: int) -> int:
        """Draw one widget in [x0, x1] at y; returns the height used."""
        cls, name, p = w.get("class"), w.get("name"), _props(w)
        h = ROW - 6
        if cls in ("qMRMLNodeComboBox", "QComboBox"):
            shown = EXAMPLE_TEXT.get(name) or p.get("noneDisplay") or next(
                (i.find("property/string").text for i in w.findall("item")), "")
            self.box(x0, y, x1, y + h)
            self.text(x0 + 6, y + 4, shown)
            self.d.polygon([(x1 - 16, y + 9), (x1 - 6, y + 9), (x1 - 11, y + 15)], fill=TEXT)
        elif cls == "QCheckBox":
            self.box(x0, y + 5, x0 + 14, y + 19, radius=2)
            if p.get("checked") == "true":
                self.d.line([(x0 + 3, y + 12), (x0 + 6, y + 16), (x0 + 12, y + 7)], fill=ACCENT, width=2)
            self.text(x0 + 20, y + 4, p.get("text", ""))
        elif cls == "QRadioButton":
            self.d.ellipse((x0, y + 5, x0 + 14, y + 19), fill=PANEL, outline=LINE)
            if p.get("checked") == "true":
                self.d.ellipse((x0 + 4, y + 9, x0 + 10, y + 15), fill=ACCENT)
            self.text(x0 + 20, y + 4, p.get("text", ""))
        elif cls == "QPushButton":
            self.box(x0, y, x1, y + h, fill="#e8e8e8")
            label = p.get("text", "")
            tw = self.d.textlength(label, font=BOLD if name == "applyButton" else FONT)
            self.text((x0 + x1 - tw) / 2, y + 4, label, BOLD if name == "applyButton" else FONT,
                      GREY if p.get("enabled") == "false" else TEXT)
        elif cls in ("QLineEdit", "ctkPathLineEdit"):
            right = x1 - 30 if cls == "ctkPathLineEdit" else x1
            self.box(x0, y, right, y + h)
            self.text(x0 + 6, y + 4, p.get("placeholderText", ""), fill=GREY)
            if cls == "ctkPathLineEdit":
                self.box(right + 4, y, x1, y + h, fill="#e8e8e8")
                self.text(right + 10, y + 3, "...")
        elif cls == "QLabel":
            self.text(x0, y + 4, p.get("text", ""), fill=GREY)
        elif cls == "QProgressBar":
            self.box(x0, y + 2, x1, y + h - 2)
            self.text((x0 + x1) / 2 - 10, y + 4, "0%")
        elif cls == "QTreeWidget":
            return self.tree(x0, x1, y)
        elif cls == "QPlainTextEdit":
            self.box(x0, y, x1, y + 60)
            return 64
        elif cls == "QWidget":
            return self.container(w, x0, x1, y)
        return ROW

    def tree(self, x0, x1, y) -> int:
        sys.path.insert(0, str(ROOT / "SegRapSegmenter"))
        from SegRapSegmenterLib.anatomy import structures

        groups: dict[str, list[str]] = {}
        for s in structures.STRUCTURES:
            groups.setdefault(s.group, []).append(s.display_name)
        lines = []
        for group, members in groups.items():
            lines.append(("v " + f"{group} ({len(members)})", 0))
            if not lines[1:]:  # the first group open, the others collapsed
                lines += [(m, 1) for m in members[:4]] + [("...", 1)]
        height = 18 * len(lines) + 8
        self.box(x0, y, x1, y + height, fill="#fafafa", outline="#c8c8c8")
        for i, (line, depth) in enumerate(lines):
            yy = y + 4 + 18 * i
            if depth:
                self.box(x0 + 26, yy + 3, x0 + 37, yy + 14, radius=2)
                self.d.line([(x0 + 28, yy + 9), (x0 + 31, yy + 12), (x0 + 35, yy + 5)], fill=GREY, width=2)
                self.text(x0 + 42, yy, line, fill=GREY)
            else:
                self.text(x0 + 8, yy, line.replace("v ", "> ", 1) if i else line, fill=GREY)
        return height + 4

    def container(self, w: ET.Element, x0, x1, y) -> int:
        lay = w.find("layout")
        children = [it.find("widget") for it in lay.findall("item") if it.find("widget") is not None]
        if lay.get("class") == "QHBoxLayout":
            widths = [self._natural_width(c) for c in children]
            stretch = max(0, (x1 - x0 - sum(widths) - 6 * (len(children) - 1)))
            grow = [c.get("class") in ("QProgressBar",) for c in children]
            extra = stretch / max(1, sum(grow)) if any(grow) else 0
            x, used = x0, 0
            for c, cw, g in zip(children, widths, grow):
                cw = cw + (extra if g else 0)
                used = max(used, self.field(c, int(x), int(x + cw), y))
                x += cw + 6
            return used
        used = 0
        for c in children:
            used += self.field(c, x0, x1, y + used)
        return used

    def _natural_width(self, w: ET.Element) -> int:
        p = _props(w)
        base = self.d.textlength(p.get("text", ""), font=FONT)
        return int(base + {"QPushButton": 20, "QCheckBox": 26, "QRadioButton": 26}.get(w.get("class"), 10))

    def section(self, w: ET.Element) -> None:
        p = _props(w)
        header = f"v  {p.get('text', '')}"
        self.box(MARGIN, self.y, WIDTH - MARGIN, self.y + 24, fill="#e3e3e3")
        self.text(MARGIN + 8, self.y + 4, header, BOLD)
        self.y += 30
        lay = w.find("layout")
        rows: dict[int, dict[int, ET.Element]] = {}
        for it in lay.findall("item"):
            child = it.find("widget")
            rows.setdefault(int(it.get("row", len(rows))), {})[int(it.get("column", 1))] = child
        for _, cols in sorted(rows.items()):
            label = cols.get(0)
            if label is not None and label.get("class") == "QLabel":
                self.text(MARGIN + 8, self.y + 4, _props(label).get("text", ""))
                self.y += self.field(cols[1], MARGIN + LABEL_W, WIDTH - MARGIN - 6, self.y)
            else:
                self.y += self.field(next(iter(cols.values())), MARGIN + 8, WIDTH - MARGIN - 6, self.y)
        self.y += 6


def draw(height: int = 1400) -> tuple[Image.Image, int]:
    """Paint every top-level item of the panel; returns the image and the height used."""
    root = ET.parse(UI_FILE).getroot()
    painter = Painter(height)
    painter.text(MARGIN, painter.y, "SegRap Segmenter", BOLD)
    painter.y += 20
    painter.text(MARGIN, painter.y, "Mock-up drawn from SegRapSegmenter.ui, not a screenshot "
                 "(all sections expanded)", fill="#b03030")
    painter.y += 26
    for it in root.find("widget/layout").findall("item"):
        w = it.find("widget")
        if w is None:
            continue
        if w.get("class") == "ctkCollapsibleButton":
            painter.section(w)
        else:
            painter.y += painter.field(w, MARGIN, WIDTH - MARGIN, painter.y) + 4
    return painter.img, painter.y + MARGIN


def main() -> None:
    _, height = draw()
    img, _ = draw(height)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    img.save(OUT, optimize=True)
    print(OUT, img.size)


if __name__ == "__main__":
    main()
