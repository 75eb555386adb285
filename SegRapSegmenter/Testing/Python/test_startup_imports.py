"""What Slicer imports when it discovers the module at start-up stays light and runs on any Slicer.

Slicer imports every scripted module's file at each start to read its title and category, long
before anyone opens the panel. The module file's top-level imports of our package must therefore
load no numpy, SimpleITK, scipy or torch (seconds of start-up for everyone, and torch is not even
in a fresh Slicer), must parse on an older Slicer's Python (3.9 in 5.0 to 5.8) and import only
what Slicer 5.0 has, so that the module can tell the user it needs 5.10 instead of failing to load.
Slicer's own modules (qt, slicer, vtk) are not checked: they are loaded by Slicer anyway.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
MODULE_FILE = MODULE_DIR / "SegRapSegmenter.py"
LIBRARY = "SegRapSegmenterLib"
HEAVY = ("numpy", "SimpleITK", "scipy", "torch")


def top_level_library_imports(source: str) -> list[str]:
    """Modules of our package that a module's source imports at top level (not inside functions)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == LIBRARY:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == LIBRARY]
    return names


def heavy_modules_after_importing(modules: list[str]) -> list[str]:
    """Import ``modules`` in a fresh interpreter; which of HEAVY are in its sys.modules afterwards."""
    code = ("import json, sys\n"
            f"for name in {modules!r}:\n"
            "    __import__(name)\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"importing {modules} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def library_files(modules: list[str]) -> list[Path]:
    """Source files of those modules and of the packages above them."""
    files = set()
    for name in modules:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            base = MODULE_DIR.joinpath(*parts[:i])
            files.add(base / "__init__.py" if base.is_dir() else base.with_suffix(".py"))
    return sorted(files)


class StartupImportTest(unittest.TestCase):
    """The module file's top-level imports of SegRapSegmenterLib, imported in a subprocess."""

    @classmethod
    def setUpClass(cls):
        cls.modules = top_level_library_imports(MODULE_FILE.read_text(encoding="utf-8"))

    def test_the_module_file_imports_the_library_at_start_up(self):
        self.assertTrue(self.modules, "no top-level import of SegRapSegmenterLib found: the check would be empty")

    def test_start_up_imports_load_no_numpy_simpleitk_scipy_or_torch(self):
        self.assertEqual(heavy_modules_after_importing(self.modules), [])

    def test_the_check_sees_a_heavy_import(self):
        self.assertIn("numpy", heavy_modules_after_importing([f"{LIBRARY}.arrays"]))

    def test_start_up_files_parse_with_python_3_9(self):
        files = [MODULE_FILE, *library_files(self.modules)]
        self.assertGreaterEqual(len(files), 3)
        for path in files:
            with self.subTest(path=path.name):
                ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))

    def test_the_parse_check_rejects_newer_syntax(self):
        with self.assertRaises(SyntaxError):
            ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


# none ships with Slicer 5.10 or 5.12 (scipy does: SuperBuild/External_python-scipy.cmake v5.10.0:40, v5.12.0:44)
NOT_IN_SLICER = ("nrrd", "torch", "nnunetv2", "psutil", "pynetdicom")


def run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` raises ImportError."""
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120,
                          env=env)


class BareSlicerTest(unittest.TestCase):
    """The self-test's torch-free parts (terminology, panel lists) need only what Slicer itself ships,
    as on Slicer's extension build servers."""

    def test_catalogue_terminology_and_bundle_list_work_without_pynrrd_psutil_or_torch(self):
        proc = run_without(NOT_IN_SLICER, (
            "from SegRapSegmenterLib.anatomy import structures, terminology\n"
            "from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic\n"
            "assert len(structures.STRUCTURES) == 47\n"
            "assert terminology.terminology_entry('Parotid_L')\n"
            "choices = SegmentationLogic.bundleChoices()\n"
            "print(sorted(choices), [SegmentationLogic.describeBundle(b)[:20] for b in choices.values()])\n"))
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_the_block_works(self):
        proc = run_without(("torch",), "import torch\n")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("ModuleNotFoundError: import of torch halted", proc.stderr)


# The Python modules of the slicer package in Slicer 5.0 and 5.2 (Base/Python/slicer/ at v5.0.3 and v5.2.2:
# ScriptedLoadableModule.py, cli.py, logic.py, slicerqt.py, testing.py, util.py); parameterNodeWrapper/
# first appears at v5.4.0. Compiled modules (qt, vtk, MRML classes) come from the application.
OLD_SLICER_PYTHON_MODULES = ("slicer", "slicer.ScriptedLoadableModule", "slicer.cli", "slicer.logic",
                             "slicer.slicerqt", "slicer.testing", "slicer.util")


def top_level_slicer_imports(source: str) -> list[str]:
    """Modules of the ``slicer`` package a source imports at top level (``from slicer import X`` counts as slicer)."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "slicer":
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "slicer"]
    return names


class OldSlicerStartupTest(unittest.TestCase):
    """On Slicer 5.2 or older the module file imports, so the panel can say that 5.10 is needed."""

    def test_start_up_files_import_only_what_slicer_5_0_has(self):
        files = [MODULE_FILE, *library_files(top_level_library_imports(MODULE_FILE.read_text(encoding="utf-8")))]
        for path in files:
            with self.subTest(path=path.name):
                imported = top_level_slicer_imports(path.read_text(encoding="utf-8"))
                self.assertEqual([m for m in imported if m not in OLD_SLICER_PYTHON_MODULES], [],
                                 f"{path.name} imports at start-up what Slicer 5.0-5.2 lacks")

    def test_the_check_sees_the_parameter_node_wrapper(self):
        source = "from slicer.parameterNodeWrapper import Choice\nimport slicer.util\n"
        self.assertEqual(top_level_slicer_imports(source), ["slicer.parameterNodeWrapper", "slicer.util"])


class SlicerVersionTest(unittest.TestCase):
    """The module runs on Slicer 5.10 and later and says so plainly on an older one (slicer_bridge.compat)."""

    def test_supported_releases_are_accepted(self):
        from SegRapSegmenterLib.slicer_bridge import compat

        for version in ((5, 10), (5, 12), (5, 13), (6, 0)):
            self.assertIsNone(compat.version_problem(*version), version)
        self.assertEqual([r.version for r in compat.SUPPORTED_RELEASES], ["5.10", "5.12"])
        self.assertEqual({r.python.rsplit(".", 1)[0] for r in compat.SUPPORTED_RELEASES}, {"3.12"})

    def test_an_older_slicer_gets_a_plain_message(self):
        from SegRapSegmenterLib.slicer_bridge import compat

        for major, minor in ((5, 8), (5, 6), (4, 11)):
            message = compat.version_problem(major, minor)
            self.assertIn("needs 3D Slicer 5.10 or later", message)
            self.assertIn(f"this is Slicer {major}.{minor}", message)

    def test_outside_the_application_no_version_is_claimed(self):
        from SegRapSegmenterLib.slicer_bridge import compat

        import slicer

        if hasattr(slicer, "app"):
            self.assertEqual(compat.running_slicer_version(), (slicer.app.majorVersion, slicer.app.minorVersion))
        else:
            self.assertIsNone(compat.running_slicer_version())
            self.assertIsNone(compat.running_slicer_problem())


if __name__ == "__main__":
    unittest.main()
