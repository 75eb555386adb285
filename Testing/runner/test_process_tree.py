"""The worker's processes on every OS (runner): cancel stops the whole tree - a launcher, the worker and a
grandchild - with or without the POSIX process-group calls; a worker that dies without a final event is
reported with its log, with no signal.SIGKILL; SIGHUP/SIGTERM to the caller stop the tree and remove the temp
folder; the worker never imports from the caller's folder, and another interpreter starts without the caller's
PYTHONHOME/PYTHONPATH.

The tree tests run our real runner code (WorkerRun.start/cancel/wait, the environment, the Popen options)
on a tiny fake worker, so they take about a second each; the last test runs the real worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import venv
from pathlib import Path

import psutil
import pytest

from SegRapSegmenterLib import runner
from SegRapSegmenterLib.errors import Cancelled, WorkerError
from SegRapSegmenterLib.pipeline import SegmentRequest
from SegRapSegmenterLib.runner import WorkerRun

# The fake worker: starts a grandchild that ignores SIGTERM (only a kill stops it), then speaks like the worker.
FAKE_WORKER = r"""
import json, os, signal, subprocess, sys, time
mode = os.environ["SEGRAP_FAKE_MODE"]
if mode == "die":
    print("fake worker: loading the model", file=sys.stderr, flush=True)
    print("fake worker: something broke here", file=sys.stderr, flush=True)
    os._exit(7)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()  # the grandchild's handler is in place
if mode == "stubborn":  # ignores SIGTERM and its stdin: only a kill stops it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(json.dumps({"event": "start", "pid": os.getpid(), "grandchild": child.pid}), flush=True)
time.sleep(600)
"""
# Like Slicer's PythonSlicer (CTKAppLauncher): runs the real interpreter as its child, forwards stdio, not signals.
LAUNCHER = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"
POSIX_ONLY = ("killpg", "getpgid", "setsid")


class FakeWorkerRun(WorkerRun):
    """The real WorkerRun with the fake worker's command line (optionally behind a launcher)."""

    def __init__(self, request, scripts: dict[str, Path], launcher: bool):
        super().__init__(request, grace_s=1.0)
        self.scripts, self.launcher = scripts, launcher

    def command(self, request_path: Path) -> list[str]:
        fake = [self.python, str(self.scripts["worker"]), "--request", str(request_path)]
        return [self.python, str(self.scripts["launcher"]), *fake] if self.launcher else fake


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A factory of fake worker runs: fake(mode, launcher=False)."""
    scripts = {"worker": tmp_path / "fake_worker.py", "launcher": tmp_path / "launcher.py"}
    scripts["worker"].write_text(FAKE_WORKER)
    scripts["launcher"].write_text(LAUNCHER)
    (tmp_path / "out").mkdir()

    def make(mode: str, launcher: bool = False) -> FakeWorkerRun:
        monkeypatch.setenv("SEGRAP_FAKE_MODE", mode)
        request = SegmentRequest(ct=str(tmp_path / "ct.nii.gz"), out_dir=str(tmp_path / "out"), case_id="c1")
        return FakeWorkerRun(request, scripts, launcher)

    return make


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started(run: FakeWorkerRun) -> list[int]:
    """Every pid of the fake run's tree once its start event came: [launcher,] worker, grandchild."""
    event = next(run.events())
    pids = ([run.process.pid] if run.launcher else []) + [event["pid"], event["grandchild"]]
    assert all(alive(pid) for pid in pids)
    return pids


@pytest.mark.parametrize("mode, launcher, posix_calls", [
    ("polite", False, "present"),  # the worker stops when asked; the grandchild needs the kill
    ("stubborn", True, "present"),  # behind a launcher that does not forward anything, nobody listens
    ("stubborn", True, "removed"),  # the same as on Windows: no os.killpg, os.getpgid or os.setsid
])
def test_cancel_stops_the_worker_and_its_grandchild(fake, monkeypatch, mode, launcher, posix_calls):
    run = fake(mode, launcher).start()
    pids = started(run)
    staging = Path(run.request.staging_dir)
    staging.mkdir()
    if posix_calls == "removed":
        for name in POSIX_ONLY:
            monkeypatch.delattr(os, name, raising=False)
    t0 = time.monotonic()
    run.cancel()
    assert not [pid for pid in pids if alive(pid)]
    assert time.monotonic() - t0 < 8
    assert run.process.returncode is not None
    assert not staging.exists() and not run.log_path.parent.exists()  # staging and the segrap-run-* folder


def test_killing_only_the_launcher_would_leave_the_worker_running(fake):
    """Why the tree is stopped and not one pid: PythonSlicer's child outlives a killed launcher."""
    run = fake("stubborn", launcher=True).start()
    launcher_pid, worker_pid, grandchild_pid = started(run)
    run.process.kill()
    run.process.wait(timeout=10)
    time.sleep(0.2)
    try:
        assert alive(worker_pid) and alive(grandchild_pid)
    finally:
        for pid in (worker_pid, grandchild_pid):
            psutil.Process(pid).kill()
        run.cancel()


