"""Dependency checks and install plans (SegRapSegmenterLib.slicer_bridge.dependencies): what the worker's Python has, and pip
arguments that pin what is installed while holding Slicer's own packages where they are."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import threading
import types
import unittest
import venv
from pathlib import Path
from unittest import mock

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

    def test_another_python_is_probed_although_this_environment_carries_a_broken_pythonhome(self):
        """As inside Slicer, whose launcher sets PYTHONHOME/PYTHONPATH/PYTHONNOUSERSITE for its own Python:
        the probe starts another interpreter from the startup environment without them."""
        with tempfile.TemporaryDirectory() as tmp:
            venv.create(tmp, with_pip=False, symlinks=os.name != "nt")
            other = str(Path(tmp, "Scripts/python.exe" if os.name == "nt" else "bin/python"))
            broken = {"PYTHONHOME": str(Path(tmp, "no-such-home")), "PYTHONPATH": str(Path(tmp, "no-such-lib")),
                      "PYTHONNOUSERSITE": "1"}
            with mock.patch.dict(os.environ, broken):
                plain = subprocess.run([other, "-c", "pass"], capture_output=True, timeout=60)
                self.assertNotEqual(plain.returncode, 0, "this PYTHONHOME should break the other Python")
                probe = D.probe_python(other)
                slicer_like = D.probe_python(other, startup_env={**os.environ, "LANG": "C.UTF-8"})
        for result in (probe, slicer_like):
            self.assertIsNone(result.error)
            self.assertEqual(result.python_version, platform.python_version())
            self.assertEqual(set(result.packages), set(D.WORKER_IMPORTS))  # it ran: a fresh venv has none of them
            self.assertIn("torch", result.missing)

    @unittest.skipIf(os.name == "nt", "the stand-in for a hanging launcher is a shell script")
    def test_a_probe_that_hangs_is_stopped_with_its_child_like_a_launcher_and_its_python(self):
        import psutil

        with tempfile.TemporaryDirectory() as tmp:
            launcher, child_pid = Path(tmp, "PythonSlicer"), Path(tmp, "child.pid")
            launcher.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {child_pid}\nwait\n")
            launcher.chmod(0o755)
            result: list = []
            thread = threading.Thread(target=lambda: result.append(D.probe_python(str(launcher), timeout_s=1.0)),
                                      daemon=True)
            thread.start()
            thread.join(30)  # a child left alive holds the probe's pipes open: the probe would hang with it
            pid = int(child_pid.read_text())
            if not result:
                psutil.Process(pid).kill()
            self.assertTrue(result, "the probe hung after its timeout: the launcher's child was not stopped")
        probe = result[0]
        self.assertIn("no answer within 1 s", probe.error)
        self.assertFalse(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)

    def test_psutil_is_needed_by_slicers_process_not_by_the_worker(self):
        self.assertIn("psutil", D.IN_PROCESS_IMPORTS)
        self.assertNotIn("psutil", D.WORKER_IMPORTS)
        self.assertEqual(D.install_plan(["psutil"]).requirements, [D.REQUIREMENTS["psutil"]])

    def test_sending_from_slicers_process_installs_pynetdicom_with_pydicom_held(self):
        # the panel's "Send to" runs node.scu in Slicer's own process; Slicer does not ship pynetdicom
        self.assertEqual(D.SEND_IMPORTS, ("pynetdicom",))
        self.assertNotIn("pynetdicom", D.WORKER_IMPORTS)
        plan = D.install_plan(list(D.SEND_IMPORTS))
        self.assertEqual(plan.requirements, ["pynetdicom>=2.1,<4"])
        self.assertEqual(plan.requirements_names(), ["pynetdicom"])
        self.assertFalse(plan.torch or plan.refused)
        self.assertRegex(D.constraints_text(), r"(?m)^pydicom==")  # pip may not swap Slicer's pydicom for pynetdicom 3

    def test_missing_packages_are_listed_from_what_the_python_reports(self):
        probe = D.PythonProbe("python", packages={name: "1.0" for name in D.WORKER_IMPORTS} | {"nnunetv2": None})
        self.assertEqual(probe.missing, ["nnunetv2"])
        self.assertFalse(probe.ready)


class InstallPlanTest(unittest.TestCase):
    """Pinned requirements; torch left to the PyTorch extension; Slicer's packages never installed."""

    def test_plan_pins_requirements_and_refuses_slicers_own_packages(self):
        plan = D.install_plan(["torch", "nnunetv2", "nrrd", "numpy", "pydicom"])
        self.assertTrue(plan.torch)
        self.assertEqual(plan.requirements, [D.REQUIREMENTS["nnunetv2"], D.REQUIREMENTS["nrrd"]])
        self.assertTrue(all(any(op in r for op in ("==", ">=")) for r in plan.requirements))
        self.assertEqual(plan.refused, ["numpy", "pydicom"])  # Slicer's DICOM plugins import its pydicom
        self.assertEqual(plan.requirements_names(), ["nnunetv2", "nrrd"])
        self.assertIn("PyTorch extension", plan.describe())
        self.assertTrue(D.install_plan([]).empty)

    def test_constraints_hold_slicers_packages_and_an_installed_torch_at_their_versions(self):
        lines = D.constraints_text().split()
        for name in ("SimpleITK", "numpy", "pydicom", "torch"):  # torch is installed in the test environment
            self.assertIn(f"{name}=={D.installed_version(name)}", lines)
        self.assertNotIn("nnunetv2", " ".join(lines))

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
        plan = D.install_plan(["torch", "pydicom", "numpy"], into_slicer=False)  # nothing is Slicer's there
        self.assertEqual(plan.refused, [])
        command = D.manual_command("/opt/env/bin/python", plan)
        self.assertEqual(command, '"/opt/env/bin/python" -m pip install "torch>=2.1.2,!=2.9.*" "pydicom>=2.4,<4" '
                                  '"numpy"')

    def test_torch_requirement_is_what_nnunetv2_declares(self):
        import importlib.metadata as md

        declared = [r for r in md.requires("nnunetv2") if r.startswith("torch") and "extra" not in r]
        self.assertEqual(len(declared), 1, declared)
        wanted = set(D.TORCH_REQUIREMENT.split(","))
        self.assertEqual(set(declared[0][len("torch"):].split(",")), wanted)

    def test_an_external_worker_python_needs_no_pynrrd_in_slicer(self):
        # the first Apply with another Python chosen installs only what Slicer's own process imports
        self.assertNotIn("nrrd", D.IN_PROCESS_IMPORTS)
        self.assertNotIn("torch", D.IN_PROCESS_IMPORTS)
        self.assertNotIn("nnunetv2", D.IN_PROCESS_IMPORTS)


