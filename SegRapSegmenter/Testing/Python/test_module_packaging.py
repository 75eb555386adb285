"""The Slicer module is packaged completely and stays thin (runs under pytest and Slicer's test runner).

A Slicer build installs only the files SegRapSegmenter/CMakeLists.txt lists, so a forgotten file
means a broken extension that works from the source tree. Standard library only.
"""

from __future__ import annotations

import ast
import re
import subprocess
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]  # SegRapSegmenter/
MODULE_NAME = MODULE_DIR.name
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
WIDGET_FILE = MODULE_DIR / "SegRapSegmenterLib" / "slicer_bridge" / "widget.py"  # the panel
SELFTEST_FILE = MODULE_DIR / "SegRapSegmenterLib" / "slicer_bridge" / "selftest.py"
MAX_MODULE_FILE_LINES = 150
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
IMAGE_PROCESSING_PACKAGES = {"numpy", "SimpleITK", "scipy", "skimage", "nibabel", "torch", "nnunetv2", "cv2"}
EXCLUDED_DIRS = {"Testing", "__pycache__"}


def _is_packaged_candidate(rel: Path) -> bool:
    """Files of the module that a Slicer build must install (not tests, caches or build metadata)."""
    parts = rel.parts
    if parts[0] in EXCLUDED_DIRS or any(p == "__pycache__" or p.endswith(".egg-info") for p in parts):
        return False
    if any(p.startswith(".") for p in parts) or rel.suffix == ".pyc":
        return False
    return rel != Path("CMakeLists.txt")


def module_files() -> list[Path]:
    """Module files relative to SegRapSegmenter/: git's view (tracked + new, not ignored), else a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "."],
                             cwd=MODULE_DIR, capture_output=True, text=True, check=True).stdout
        files = [Path(line) for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. a source tarball)
        files = [p.relative_to(MODULE_DIR) for p in MODULE_DIR.rglob("*") if p.is_file()]
    return sorted(f for f in files if (MODULE_DIR / f).is_file() and _is_packaged_candidate(f))


def cmake_list(variable: str, text: str | None = None) -> list[str]:
    """Entries of ``set(<variable> ...)`` in the module's CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = CMAKE_FILE.read_text(encoding="utf-8") if text is None else text
    text = re.sub(r"#[^\n]*", "", text)
    found = re.findall(rf"\bset\(\s*{re.escape(variable)}\s+([^)]*)\)", text)
    if len(found) != 1:
        raise AssertionError(f"expected one set({variable} ...) in {CMAKE_FILE}, found {len(found)}")
    names = {"MODULE_NAME": re.search(r"\bset\(\s*MODULE_NAME\s+(\S+)\s*\)", text).group(1)}
    return [re.sub(r"\$\{(\w+)\}", lambda m: names[m.group(1)], token) for token in found[0].split()]


def _ui_widgets() -> list[ET.Element]:
    return list(ET.parse(UI_FILE).getroot().iter("widget"))


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


class ModulePackagingTest(unittest.TestCase):
    """Everything the module needs is listed in its CMakeLists.txt, and everything listed exists."""

    def test_every_python_file_is_listed_as_a_script(self):
        scripts = cmake_list("MODULE_PYTHON_SCRIPTS")
        missing = [str(f.as_posix()) for f in module_files() if f.suffix == ".py" and f.as_posix() not in scripts]
        self.assertEqual(missing, [], f"add these to MODULE_PYTHON_SCRIPTS in {CMAKE_FILE}")

    def test_every_resource_file_is_listed_as_a_resource(self):
        resources = cmake_list("MODULE_PYTHON_RESOURCES")
        missing = [f.as_posix() for f in module_files() if f.suffix != ".py" and f.as_posix() not in resources]
        self.assertEqual(missing, [], f"add these to MODULE_PYTHON_RESOURCES in {CMAKE_FILE}")

    def test_every_listed_file_exists_once(self):
        for variable, python in (("MODULE_PYTHON_SCRIPTS", True), ("MODULE_PYTHON_RESOURCES", False)):
            entries = cmake_list(variable)
            self.assertEqual(len(entries), len(set(entries)), f"duplicates in {variable}")
            for entry in entries:
                self.assertTrue((MODULE_DIR / entry).is_file(), f"{variable} lists {entry}, which does not exist")
                self.assertEqual(entry.endswith(".py"), python, f"{entry} is in the wrong list ({variable})")
        self.assertIn(f"{MODULE_NAME}.py", cmake_list("MODULE_PYTHON_SCRIPTS"))

    def test_slicer_side_unittests_are_registered(self):
        registered = cmake_list("MODULE_PYTHON_TESTS")
        for entry in registered:
            self.assertTrue((MODULE_DIR / entry).is_file(), f"MODULE_PYTHON_TESTS lists {entry}, which does not exist")
        for path in sorted((MODULE_DIR / "Testing" / "Python").glob("test_*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            has_testcase = any(isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Attribute) and b.attr.endswith("TestCase"))
                or (isinstance(b, ast.Name) and b.id.endswith("TestCase")) for b in node.bases)
                for node in ast.walk(tree))
            if has_testcase:
                rel = path.relative_to(MODULE_DIR).as_posix()
                self.assertIn(rel, registered, f"{rel} has unittest classes: add it to MODULE_PYTHON_TESTS")

    def test_cmake_parser_sees_additions_and_comments(self):
        text = "set(MODULE_NAME Foo)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py # main\n  Lib/a.py\n  )\n"
        self.assertEqual(cmake_list("MODULE_PYTHON_SCRIPTS", text), ["Foo.py", "Lib/a.py"])

    def test_module_file_and_library_are_found(self):
        files = {f.as_posix() for f in module_files()}
        self.assertIn(f"{MODULE_NAME}.py", files)
        self.assertIn("SegRapSegmenterLib/__init__.py", files)
        self.assertFalse(any(f.startswith("Testing/") for f in files))


