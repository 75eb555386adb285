"""Dependency checks and install plans (SegRapSegmenterLib.slicer_bridge.dependencies): what the worker's Python has, and pip
arguments that pin what is installed while holding Slicer's own packages where they are."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from SegRapSegmenterLib.slicer_bridge import dependencies as D


class ProbeTest(unittest.TestCase):
    """The probe asks a Python in a subprocess, so nothing heavy is imported into Slicer."""

    @classmethod
    def setUpClass(cls):
        cls.probe = D.probe_python(sys.executable)

    def test_this_environment_has_everything_the_worker_imports(self):
        self.assertIsNone(self.probe.error)
        self.assertEqual(self.probe.missing, [])
        self.assertTrue(self.probe.ready)
        self.assertEqual(set(self.probe.packages), set(D.WORKER_IMPORTS))
        self.assertRegex(self.probe.packages["nnunetv2"], r"^\d+\.\d+")  # a version, found through metadata

    def test_device_text_names_the_gpus_or_says_the_cpu_is_used(self):
        text = self.probe.device_text()
        if self.probe.devices:
            self.assertIn("cuda", text)
        else:
            self.assertIn("CPU", text)

    def test_a_python_that_cannot_run_is_reported_not_raised(self):
        probe = D.probe_python(str(Path(tempfile.gettempdir()) / "no-such-python"))
        self.assertFalse(probe.ready)
        self.assertIn("No such file", probe.error)
        self.assertIn("Cannot check", probe.device_text())

    def test_missing_packages_are_listed_from_what_the_python_reports(self):
        probe = D.PythonProbe("python", packages={name: "1.0" for name in D.WORKER_IMPORTS} | {"nnunetv2": None})
        self.assertEqual(probe.missing, ["nnunetv2"])
        self.assertFalse(probe.ready)


class InstallPlanTest(unittest.TestCase):
    """Pinned requirements; torch left to the PyTorch extension; Slicer's packages never installed."""

    def test_plan_pins_requirements_and_refuses_slicers_own_packages(self):
        plan = D.install_plan(["torch", "nnunetv2", "nrrd", "numpy"])
        self.assertTrue(plan.torch)
        self.assertEqual(plan.requirements, [D.REQUIREMENTS["nnunetv2"], D.REQUIREMENTS["nrrd"]])
        self.assertTrue(all(any(op in r for op in ("==", ">=")) for r in plan.requirements))
        self.assertEqual(plan.refused, ["numpy"])
        self.assertIn("PyTorch extension", plan.describe())
        self.assertTrue(D.install_plan([]).empty)

    def test_constraints_hold_slicers_packages_at_their_installed_versions(self):
        lines = D.constraints_text().split()
        for name in ("SimpleITK", "numpy"):
            self.assertIn(f"{name}=={D.installed_version(name)}", lines)

    def test_pip_accepts_the_arguments_and_the_constraints_file(self):
        plan = D.install_plan(["nrrd", "scipy"])  # installed here: pip resolves them without downloading
        with tempfile.TemporaryDirectory() as tmp:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(D.constraints_text())
            args = D.pip_arguments(plan, constraints)
            self.assertEqual(args[-2:], ["--constraint", str(constraints)])
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                                   "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("already satisfied", proc.stdout)

    def test_manual_command_for_another_environment(self):
        command = D.manual_command("/opt/env/bin/python", D.install_plan(["torch", "pydicom"]))
        self.assertEqual(command, '"/opt/env/bin/python" -m pip install "torch" "pydicom>=3.0,<4"')

    def test_missing_here_checks_without_importing(self):
        self.assertEqual(D.missing_here(("json", "no_such_module_segrap")), ["no_such_module_segrap"])


if __name__ == "__main__":
    unittest.main()
