"""Dependency checks and installs (SegRapSegmenterLib.slicer_bridge.dependencies): what the worker's Python has, pip
arguments that pin what is installed while holding Slicer's own packages where they are, and the install run
as a subprocess with real pip (a wheel made here, a local index that never answers).

Registered as a Slicer ctest: in a stock Slicer (no torch, nnunetv2, pynrrd, psutil) the checks that need
them skip with the reason; Testing/slicer_bridge/test_stock_slicer.py runs this file that way.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import threading
import unittest
import venv
from pathlib import Path
from unittest import mock

from SegRapSegmenterLib.errors import Cancelled, InstallError
from SegRapSegmenterLib.slicer_bridge import dependencies as D

MISSING_FOR_THE_WORKER = D.missing_here(D.WORKER_IMPORTS)
NO_PSUTIL = D.missing_here(("psutil",)) != []


class ProbeTest(unittest.TestCase):
    """The probe asks a Python in a subprocess, so nothing heavy is imported into Slicer."""

    @classmethod
    def setUpClass(cls):
        cls.probe = D.probe_python(sys.executable)

    def test_the_probe_reports_what_this_python_cannot_import(self):
        self.assertIsNone(self.probe.error)
        self.assertEqual(self.probe.missing, MISSING_FOR_THE_WORKER)
        self.assertEqual(set(self.probe.packages), set(D.WORKER_IMPORTS))

    @unittest.skipIf(MISSING_FOR_THE_WORKER, f"{', '.join(MISSING_FOR_THE_WORKER)} not installed (as in a stock Slicer)")
    def test_this_environment_has_everything_the_worker_imports(self):
        self.assertIsNone(self.probe.error)
        self.assertEqual(self.probe.missing, [])
        self.assertTrue(self.probe.ready)
        self.assertEqual(set(self.probe.packages), set(D.WORKER_IMPORTS))
        self.assertRegex(self.probe.packages["nnunetv2"], r"^\d+\.\d+")  # a version, found through metadata

    def test_device_text_names_the_gpus_or_says_the_cpu_is_used(self):
        text = self.probe.device_text()
        if not self.probe.packages.get("torch"):  # a stock Slicer
            self.assertEqual(text, "PyTorch is not installed in this Python.")
        elif self.probe.devices:
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
    @unittest.skipIf(NO_PSUTIL, "psutil not installed (as in a stock Slicer): the check of the child needs it")
    def test_a_probe_that_hangs_is_stopped_with_its_child_like_a_launcher_and_its_python(self):
        import psutil

        with tempfile.TemporaryDirectory() as tmp:
            launcher, child_pid = Path(tmp, "PythonSlicer"), Path(tmp, "child.pid")
            launcher.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {child_pid}\nwait\n")
            launcher.chmod(0o755)
            result: list = []
            env = dict(os.environ)  # read here: a thread may not read the startup environment
            thread = threading.Thread(target=lambda: result.append(D.probe_python(str(launcher), timeout_s=1.0,
                                                                                  startup_env=env)),
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
    """Pinned requirements; torch with light-the-torch as the PyTorch extension does; Slicer's packages never installed."""

    def test_plan_pins_requirements_and_refuses_slicers_own_packages(self):
        plan = D.install_plan(["torch", "nnunetv2", "nrrd", "numpy", "pydicom"])
        self.assertTrue(plan.torch)
        self.assertEqual(plan.requirements, [D.REQUIREMENTS["nnunetv2"], D.REQUIREMENTS["nrrd"]])
        self.assertTrue(all(any(op in r for op in ("==", ">=")) for r in plan.requirements))
        self.assertEqual(plan.refused, ["numpy", "pydicom"])  # Slicer's DICOM plugins import its pydicom
        self.assertEqual(plan.requirements_names(), ["nnunetv2", "nrrd"])
        self.assertIn("light-the-torch", plan.describe())
        self.assertTrue(D.install_plan([]).empty)

    def test_constraints_hold_slicers_packages_and_an_installed_torch_at_their_versions(self):
        lines = D.constraints_text().split()
        for name in ("SimpleITK", "numpy", "scipy", "pydicom"):  # scipy: bundled by Slicer 5.10 (1.13.1) and 5.12 (1.17.1)
            self.assertIn(f"{name}=={D.installed_version(name)}", lines)
        if D.installed_version("torch"):
            self.assertIn(f"torch=={D.installed_version('torch')}", lines)
        else:
            self.assertNotIn("torch", " ".join(lines))
        self.assertNotIn("nnunetv2", " ".join(lines))

    def test_scipy_is_slicers_own_so_it_is_held_not_installed(self):
        self.assertEqual(D.SLICER_OWNED["scipy"], "scipy")
        plan = D.install_plan(["scipy", "psutil"])
        self.assertEqual(plan.refused, ["scipy"])  # a Slicer without its scipy is broken: reinstall, do not pip over it
        self.assertEqual(plan.requirements, [D.REQUIREMENTS["psutil"]])
        self.assertEqual(D.install_plan(["scipy"], into_slicer=False).requirements, [D.REQUIREMENTS["scipy"]])

    @unittest.skipIf(D.missing_here(("nrrd", "psutil")), "pynrrd or psutil not installed (as in a stock Slicer)")
    def test_pip_accepts_the_arguments_and_the_constraints_file(self):
        plan = D.install_plan(["nrrd", "psutil"])  # installed here: pip resolves them without downloading
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

    @unittest.skipIf("nnunetv2" in MISSING_FOR_THE_WORKER, "nnunetv2 not installed (as in a stock Slicer)")
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


