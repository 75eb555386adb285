"""What the worker's Python needs, whether it has it, and a pinned install plan that never replaces Slicer's own packages.

The worker runs in a Python of the user's choice (Slicer's own by default, or an existing
environment that already has torch with CUDA). ``probe_python`` asks that Python, in a
subprocess, which packages it can import and which devices torch sees, so nothing heavy is
imported into Slicer itself. ``install_plan`` turns what is missing into pinned ``pip``
requirements plus a constraints file that holds the packages Slicer ships (SimpleITK, numpy,
vtk, pydicom) and an installed torch at the versions installed, so pip fails rather than replacing them. Installing is left to
the caller (``slicer.util.pip_install`` in Slicer, after the user agreed); nothing here downloads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..runner import popen_options, python_environment, stop_process_tree

# torch versions nnunetv2 2.8.1 accepts (its metadata: "torch!=2.9.*,>=2.1.2"): handed to the PyTorch
# extension's installTorch, which appends it to "torch" (fepegar/SlicerPyTorch PyTorchUtils.py:240)
TORCH_REQUIREMENT = ">=2.1.2,!=2.9.*"
# import name -> pip requirement, pinned to what the core is tested with (pyproject.toml)
REQUIREMENTS: dict[str, str] = {
    "torch": "torch" + TORCH_REQUIREMENT,  # in Slicer: through the PyTorch extension (right CUDA build)
    "nnunetv2": "nnunetv2==2.8.1",
    "scipy": "scipy>=1.10,<2",
    "pydicom": "pydicom>=2.4,<4",  # the core runs on Slicer 5.10's 2.4.4 and 5.12's 3.0.2
    "nrrd": "pynrrd>=1.0,<2",
    "psutil": "psutil>=5.9",  # process-tree stop of the worker; Slicer does not ship it
    # the panel's "Send to" (C-ECHO, C-STORE); Slicer does not ship it. pynetdicom 3 needs pydicom 3, so with
    # Slicer 5.10's pydicom 2.4.4 held by the constraints pip picks a 2.x release
    "pynetdicom": "pynetdicom>=2.1,<4",
}
# Packages Slicer ships and its own modules depend on (its DICOM plugins import pydicom): never
# installed, upgraded or replaced in Slicer's Python; the constraints file holds them where they are.
SLICER_OWNED: dict[str, str] = {"SimpleITK": "SimpleITK", "numpy": "numpy", "vtk": "vtk", "pydicom": "pydicom"}
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
    for Slicer's own Python (docs/slicer-compatibility.md).
    """
    slicer = sys.modules.get("slicer")
    if slicer is None or not hasattr(slicer, "app"):
        return None
    import slicer.util

    return dict(slicer.util.startupEnvironment())


def probe_python(python: str | None = None, timeout_s: float = 120.0,
                 startup_env: Mapping[str, str] | None = None) -> PythonProbe:
    """Ask ``python`` (default: this one) which required packages import and which devices torch sees.

    It runs like the worker: from a neutral folder with the current folder off its import path, in
    ``startup_env`` when it is another interpreter (default: Slicer's startup environment inside
    Slicer, ours elsewhere), with no console window on Windows; a probe that hangs is stopped with
    its whole process tree (PythonSlicer is a launcher with the real Python as its child).
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

    return [name for name in names if importlib.util.find_spec(name) is None]


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
    torch: bool  # torch is missing: install it with the PyTorch extension (right CUDA build)
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
            parts.append("PyTorch (through the PyTorch extension, which picks the build for your GPU)")
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
    """The arguments for ``slicer.util.pip_install`` (a list: no shell quoting), constrained by Slicer's packages."""
    return [*plan.requirements, "--constraint", str(Path(constraints_file))]


def install_in_slicer(plan: InstallPlan, pip_install, work_dir: str | Path) -> list[str]:
    """Run ``plan`` with Slicer's ``pip_install`` (call only after the user agreed); torch via the PyTorch extension.

    Only for Slicer's own Python: another environment is the user's to manage (the panel tells
    them the ``pip install`` line instead). Returns the import names still missing afterwards:
    packages that were never imported can be used at once, so no restart is needed when it is empty.
    """
    if plan.torch:
        try:
            import PyTorchUtils  # the PyTorch extension: installs the torch build matching the GPU driver
        except ImportError as exc:
            raise RuntimeError("PyTorch is missing and the PyTorch extension is not installed: install "
                               "'PyTorch' from the Extensions Manager, restart Slicer and try again.") from exc
        # installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement, ...):
        # fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py:194; None means it did not install
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                         torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise RuntimeError("The PyTorch extension could not install torch; see the log.")
    if plan.requirements:
        constraints = Path(work_dir) / "segrap-constraints.txt"
        constraints.write_text(constraints_text())  # written after torch, so pip keeps the build just installed
        pip_install(pip_arguments(plan, constraints))
    import importlib

    importlib.invalidate_caches()
    wanted = [*plan.requirements_names(), *(["torch"] if plan.torch else [])]
    return missing_here(tuple(wanted))


def manual_command(python: str, plan: InstallPlan) -> str:
    """The command a user runs themselves to install the plan into another Python environment."""
    items = ([REQUIREMENTS["torch"]] if plan.torch else []) + plan.requirements
    return f'"{python}" -m pip install ' + " ".join(f'"{r}"' for r in items)