class InstallInSlicerTest(unittest.TestCase):
    """install_in_slicer against the PyTorch extension's installTorch signature and real pip."""

    def setUp(self):
        self.calls = []
        calls = self.calls

        class PyTorchUtilsLogic:  # stand-in with the signature of fepegar/SlicerPyTorch PyTorchUtils.py:194
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                             torchvisionVersionRequirement=None):
                calls.append({"askConfirmation": askConfirmation, "backend": forceComputationBackend,
                              "torch": torchVersionRequirement})
                import torch

                return torch

        module = types.ModuleType("PyTorchUtils")
        module.PyTorchUtilsLogic = PyTorchUtilsLogic
        sys.modules["PyTorchUtils"] = module
        self.addCleanup(sys.modules.pop, "PyTorchUtils", None)

    def test_torch_comes_from_the_extension_with_nnunets_requirement_and_pip_is_constrained(self):
        pip_calls = []

        def pip_install(args):  # as slicer.util.pip_install, but a dry run without the network
            pip_calls.append(list(args))
            constraints = Path(args[args.index("--constraint") + 1]).read_text().split()
            self.assertIn(f"torch=={D.installed_version('torch')}", constraints)  # written after torch is there
            subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                            "--disable-pip-version-check", *args], check=True, capture_output=True, timeout=120)

        with tempfile.TemporaryDirectory() as tmp:
            still = D.install_in_slicer(D.install_plan(["torch", "scipy", "nrrd"]), pip_install, tmp)
        self.assertEqual(self.calls, [{"askConfirmation": False, "backend": None, "torch": D.TORCH_REQUIREMENT}])
        self.assertEqual(len(pip_calls), 1)
        self.assertEqual(pip_calls[0][:2], [D.REQUIREMENTS["scipy"], D.REQUIREMENTS["nrrd"]])
        self.assertEqual(still, [])  # importable now: no restart asked for

    def test_what_is_still_missing_afterwards_is_returned(self):
        plan = D.InstallPlan(requirements=["segrap-no-such-package"], torch=False, refused=[])
        still = D.install_in_slicer(plan, lambda args: None, tempfile.gettempdir())
        self.assertEqual(still, ["segrap-no-such-package"])

    def test_missing_here_checks_without_importing(self):
        self.assertEqual(D.missing_here(("json", "no_such_module_segrap")), ["no_such_module_segrap"])


if __name__ == "__main__":
    unittest.main()