def make_wheel(folder: Path, name: str = "segrap_probe_pkg", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (one module), so pip installs something real without the network."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: segrap-test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return wheel


class RunInstallTest(unittest.TestCase):
    """run_install runs pip as a subprocess of the given Python: output lines are progress, failures name pip's lines."""

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="segrap-install-"))
        self.addCleanup(lambda: __import__("shutil").rmtree(self.tmp, ignore_errors=True))
        self.reports = []

    def report(self, message, fraction):
        self.reports.append((message, fraction))

    def test_a_package_is_installed_by_pip_in_a_subprocess_and_its_lines_are_reported(self):
        wheel = make_wheel(self.tmp)
        target = self.tmp / "site"
        plan = D.InstallPlan(requirements=["--no-index", "--target", str(target), str(wheel)], torch=False, refused=[])
        D.run_install(plan, sys.executable, self.tmp, report=self.report)
        self.assertTrue((target / "segrap_probe_pkg.py").is_file())
        lines = [m for m, _ in self.reports]
        self.assertTrue(any("Successfully installed segrap-probe-pkg-1.0" in m for m in lines), lines)
        self.assertIn(f"numpy=={D.installed_version('numpy')}", (self.tmp / "segrap-constraints.txt").read_text())

    def test_a_failed_install_raises_one_error_with_pips_last_lines(self):
        plan = D.InstallPlan(requirements=["--no-index", "segrap-no-such-package"], torch=False, refused=[])
        with self.assertRaises(InstallError) as caught:
            D.run_install(plan, sys.executable, self.tmp, report=self.report)
        message = str(caught.exception)
        self.assertIn("Installing --no-index, segrap-no-such-package failed", message)
        self.assertIn("exited with 1", message)
        self.assertIn("segrap-no-such-package", message.split("Its last lines:")[1])

    def test_cancel_stops_pip_waiting_on_an_index(self):
        import socket

        server = socket.socket()  # accepts connections and never answers: pip waits for the index
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self.addCleanup(server.close)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/simple"
        plan = D.InstallPlan(requirements=["--index-url", url, "--timeout", "60", "--retries", "0",
                                           "segrap-no-such-package"], torch=False, refused=[])
        stop = threading.Event()
        outcome = []

        def run():
            try:
                D.run_install(plan, sys.executable, self.tmp, report=self.report, should_stop=stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        server.settimeout(60)
        connection, _ = server.accept()  # pip is now waiting on the index
        self.addCleanup(connection.close)
        stop.set()
        thread.join(30)
        self.assertFalse(thread.is_alive(), "pip was not stopped")
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], Cancelled)

    def test_torch_is_installed_with_light_the_torch_before_the_pip_packages(self):
        steps = D.install_steps(D.install_plan(["torch", "nrrd"]), self.tmp / "c.txt")
        self.assertEqual([s.module for s in steps][-2:], ["light_the_torch", "pip"])
        self.assertEqual(steps[-2].args, ("install", "torch" + D.TORCH_REQUIREMENT, "--constraint", str(self.tmp / "c.txt")))
        self.assertEqual(steps[-1].args[:2], ("install", D.REQUIREMENTS["nrrd"]))
        if importlib.util.find_spec("light_the_torch") is None:
            self.assertEqual(steps[0].args[:2], ("install", D.LIGHT_THE_TORCH))

    def test_what_is_still_missing_afterwards_is_returned(self):
        plan = D.InstallPlan(requirements=["--no-index", "--target", str(self.tmp / "site"),
                                           str(make_wheel(self.tmp, "segrap_elsewhere"))], torch=False, refused=[])
        plan.requirements_names = lambda: ["segrap_elsewhere"]  # installed into --target, not on this sys.path
        self.assertEqual(D.run_install(plan, sys.executable, self.tmp), ["segrap_elsewhere"])

    def test_missing_here_checks_without_importing(self):
        self.assertEqual(D.missing_here(("json", "no_such_module_segrap")), ["no_such_module_segrap"])


if __name__ == "__main__":
    unittest.main()