class ModuleUiTest(unittest.TestCase):
    """The panel file parses and has every widget and parameter the module file uses."""

    def test_ui_file_is_qt_designer_xml_for_the_module(self):
        root = ET.parse(UI_FILE).getroot()
        self.assertEqual(root.tag, "ui")
        self.assertEqual(root.findtext("class"), MODULE_NAME)
        self.assertEqual(root.find("widget").get("class"), "qMRMLWidget")
        declared = {c.findtext("class") for c in root.iter("customwidget")}
        used = {w.get("class") for w in _ui_widgets()}
        self.assertLessEqual({c for c in used if c.startswith(("q", "ctk"))}, declared)

    def test_widget_names_are_unique(self):
        names = [w.get("name") for w in _ui_widgets()]
        self.assertEqual(len(names), len(set(names)), "duplicate objectName in the .ui file")

    def test_every_widget_the_panel_and_self_test_use_is_in_the_ui(self):
        names = {w.get("name") for w in _ui_widgets()}
        for path in (MODULE_FILE, WIDGET_FILE, SELFTEST_FILE):
            used = set(re.findall(r"\bui\.(\w+)", path.read_text(encoding="utf-8")))
            if path is WIDGET_FILE:
                self.assertGreater(len(used), 10)
            self.assertEqual(sorted(used - names), [], f"widgets used by {path.name} but missing in the .ui")

    def test_node_selectors_follow_the_scene(self):
        root = ET.parse(UI_FILE).getroot()
        selectors = {w.get("name") for w in _ui_widgets() if w.get("class") == "qMRMLNodeComboBox"}
        connected = {c.findtext("receiver") for c in root.iter("connection")
                     if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
        self.assertTrue(selectors)
        self.assertEqual(selectors, connected)


class ModuleFileIsThinTest(unittest.TestCase):
    """The module file wires the GUI; image processing belongs to SegRapSegmenterLib."""

    def test_no_image_processing_imports(self):
        imported = set()
        for node in ast.walk(_module_tree()):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        self.assertEqual(sorted(imported & IMAGE_PROCESSING_PACKAGES), [])
        self.assertIn("slicer", imported)

    def test_module_file_keeps_to_metadata_a_widget_shell_and_the_self_test_entry(self):
        lines = MODULE_FILE.read_text(encoding="utf-8").splitlines()
        self.assertLessEqual(len(lines), MAX_MODULE_FILE_LINES, "the panel belongs in slicer_bridge/widget.py")
        top = {n.name for n in _module_tree().body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        self.assertNotIn("SegRapSegmenterParameterNode", top, "the parameter node lives in slicer_bridge/parameters.py")

    def test_module_defines_the_slicer_classes(self):
        classes = {n.name for n in _module_tree().body if isinstance(n, ast.ClassDef)}
        for suffix in ("", "Widget", "Logic", "Test"):
            self.assertIn(MODULE_NAME + suffix, classes)


if __name__ == "__main__":
    unittest.main()
