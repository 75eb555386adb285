"""What the worker's Python needs, whether it has it, and a pinned install that never replaces Slicer's own packages.

The worker runs in a Python of the user's choice (Slicer's own by default, or an existing
environment that already has torch with CUDA). ``probe_python`` asks that Python, in a
subprocess, which packages it can import and which devices torch sees, so nothing heavy is
imported into Slicer itself. ``install_plan`` turns what is missing into pinned requirements;
``run_install`` runs them as ``PythonSlicer -m pip`` (and ``-m light_the_torch`` for torch, as the
PyTorch extension does) in a subprocess, with a constraints file that holds the packages Slicer
ships (SimpleITK, numpy, scipy, vtk, pydicom) and an installed torch at their versions, so pip
fails rather than replacing them. It is meant for a ``background.BackgroundTask``: pip's output
lines are its progress, and ``should_stop`` stops the process tree. Nothing runs before the user agreed.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, InstallError
from ..runner import WINDOWS, popen_options, python_environment, stop_process_tree

# torch versions nnunetv2 2.8.1 accepts (its metadata: "torch!=2.9.*,>=2.1.2"), appended to "torch" as the
# PyTorch extension does with its torchVersionRequirement (fepegar/SlicerPyTorch PyTorchUtils.py:240 at e1c85cc)
TORCH_REQUIREMENT = ">=2.1.2,!=2.9.*"
# import name -> pip requirement, pinned to what the core is tested with (pyproject.toml)
REQUIREMENTS: dict[str, str] = {
    "torch": "torch" + TORCH_REQUIREMENT,  # in Slicer: with light-the-torch (right CUDA build), see install_steps
    "nnunetv2": "nnunetv2==2.8.1",
    "scipy": "scipy>=1.10,<2",  # bundled by Slicer (held there, see SLICER_OWNED); for another environment
    "pydicom": "pydicom>=2.4,<4",  # the core runs on Slicer 5.10's 2.4.4 and 5.12's 3.0.2
    "nrrd": "pynrrd>=1.0,<2",
    "psutil": "psutil>=5.9",  # process-tree stop of the worker; Slicer does not ship it
    # the panel's "Send to" (C-ECHO, C-STORE); Slicer does not ship it. pynetdicom 3 needs pydicom 3, so with
    # Slicer 5.10's pydicom 2.4.4 held by the constraints pip picks a 2.x release
    "pynetdicom": "pynetdicom>=2.1,<4",
}
# Packages Slicer ships and its own modules depend on (its DICOM plugins import pydicom): never
# installed, upgraded or replaced in Slicer's Python; the constraints file holds them where they are.
# import name -> distribution. scipy is bundled too (Slicer_USE_SCIPY is ON by default: CMakeLists.txt
# v5.10.0:410, v5.12.0:424; scipy==1.13.1 in SuperBuild/External_python-scipy.cmake v5.10.0:40, 1.17.1 at v5.12.0:44).
SLICER_OWNED: dict[str, str] = {"SimpleITK": "SimpleITK", "numpy": "numpy", "scipy": "scipy", "vtk": "vtk",
                                "pydicom": "pydicom"}
# Held at their installed version too when present: the PyTorch extension chose that torch build
# for the GPU driver, and pip must not swap it for a CPU wheel while installing nnunetv2.
HELD_IF_INSTALLED: tuple[str, ...] = ("torch", "torchvision")
# what the worker imports
WORKER_IMPORTS: tuple[str, ...] = ("torch", "nnunetv2", "scipy", "pydicom", "nrrd", "numpy", "SimpleITK")
# what Slicer's own process imports from the core to start and follow a run and to export RTSTRUCT
# (the runner, which holds the request, stops the worker with psutil; an RTSTRUCT export reads the CT
# series, and a tilted one is untilted with scipy; the result's header is read without pynrrd): all
# that Slicer needs when the worker runs elsewhere
IN_PROCESS_IMPORTS: tuple[str, ...] = ("scipy", "pydicom", "psutil")
# what Slicer's own process imports to send an RTSTRUCT (node.scu); checked when the user presses Send
SEND_IMPORTS: tuple[str, ...] = ("pynetdicom",)

_PROBE = r"""
import sys
if sys.path and sys.path[0] in ("", "."):  # Python 3.10 ignores PYTHONSAFEPATH: the current folder off sys.path
    del sys.path[0]
