"""The panel's background tasks (SegRapSegmenterLib.slicer_bridge.tasks) with real pip and real probes.

The ``TaskView`` here records what the panel would show (status line, progress bar, busy state,
error dialogs), and the test thread polls as Slicer's qt timer would. Slicer's own pip_install is
not used by the panel: on 5.10 it runs pip from the GUI thread and reads its output there
(Base/Python/slicer/util.py v5.10.0:3991-4034 -> _executePythonModule :3957-3988 -> logProcessOutput
:3922-3955); on 5.12 its progress dialog waits in a loop that processes events (packaging.py
v5.12.0:712, :752-754), and when pip fails it shows an error dialog of its own before it raises
(:758-764), which made two dialogs with the panel's. In both, events are processed while pip runs,
so Apply stayed clickable. Here pip runs as a subprocess of a task, Apply reads Cancel meanwhile.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

from SegRapSegmenterLib.slicer_bridge import dependencies as D
from SegRapSegmenterLib.slicer_bridge.tasks import PanelTasks, TaskView, install_call, probe_call


class RecordingView:
    """What the panel shows, in order."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []

    def view(self) -> TaskView:
        return TaskView(status=lambda m: self.events.append(("status", m)),
                        progress=lambda f: self.events.append(("progress", f)),
                        busy=lambda b: self.events.append(("busy", b)),
                        error=lambda m: self.events.append(("error", m)))

    def of(self, kind: str) -> list:
        return [v for k, v in self.events if k == kind]


def poll_until_done(tasks: PanelTasks, task, timeout_s: float = 120.0) -> None:
    """Poll on this thread as the qt timer would, until the task has finished."""
    end = time.monotonic() + timeout_s
    while task.poll():
        if time.monotonic() > end:
            raise AssertionError(f"{task.name} did not finish within {timeout_s} s")
        time.sleep(0.02)


class PanelTasksTest(unittest.TestCase):
    """One task at a time, progress while it runs, one message when it fails, nothing after Cancel."""

    def setUp(self):
        self.shown = RecordingView()
        self.tasks = PanelTasks(self.shown.view(), scheduler=lambda poll: None)
        self.tmp = Path(tempfile.mkdtemp(prefix="segrap-tasks-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_a_failed_pip_install_shows_one_error_and_the_panel_is_busy_until_it_ends(self):
        plan = D.InstallPlan(requirements=["--no-index", "segrap-no-such-package"], torch=False, refused=[])
        done = []
        task = self.tasks.start("install", install_call(plan, sys.executable, self.tmp), "Installing ...",
                                done.append, controllable=True)
        self.assertTrue(self.tasks.busy)
        self.assertEqual(self.shown.of("busy"), [True])  # Apply reads Cancel: no second run starts meanwhile
        second = self.tasks.start("probe", lambda: None, "Checking ...")
        self.assertIsNone(second)
        self.assertIn("Wait for the running task (install)", self.shown.of("error")[0])
        poll_until_done(self.tasks, task)
        errors = self.shown.of("error")[1:]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("segrap-no-such-package", errors[0])
        self.assertEqual(done, [])
        self.assertEqual(self.shown.of("busy"), [True, False])
        self.assertEqual(self.shown.of("status")[-1], "Failed: Installing ...")
        self.assertFalse(self.tasks.busy)

    def test_pips_lines_are_the_progress_and_the_result_goes_to_done(self):
        from test_dependencies import make_wheel

        plan = D.InstallPlan(requirements=["--no-index", "--target", str(self.tmp / "site"), str(make_wheel(self.tmp))],
                             torch=False, refused=[])
        plan.requirements_names = lambda: ["segrap_probe_pkg"]  # installed into --target, not on this sys.path
        done = []
        task = self.tasks.start("install", install_call(plan, sys.executable, self.tmp), "Installing ...",
                                done.append, controllable=True)
        poll_until_done(self.tasks, task)
        self.assertEqual(done, [["segrap_probe_pkg"]])
        self.assertEqual(self.shown.of("error"), [])
        self.assertTrue(any("Successfully installed" in m for m in self.shown.of("status")), self.shown.of("status"))
        self.assertTrue((self.tmp / "site" / "segrap_probe_pkg.py").is_file())

    def test_cancel_finishes_the_task_at_once_without_an_error(self):
        release = threading.Event()
        done = []
        task = self.tasks.start("export", lambda report, should_stop: release.wait(10), "Writing ...", done.append,
                                controllable=True)
        self.tasks.cancel()
        self.assertFalse(task.poll())
        release.set()
        self.assertEqual(done, [])
        self.assertEqual(self.shown.of("error"), [])
        self.assertEqual(self.shown.of("status")[-1], "Cancelled: Writing ...")
        self.assertFalse(self.tasks.busy)

    def test_nothing_starts_while_the_segmentation_runs(self):
        tasks = PanelTasks(self.shown.view(), scheduler=lambda poll: None, other_work=lambda: "segmentation")
        self.assertIsNone(tasks.start("verify", lambda: None, "Checking ..."))
        self.assertEqual(self.shown.of("error"), ["Wait for the running segmentation or cancel it first."])
        self.assertEqual(self.shown.of("busy"), [])

    def test_an_error_in_done_is_shown_once(self):
        def done(result):
            raise RuntimeError(f"the database did not take {result}")

        task = self.tasks.start("export", lambda: "rt.dcm", "Writing ...", done)
        poll_until_done(self.tasks, task)
        self.assertEqual(self.shown.of("error"), ["the database did not take rt.dcm"])


class StartupEnvironmentThreadTest(unittest.TestCase):
    """slicer.util.startupEnvironment() calls slicer.app (PythonQt): read on the GUI thread, handed to the probe."""

    def test_reading_the_startup_environment_off_the_main_thread_is_refused(self):
        caught = []

        def read():
            try:
                D.startup_environment()
            except RuntimeError as exc:
                caught.append(exc)

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(10)
        self.assertEqual(len(caught), 1)
        self.assertIn("GUI thread", str(caught[0]))

    def test_the_panels_probe_reads_it_on_the_calling_thread_and_probes_on_its_own(self):
        shown = RecordingView()
        tasks = PanelTasks(shown.view(), scheduler=lambda poll: None)
        done = []
        task = tasks.start("probe", probe_call(sys.executable), "Checking ...", done.append)
        self.assertTrue(task.poll(), "the probe finished before the first poll: it ran on the caller's thread?")
        poll_until_done(tasks, task)
        self.assertEqual(shown.of("error"), [])
        self.assertEqual(len(done), 1)
        self.assertIsNone(done[0].error)
        self.assertEqual(done[0].executable, sys.executable)
        self.assertEqual(set(done[0].packages), set(D.WORKER_IMPORTS))

    def test_the_probe_call_carries_an_environment_copied_when_it_was_made(self):
        os.environ["SEGRAP_TEST_MARK"] = "made"
        try:
            call = probe_call(sys.executable)
        finally:
            del os.environ["SEGRAP_TEST_MARK"]
        env = next(c.cell_contents for c in call.__closure__ if isinstance(c.cell_contents, dict))
        self.assertEqual(env.get("SEGRAP_TEST_MARK"), "made")


if __name__ == "__main__":
    unittest.main()
