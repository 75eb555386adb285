"""The panel (SegRapSegmenterLib.slicer_bridge.widget) against facts of CTK's and Slicer's source: an emptied
"Python executable" field must reach the parameter node, and an error is shown once.

Slicer builds CTK at a pinned commit: dd4caeae7e979cf441e44ee85d3b0780120d113d in 5.10
(SuperBuild/External_CTK.cmake v5.10.0:74) and 5056664a20a3d0a393bb6d91f040525581e0dcdf in 5.12
(v5.12.0:81). At both, ``ctkPathLineEdit`` gives its line edit a validator whose pattern comes from
``ctk::nameFiltersToRegularExpression(NameFilters)`` (Libs/Widgets/ctkPathLineEdit.cpp dd4caea:488,
5056664:393), and that pattern is ".+" when there are no name filters (Libs/Core/ctkUtils.cpp
dd4caea:181, 5056664:177). Every text change runs ``updateHasValidInput`` (ctkPathLineEdit.cpp
dd4caea:392-393 and 5056664:297-298 connect it to textChanged; the slot is at dd4caea:825-850,
5056664:730-755), which
emits ``currentPathChanged`` only when the text is acceptable (dd4caea:831 and :840, 5056664:736 and
:745) and ``validInputChanged(bool)`` when acceptability flips (dd4caea:842-845, 5056664:747-750).
So an emptied field emits validInputChanged(false) and no currentPathChanged. The model below
encodes that; widgets cannot be created headless (PythonQt needs the application), so the panel's
connections are read from its source. Standard library only.
"""

from __future__ import annotations

import ast
import re
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
WIDGET_FILE = MODULE_DIR / "SegRapSegmenterLib" / "slicer_bridge" / "widget.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegRapSegmenter.ui"
PATH_EDIT = "pythonExecutablePathLineEdit"
CURRENT_PATH_CHANGED, VALID_INPUT_CHANGED = "currentPathChanged(QString)", "validInputChanged(bool)"


def validator_pattern(name_filters: list[str]) -> str:
    """ctkUtils.cpp's nameFiltersToRegExpPattern (dd4caea:157-191) for plain "*.ext" filters; ".+" without filters.

    Each "*.ext" becomes ".*\\.ext?$" (extensionToRegExp, dd4caea:141-151), joined with "|" in parentheses.
    """
    extensions = [r".*\." + m.group(1) + "?$" for f in name_filters if (m := re.fullmatch(r"\*\.(\w+)", f))]
    return "(" + "|".join(extensions) + ")" if extensions else ".+"


def path_edit_signals(old_text: str, new_text: str, name_filters: list[str] | None = None) -> list[str]:
    """What ctkPathLineEdit emits when its text goes from ``old_text`` to ``new_text`` (updateHasValidInput)."""
    pattern = re.compile(validator_pattern(name_filters or []))
    was, now = bool(pattern.fullmatch(old_text)), bool(pattern.fullmatch(new_text))
    signals = [CURRENT_PATH_CHANGED] if now else []
    if now != was:
        signals.append(VALID_INPUT_CHANGED)
    return signals


def connected_signals(source: str, widget_name: str) -> set[str]:
    """The signals the source connects on ``<...>.widget_name``: string constants, or a loop over a module-level tuple."""
    tree = ast.parse(source)
    constants = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Tuple)}
    loops = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Name):
            loops[node.target.id] = constants.get(node.iter.id, ())
    found = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Attribute) and owner.attr == widget_name) or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.add(first.value)
        elif isinstance(first, ast.Name):
            found.update(loops.get(first.id, ()))
    return found


def path_edit_name_filters(ui_text: str, widget_name: str) -> list[str]:
    """The nameFilters a .ui sets on a ctkPathLineEdit (none when the property is absent)."""
    for widget in ET.fromstring(ui_text).iter("widget"):
        if widget.get("name") == widget_name:
            prop = next((p for p in widget.findall("property") if p.get("name") == "nameFilters"), None)
            return [s.text or "" for s in prop.iter("string")] if prop is not None else []
    raise AssertionError(f"{widget_name} is not in the .ui")


class PythonExecutableFieldTest(unittest.TestCase):
    """Clearing the field ("" = Slicer's own Python) reaches the parameter node."""

    @classmethod
    def setUpClass(cls):
        cls.source = WIDGET_FILE.read_text(encoding="utf-8")
        cls.filters = path_edit_name_filters(UI_FILE.read_text(encoding="utf-8"), PATH_EDIT)

    def test_the_model_follows_ctk_an_emptied_field_emits_only_valid_input_changed(self):
        self.assertEqual(self.filters, [], "the .ui sets name filters: the validator is no longer '.+'")
        self.assertEqual(path_edit_signals("/opt/env/bin/python", ""), [VALID_INPUT_CHANGED])
        self.assertEqual(path_edit_signals("", "/opt/env/bin/python"), [CURRENT_PATH_CHANGED, VALID_INPUT_CHANGED])
        self.assertEqual(path_edit_signals("/a/python", "/b/python"), [CURRENT_PATH_CHANGED])
        self.assertEqual(path_edit_signals("a.py", "a.txt", ["*.py"]), [VALID_INPUT_CHANGED])

    def test_the_panel_hears_the_field_being_cleared(self):
        connected = connected_signals(self.source, PATH_EDIT)
        self.assertIn(CURRENT_PATH_CHANGED, connected)
        heard = set(path_edit_signals("/opt/env/bin/python", "", self.filters)) & connected
        self.assertTrue(heard, f"clearing emits {path_edit_signals('/opt/env/bin/python', '')}; the panel connects "
                               f"only {sorted(connected)}")

    def test_the_handler_reads_the_text_not_the_signals_argument(self):
        # validInputChanged carries a bool: the path must come from the widget itself
        tree = ast.parse(self.source)
        handler = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_onPythonPathEdited")
        reads = {n.attr for n in ast.walk(handler) if isinstance(n, ast.Attribute)}
        self.assertIn("currentPath", reads)
        self.assertIn("pythonExecutable", reads)

    def test_the_connection_reader_sees_a_plain_and_a_looped_connect(self):
        source = ("SIGNALS = ('a(int)', 'b(bool)')\n"
                  "def f(ui):\n    ui.edit.connect('c()', g)\n    for s in SIGNALS:\n        ui.edit.connect(s, g)\n"
                  "    ui.other.connect('d()', g)\n")
        self.assertEqual(connected_signals(source, "edit"), {"a(int)", "b(bool)", "c()"})


class ErrorDialogTest(unittest.TestCase):
    """slicer.util.tryWithErrorDisplay shows its dialog and raises again (Base/Python/slicer/util.py
    v5.10.0:3368-3409, ``raise`` at :3409; v5.12.0:3548-3589, :3589): code after the ``with`` block
    never runs on an error (the old Send left its temp folder behind), and the exception reaches the
    Qt slot. The panel catches, shows one dialog and cleans up itself."""

    def test_the_panel_does_not_rely_on_try_with_error_display(self):
        source = WIDGET_FILE.read_text(encoding="utf-8")
        used = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute) and n.attr == "tryWithErrorDisplay"]
        self.assertEqual(used, [])


if __name__ == "__main__":
    unittest.main()