import importlib, json
names = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}, "devices": [], "error": None}
for name in names:
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None)
        if version is None:
            import importlib.metadata as md
            try:
                version = md.version({"nrrd": "pynrrd"}.get(name, name))
            except Exception:
                version = "installed"
        out["packages"][name] = str(version)
    except Exception as exc:
        out["packages"][name] = None
torch = None
try:
    import torch
except Exception as exc:  # torch not installed at all is a missing package, not a failed probe
    if not (isinstance(exc, ModuleNotFoundError) and exc.name == "torch"):
        out["error"] = "%s: %s" % (type(exc).__name__, exc)
try:
    if torch is not None:
        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out["devices"].append("cuda:%d %s, %.1f GiB" % (i, p.name, p.total_memory / 2**30))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            out["devices"].append("mps (Apple GPU)")
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


@dataclass
class PythonProbe:
    """What one Python environment offers the worker."""

    executable: str
    python_version: str = ""
    packages: dict[str, str | None] = field(default_factory=dict)  # import name -> version, None when missing
    devices: list[str] = field(default_factory=list)  # GPUs torch can use ("cuda:0 NVIDIA ..., 24.0 GiB")
    torch_cuda: str | None = None  # CUDA version torch was built with
    error: str | None = None  # why the probe itself failed

    @property
    def missing(self) -> list[str]:
        """Import names the worker needs and this Python cannot import."""
        return [name for name in WORKER_IMPORTS if not self.packages.get(name)]

    @property
    def ready(self) -> bool:
        return self.error is None and not self.missing

    def device_text(self) -> str:
        """One line for the panel: the GPUs found, or why the CPU will be used."""
        if self.error:
            return f"Cannot check {self.executable}: {self.error}"
        if not self.packages.get("torch"):
            return "PyTorch is not installed in this Python."
        if self.devices:
            return "; ".join(self.devices)
        build = f"torch {self.packages['torch']}" + (f" (CUDA {self.torch_cuda})" if self.torch_cuda else " (CPU build)")
        return f"No GPU found by {build}: the CPU will be used (slow: minutes per case)."


def startup_environment() -> dict[str, str] | None:
    """Slicer's startup environment (without its launcher's Python settings) inside Slicer; None elsewhere.

    ``slicer.util.startupEnvironment`` (Base/Python/slicer/util.py v5.10.0:98, v5.12.0:269) is where another
    interpreter starts from: the one Slicer runs in carries PYTHONHOME, PYTHONPATH and PYTHONNOUSERSITE
    for Slicer's own Python (docs/slicer-compatibility.md). It calls ``slicer.app.startupEnvironment()``
    (util.py v5.10.0:118, v5.12.0:289), a PythonQt call, and PythonQt is not thread-safe: so this is
    refused off the main (GUI) thread, everywhere, and a background task gets the value passed in.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("startup_environment() reads Slicer's application object: call it on the GUI thread and "
                           "pass the result to the background task (PythonQt is not thread-safe).")
    slicer = sys.modules.get("slicer")
    if slicer is None or not hasattr(slicer, "app"):
        return None
    import slicer.util

    return dict(slicer.util.startupEnvironment())


def probe_python(python: str | None = None, timeout_s: float = 120.0,
                 startup_env: Mapping[str, str] | None = None) -> PythonProbe:
    """Ask ``python`` (default: this one) which required packages import and which devices torch sees.

    It runs like the worker: from a neutral folder with the current folder off its import path, in
    ``startup_env`` when it is another interpreter (default: ``startup_environment()``, which only the
    GUI thread may read: a background probe gets it passed in, see ``tasks.probe_call``), with no
    console window on Windows; a probe that hangs is stopped with its whole process tree
    (PythonSlicer is a launcher with the real Python as its child).
    """
    python = python or sys.executable
    names = list(WORKER_IMPORTS)
    env = python_environment(python, startup_env if startup_env is not None else startup_environment())
    with tempfile.TemporaryDirectory(prefix="segrap-probe-") as neutral:
        try:
            proc = subprocess.Popen([python, "-c", _PROBE, json.dumps(names)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
                                    cwd=neutral, **popen_options())
        except OSError as exc:
            return PythonProbe(python, error=f"{type(exc).__name__}: {exc}")
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                stop_process_tree(proc, grace_s=2.0)
            except ImportError:  # psutil not installed in Slicer yet: the launcher at least
                proc.kill()
            proc.communicate()
            return PythonProbe(python, error=f"no answer within {timeout_s:g} s")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return PythonProbe(python, error=f"exit code {proc.returncode} ({tail})")
    data = json.loads(lines[-1])
    return PythonProbe(python, data.get("python", ""), data.get("packages", {}), data.get("devices", []),
                       data.get("torch_cuda"), data.get("error"))


def missing_here(names: tuple[str, ...] = IN_PROCESS_IMPORTS) -> list[str]:
    """Import names this process cannot import (checked without importing them)."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a parent package that is missing, or not a module name at all
            return True

    return [name for name in names if absent(name)]


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution in this Python, or None."""
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


def constraints_text() -> str:
    """pip constraints holding Slicer's own packages, and torch when installed, at their versions (``name==version``)."""
    lines = []
    for distribution in (*SLICER_OWNED.values(), *HELD_IF_INSTALLED):
        version = installed_version(distribution)
        if version:
            lines.append(f"{distribution}=={version}")
    return "\n".join(lines) + "\n"