def test_a_worker_that_dies_without_a_final_event_is_reported_with_its_log(fake, monkeypatch):
    for name in (*POSIX_ONLY, "SIGKILL"):  # as on Windows
        monkeypatch.delattr(os if name != "SIGKILL" else signal, name, raising=False)
    run = fake("die")
    with pytest.raises(WorkerError) as caught:
        run.wait()
    message = str(caught.value)
    assert "died (exit code 7)" in message and "no output was written" in message
    assert "fake worker: something broke here" in message  # the log tail
    assert not run.log_path.parent.exists()


def test_exit_descriptions_need_no_signal_constants(monkeypatch):
    monkeypatch.delattr(signal, "SIGKILL", raising=False)
    assert runner.describe_exit(-9) == "killed by SIGKILL (out of memory?)"
    assert runner.describe_exit(-15) == "killed by SIGTERM"
    assert runner.describe_exit(0xC0000017) == "exit code 0xc0000017 (out of memory)"  # Windows STATUS_NO_MEMORY
    assert runner.describe_exit(3) == "exit code 3"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_sighup_to_the_caller_stops_the_worker_tree_and_removes_the_temp_folder(fake):
    run = fake("stubborn", launcher=True)
    pids: list[int] = []

    def on_event(event: dict) -> None:
        pids.extend([run.process.pid, event["pid"], event["grandchild"]])
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGHUP)).start()

    with pytest.raises(Cancelled, match="stopped by SIGHUP"):
        with runner.cancel_on_termination():
            run.wait(on_event)
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]
    assert not run.log_path.parent.exists()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # the caller's handler is back


def test_windows_children_get_a_process_group_and_no_console_window():
    flags = runner.popen_options(windows=True)["creationflags"]
    assert flags & 0x00000200 and flags & 0x08000000  # CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW
    assert runner.popen_options(windows=False) == {"start_new_session": True}


def test_another_interpreter_gets_the_startup_environment_without_python_variables(monkeypatch):
    monkeypatch.setenv("PYTHONHOME", "/broken/home")
    monkeypatch.setenv("PYTHONPATH", "/broken/site-packages")
    own = runner.python_environment(sys.executable)
    assert own["PYTHONHOME"] == "/broken/home" and own["PYTHONSAFEPATH"] == "1"  # this interpreter: as it is
    startup = {"PATH": "/usr/bin", "PythonHome": "/slicer/lib/Python", "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
    other = runner.python_environment("/opt/other/bin/python", startup)
    assert other == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "PYTHONSAFEPATH": "1"}  # names compared as Windows does
    assert "PYTHONHOME" not in runner.python_environment("/opt/other/bin/python")  # headless: ours, cleaned


def test_the_bootstrap_keeps_the_current_folder_off_sys_path_without_pythonsafepath(tmp_path):
    """What Python 3.10 (no PYTHONSAFEPATH) gets: the bootstrap alone removes the current folder."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "show_path.py").write_text("import json, sys\nprint(json.dumps(sys.path))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {"PYTHONPATH": str(tmp_path / "lib")}
    command = runner.safe_module_command(sys.executable, "show_path")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    path = json.loads(proc.stdout)
    assert path[0] == str(tmp_path / "lib") and "" not in path and str(tmp_path) not in path
    plain = subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.path[0]))"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert plain.stdout.strip() == "''"  # what the bootstrap removes


def other_python(folder: Path) -> str:
    """A second interpreter: a fresh venv that sees this environment's packages through a .pth file."""
    venv.create(folder, with_pip=False, symlinks=os.name != "nt")
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, timeout=60, env={}).stdout.strip()
    Path(site, "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def test_the_real_worker_in_another_python_ignores_the_callers_folder_and_broken_python_variables(
        tmp_path, monkeypatch):
    """Issue 20 finding 2 and issue 14's external Python: a SimpleITK.py planted where the caller stands is not
    imported (a marker file tells), relative request paths still mean the caller's folder, and the other
    interpreter starts although the caller's PYTHONHOME/PYTHONPATH would break it."""
    python = other_python(tmp_path / "env")
    here = tmp_path / "caller"
    here.mkdir()
    marker = tmp_path / "planted-module-ran"
    (here / "SimpleITK.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('planted')\n")
    subprocess.run([python, "-c", "import SimpleITK"], cwd=here, capture_output=True, timeout=120)
    assert marker.exists(), "the planted module should be what a plain `python` started here imports"
    marker.unlink()

    monkeypatch.chdir(here)
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "no-such-home"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "no-such-site-packages"))
    broken = subprocess.run([python, "-c", "pass"], capture_output=True, timeout=60)
    assert broken.returncode != 0, "the parent's PYTHONHOME should break the other interpreter"

    request = SegmentRequest(ct="missing-ct.nii.gz", out_dir="out", bundle="demo", tasks=("oar",), device="cpu")
    run = WorkerRun(request, python=python).start()
    events: list[dict] = []
    outcome = run.wait(events.append)
    assert outcome.final["event"] == "error" and outcome.final["kind"] == "InputError", outcome.log_tail
    assert str(here / "missing-ct.nii.gz") in outcome.final["message"]  # resolved against the caller's folder
    assert events[0]["event"] == "start"
    assert not marker.exists()  # the real SimpleITK was imported, not the planted one
