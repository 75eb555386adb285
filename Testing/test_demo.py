"""`segrap demo`'s summary: structures found, mean DSC, the empty ones in one line, the table on request."""

from __future__ import annotations

from SegRapSegmenterLib import demo
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.anatomy.qa import EMPTY_WARNING


def _scores(empty=()) -> demo.DemoScores:
    dsc = {n: (0.0 if n in empty else 0.9) for n in S.STRUCTURE_NAMES}
    voxels = {n: (0 if n in empty else 100) for n in S.STRUCTURE_NAMES}
    return demo.DemoScores(dsc, voxels)


def test_all_found_is_three_short_lines_without_a_table():
    lines = demo.summary_lines(_scores())
    assert lines[0] == "structures found: 47 of 47"
    assert "OARs 0.900, GTVs 0.900" in lines[1]
    assert not any(line.startswith("empty") for line in lines) and len(lines) == 3


def test_empty_structures_are_listed_in_one_line_in_catalogue_order():
    lines = demo.summary_lines(_scores(empty=("Cochlea_R", "Lens_L")))
    assert lines[0] == "structures found: 45 of 47"
    assert "empty (2): Lens_L, Cochlea_R" in lines
    assert "lowest: Lens_L 0.00, Cochlea_R 0.00" in lines[1]


def test_details_add_one_row_per_structure():
    lines = demo.summary_lines(_scores(empty=("Chiasm",)), details=True)
    rows = [line for line in lines if line.split()[0] in S.STRUCTURE_NAMES]
    assert [r.split()[0] for r in rows] == list(S.STRUCTURE_NAMES)
    assert next(r for r in rows if r.startswith("Chiasm ")).split()[1:] == ["0", "0.000"]


def test_the_progress_printer_drops_only_the_per_structure_empty_warnings():
    seen = []
    show = demo._without_empty_warnings(seen.append)
    show({"event": "warning", "message": f"Lens_L: {EMPTY_WARNING}"})
    show({"event": "warning", "message": "Parotid_L: lies on the patient's right of Parotid_R"})
    show({"event": "progress", "fraction": 0.5})
    assert [e.get("message") for e in seen] == ["Parotid_L: lies on the patient's right of Parotid_R", None]