@dataclass
class InstallPlan:
    """What to install with pip, and what must be installed some other way."""

    requirements: list[str]  # pinned pip requirements, torch excluded
    torch: bool  # torch is missing: install it with light-the-torch (right CUDA build), as the PyTorch extension does
    refused: list[str]  # Slicer's own packages that are missing: a broken Slicer, not something to pip over

    def requirements_names(self) -> list[str]:
        """Import names of ``requirements`` (to check them after the install)."""
        by_requirement = {requirement: name for name, requirement in REQUIREMENTS.items()}
        return [by_requirement.get(r, r) for r in self.requirements]

    @property
    def empty(self) -> bool:
        return not (self.requirements or self.torch or self.refused)

    def describe(self) -> str:
        """What will happen, for the consent dialog."""
        parts = []
        if self.torch:
            parts.append("PyTorch (with light-the-torch, as the PyTorch extension does: it picks the build for your GPU)")
        if self.requirements:
            parts.append("pip packages: " + ", ".join(self.requirements))
        if self.refused:
            parts.append("NOT installed (Slicer's own, reinstall Slicer): " + ", ".join(self.refused))
        return "; ".join(parts) or "nothing"


def install_plan(missing: list[str], into_slicer: bool = True) -> InstallPlan:
    """The install plan for missing import names (``PythonProbe.missing``, ``missing_here``).

    ``into_slicer``: for Slicer's own Python, whose own packages are refused rather than installed;
    False for another environment (the command the user runs there lists everything).
    """
    owned = SLICER_OWNED if into_slicer else {}
    return InstallPlan(
        requirements=[REQUIREMENTS.get(name, name) for name in missing if name != "torch" and name not in owned],
        torch="torch" in missing,
        refused=[name for name in missing if name in owned],
    )


def pip_arguments(plan: InstallPlan, constraints_file: str | Path) -> list[str]:
    """The ``pip install`` arguments of the plan's pip packages (a list: no shell quoting), constrained by Slicer's packages."""
    return [*plan.requirements, "--constraint", str(Path(constraints_file))]


# What the PyTorch extension installs torch with (fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py at
# e1c85cc: ``pip_install('light-the-torch>=0.5')`` at :247, then ``_executePythonModule('light_the_torch',
# args)`` at :224 with args ["install", "torch" + requirement, ...] from :240): light-the-torch picks the
# torch build for the GPU driver. The same commands run here in a subprocess, off the GUI thread and
# cancellable (the extension's call blocks Slicer until pip is done).
LIGHT_THE_TORCH = "light-the-torch>=0.5"
OUTPUT_TAIL_LINES = 30  # pip's last lines, in the error of a failed install


@dataclass(frozen=True)
class InstallStep:
    """One command run with Slicer's Python: ``python -m <module> <args>`` (pip or light_the_torch)."""

    label: str
    module: str
    args: tuple[str, ...]


