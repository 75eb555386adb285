"""The module's registered Slicer ctests in a simulated stock Slicer 5.10 / 5.12: no torch, no pynrrd.

A stock Slicer ships numpy, SimpleITK, scipy, pydicom and vtk, and none of torch, torchvision,
nnunetv2, pynrrd, psutil, pynetdicom or light-the-torch (docs/slicer-compatibility.md, "What each
release bundles"). This test runs every file of MODULE_PYTHON_TESTS (SegRapSegmenter/CMakeLists.txt)
the way Slicer's runner does (``unittest.TestLoader().loadTestsFromName``, Base/Python/slicer/testing.py
v5.10.0:14-28, v5.12.0:14-28) in a fresh interpreter whose ``sitecustomize`` makes those packages
absent: importing them raises ModuleNotFoundError, ``importlib.util.find_spec`` returns None and their
distribution metadata is not found. Child processes (the probe, the worker) inherit it through
PYTHONPATH. Each file must pass, or skip what it cannot do with the reason, and still run something.

What it cannot simulate: the application (slicer.app, qt, the panel), Slicer's own Python build and
its PythonSlicer launcher; slicer-core's MRML classes stand in for Slicer's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "SegRapSegmenter"
NOT_IN_STOCK_SLICER = ("torch", "torchvision", "nnunetv2", "nrrd", "psutil", "pynetdicom", "light_the_torch")
NOT_IN_STOCK_SLICER_DISTRIBUTIONS = ("torch", "torchvision", "nnunetv2", "pynrrd", "psutil", "pynetdicom",
                                     "light-the-torch")

SITECUSTOMIZE = textwrap.dedent('''
    """A stock Slicer's Python, simulated: some packages are absent (Testing/slicer_bridge/test_stock_slicer.py)."""
    import importlib.abc, importlib.metadata, importlib.util, os, re, sys

    _BLOCKED = set(filter(None, os.environ.get("SEGRAP_STOCK_BLOCKED_IMPORTS", "").split(",")))
    _DISTRIBUTIONS = set(filter(None, os.environ.get("SEGRAP_STOCK_BLOCKED_DISTRIBUTIONS", "").split(",")))


    class _NotInStockSlicer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (not in a stock Slicer)", name=name)
            return None


    sys.meta_path.insert(0, _NotInStockSlicer())
    _find_spec = importlib.util.find_spec


    def _find_spec_stock(name, package=None):
        if name.split(".")[0] in _BLOCKED:
            return None
        return _find_spec(name, package)


    importlib.util.find_spec = _find_spec_stock
    _distribution = importlib.metadata.distribution


    def _distribution_stock(name):
        if re.sub(r"[-_.]+", "-", name).lower() in _DISTRIBUTIONS:
            raise importlib.metadata.PackageNotFoundError(name)
        return _distribution(name)


    importlib.metadata.distribution = _distribution_stock
''')

RUN_LIKE_SLICER = textwrap.dedent('''
    import json, sys, unittest
    sys.path.append(sys.argv[1])  # as slicer.testing.runUnitTest(path, testname)
    suite = unittest.TestLoader().loadTestsFromName(sys.argv[2])
    result = unittest.TestResult()
    suite.run(result)
    print("SEGRAP-RESULT " + json.dumps({
        "run": result.testsRun,
        "skipped": [[test.id(), reason] for test, reason in result.skipped],
        "failures": [[test.id(), text] for test, text in result.failures + result.errors],
    }))
''')


def registered_tests() -> list[str]:
    """MODULE_PYTHON_TESTS of SegRapSegmenter/CMakeLists.txt (read with the packaging test's parser)."""
    spec = importlib.util.spec_from_file_location(
        "segrap_module_packaging", MODULE_DIR / "Testing" / "Python" / "test_module_packaging.py")
    packaging = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packaging)
    return packaging.cmake_list("MODULE_PYTHON_TESTS")


def stock_environment(site: Path) -> dict[str, str]:
    """This environment with the stock-Slicer sitecustomize first on PYTHONPATH, then the module folder."""
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]),
                SEGRAP_STOCK_BLOCKED_IMPORTS=",".join(NOT_IN_STOCK_SLICER),
                SEGRAP_STOCK_BLOCKED_DISTRIBUTIONS=",".join(NOT_IN_STOCK_SLICER_DISTRIBUTIONS))


@pytest.fixture(scope="module")
def stock_env(tmp_path_factory) -> dict[str, str]:
    return stock_environment(tmp_path_factory.mktemp("stock-slicer-site"))


def test_the_simulation_hides_the_packages_and_keeps_what_slicer_ships(stock_env):
    code = textwrap.dedent('''
        import importlib.metadata, importlib.util, json, subprocess, sys
        out = {"find_spec": [n for n in ("torch", "nrrd", "psutil") if importlib.util.find_spec(n) is not None]}
        try:
            import torch
            out["import"] = "imported"
        except ModuleNotFoundError as exc:
            out["import"] = str(exc)
        try:
            importlib.metadata.version("pynrrd")
            out["metadata"] = "found"
        except importlib.metadata.PackageNotFoundError:
            out["metadata"] = "not found"
        import numpy, scipy, SimpleITK, pydicom, vtk, slicer  # what Slicer ships (slicer-core stands in for slicer)
        child = subprocess.run([sys.executable, "-c", "import nnunetv2"], capture_output=True, text=True)
        out["child"] = child.returncode
        print(json.dumps(out))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=stock_env,
                          cwd=MODULE_DIR)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {"find_spec": [], "import": "No module named 'torch' (not in a stock Slicer)",
                   "metadata": "not found", "child": 1}


def test_every_python_test_file_is_registered_and_run_here():
    registered = registered_tests()
    files = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Testing" / "Python").glob("test_*.py"))
    assert sorted(registered) == files


@pytest.mark.parametrize("test_file", registered_tests())
def test_registered_ctest_passes_or_skips_with_its_reason_in_a_stock_slicer(test_file, stock_env):
    path = MODULE_DIR / test_file
    proc = subprocess.run([sys.executable, "-c", RUN_LIKE_SLICER, str(path.parent), path.stem],
                          capture_output=True, text=True, timeout=600, env=stock_env, cwd=MODULE_DIR)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SEGRAP-RESULT ")]
    assert proc.returncode == 0 and lines, f"{test_file} did not run:\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len("SEGRAP-RESULT "):])
    assert result["failures"] == [], "\n\n".join(f"{name}:\n{text}" for name, text in result["failures"])
    for name, reason in result["skipped"]:
        assert reason.strip(), f"{name} skipped without a reason"
    assert result["run"] > len(result["skipped"]), f"{test_file}: everything skipped: {result['skipped']}"