def install_steps(plan: InstallPlan, constraints_file: str | Path) -> list[InstallStep]:
    """The commands that carry out ``plan`` in Slicer's Python, in order (torch first, then the pip packages)."""
    import importlib.util

    constraint = ("--constraint", str(Path(constraints_file)))
    steps = []
    if plan.torch:
        if importlib.util.find_spec("light_the_torch") is None:
            steps.append(InstallStep("light-the-torch (finds the PyTorch build for this computer's GPU)", "pip",
                                     ("install", LIGHT_THE_TORCH, *constraint)))
        steps.append(InstallStep("PyTorch", "light_the_torch", ("install", REQUIREMENTS["torch"], *constraint)))
    if plan.requirements:
        steps.append(InstallStep(", ".join(plan.requirements), "pip",
                                 ("install", *pip_arguments(plan, constraints_file))))
    return steps


Report = Callable[[str, "float | None"], None]


def _stop(proc: subprocess.Popen) -> None:
    """Stop an install command and what it started (PythonSlicer is a launcher with pip as its child)."""
    try:
        import psutil  # noqa: F401 - stop_process_tree uses it when it is there
    except ImportError:
        if not WINDOWS:  # no psutil yet: the command runs in a session of its own (popen_options)
            import signal

            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
    stop_process_tree(proc, grace_s=5.0)


def run_step(python: str, step: InstallStep, env: Mapping[str, str] | None = None, report: Report | None = None,
             should_stop: Callable[[], bool] | None = None, fraction: float | None = None) -> None:
    """Run one install command, passing each output line to ``report``; InstallError when it fails, Cancelled when stopped."""
    command = [python, "-m", step.module, *step.args]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", env=dict(env) if env is not None else None,
                                **popen_options())
    except OSError as exc:
        raise InstallError(f"Could not run {python} -m {step.module} ({exc}).") from exc
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True,
                              name="segrap-install-output")
    reader.start()
    tail: list[str] = []
    while reader.is_alive() or not lines.empty():
        if should_stop is not None and should_stop():
            _stop(proc)
            raise Cancelled(f"Installing {step.label} was cancelled; what pip had installed so far stays.")
        try:
            line = lines.get(timeout=0.2).rstrip()
        except queue.Empty:
            continue
        if line:
            tail = [*tail[-(OUTPUT_TAIL_LINES - 1):], line]
            if report is not None:
                report(f"Installing {step.label}: {line[:160]}", fraction)
    returncode = proc.wait()
    if returncode != 0:
        raise InstallError(f"Installing {step.label} failed ({' '.join([os.path.basename(python), '-m', step.module, *step.args])}"
                           f" exited with {returncode}). Its last lines:\n" + "\n".join(tail))


def run_install(plan: InstallPlan, python: str, work_dir: str | Path, env: Mapping[str, str] | None = None,
                report: Report | None = None, should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Carry out ``plan`` with ``python`` (Slicer's PythonSlicer), off the GUI thread; call only after the user agreed.

    Only for Slicer's own Python: another environment is the user's to manage (the panel tells them
    the ``pip install`` line instead). The constraints file is written before each command, so pip
    holds a torch that the previous command just installed. Returns the import names still missing
    in this process afterwards: packages never imported before can be used at once, so no restart
    is needed when it is empty.
    """
    import importlib

    constraints = Path(work_dir) / "segrap-constraints.txt"
    steps = install_steps(plan, constraints)
    for k, step in enumerate(steps):
        constraints.write_text(constraints_text())
        if report is not None:
            report(f"Installing {step.label} ...", k / len(steps))
        run_step(python, step, env, report, should_stop, k / len(steps))
    importlib.invalidate_caches()
    wanted = [*plan.requirements_names(), *(["torch"] if plan.torch else [])]
    return missing_here(tuple(wanted))


def manual_command(python: str, plan: InstallPlan) -> str:
    """The command a user runs themselves to install the plan into another Python environment."""
    items = ([REQUIREMENTS["torch"]] if plan.torch else []) + plan.requirements
    return f'"{python}" -m pip install ' + " ".join(f'"{r}"' for r in items)
