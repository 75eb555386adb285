"""Slow calls off Slicer's GUI thread (SegRapSegmenterLib.slicer_bridge.background): the Python probe and
model downloads run on a thread, report progress to the polling side, and stop on Cancel.

The download is served by a real HTTP server on localhost that sends its body in slow pieces, so
the install is still downloading when it is cancelled. The poller stands in for Slicer's qt timer.
"""

from __future__ import annotations

import http.server
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path

from SegRapSegmenterLib.errors import Cancelled, ModelError
from SegRapSegmenterLib.slicer_bridge.background import BackgroundTask
from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic
from SegRapSegmenterLib.slicer_bridge.tasks import probe_call

PIECE = 1 << 20
PIECES = 4


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves PIECES MiB of zeros (not a zip), one MiB every 0.3 s."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(PIECE * PIECES))
        self.end_headers()
        try:
            for _ in range(PIECES):
                self.wfile.write(b"\0" * PIECE)
                self.wfile.flush()
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: cancelled
            pass

    def log_message(self, *args):
        pass


class BackgroundDownloadTest(unittest.TestCase):
    """installModel from a URL as the panel runs it: a BackgroundTask with progress and cancel."""

    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
        cls.thread = threading.Thread(target=cls.server.serve_forever, daemon=True)
        cls.thread.start()
        cls.url = f"http://127.0.0.1:{cls.server.server_address[1]}/bundle.zip"

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()

    def setUp(self):
        self.store = Path(tempfile.mkdtemp(prefix="segrap-store-"))
        self.reports, self.done = [], []

    def _task(self) -> BackgroundTask:
        from SegRapSegmenterLib.inference import bundles

        def install(report, should_stop):
            return bundles.install_bundle(self.url, store=self.store, allow_http=True, report=report,
                                           should_stop=should_stop)

        return BackgroundTask("install", install, done=self.done.append,
                              progress=lambda m, f: self.reports.append((m, f)), passes_control=True)

    def test_cancel_during_the_download_stops_it_and_installs_nothing(self):
        task = self._task().start()
        started = time.monotonic()
        while not self.reports:  # poll as the qt timer would, until the first MiB is in
            self.assertTrue(task.poll())
            self.assertLess(time.monotonic() - started, 20, "no progress report from the download")
            time.sleep(0.02)
        self.assertIn("Downloading: 1 of 4 MiB", self.reports[0][0])
        self.assertAlmostEqual(self.reports[0][1], 0.25)
        task.cancel()
        self.assertFalse(task.poll())  # finished at once for the GUI
        self.assertEqual(self.done, [task])
        self.assertTrue(task.cancelled)
        self.assertIsNone(task.error)
        task._thread.join(10)  # the download itself stops at its next block
        self.assertFalse(task._thread.is_alive())
        self.assertLess(time.monotonic() - started, 0.3 * PIECES + 5)
        self.assertEqual(list(self.store.iterdir()), [], "a cancelled install left files in the store")

    def test_a_finished_download_reports_every_block_and_its_error_comes_back_on_poll(self):
        task = self._task().start()
        task.wait(timeout_s=30)
        self.assertFalse(task.cancelled)
        self.assertIsInstance(task.error, ModelError)
        self.assertIn("neither a bundle folder nor a zip", str(task.error))
        fractions = [f for _, f in self.reports if f is not None]
        self.assertTrue(fractions and fractions == sorted(fractions) and fractions[-1] == 1.0, self.reports)
        self.assertEqual(list(self.store.iterdir()), [])

    def test_a_download_stopped_inside_the_call_raises_cancelled(self):
        from SegRapSegmenterLib.inference import bundles

        seen = []
        with self.assertRaises(Cancelled):
            bundles.install_bundle(self.url, store=self.store, allow_http=True, report=lambda m, f: seen.append(f),
                                   should_stop=lambda: bool(seen))
        self.assertEqual(len(seen), 1)
        self.assertEqual(list(self.store.iterdir()), [])

    def test_the_logic_facade_passes_progress_and_cancel_through(self):
        calls = []
        with self.assertRaises(Cancelled):
            SegmentationLogic.installModel(self.url, report=lambda m, f: calls.append(f), should_stop=lambda: True,
                                           allow_http=True)
        self.assertEqual(calls, [])  # stopped before the first block


class CancelBeforeTheHeadersTest(unittest.TestCase):
    """Cancel reaches a download whose server accepted the connection and never answers (no body to stop at)."""

    def setUp(self):
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))  # accepted by the system, never answered
        self.store = Path(tempfile.mkdtemp(prefix="segrap-store-"))

    def tearDown(self):
        self.listener.close()

    def test_cancel_while_waiting_for_the_headers_ends_the_download_thread(self):
        from SegRapSegmenterLib.inference import bundles

        url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/bundle.zip"
        done = []
        task = BackgroundTask("install", lambda report, should_stop: bundles.install_bundle(
            url, store=self.store, allow_http=True, report=report, should_stop=should_stop),
            done=done.append, passes_control=True).start()
        time.sleep(0.5)  # connected, waiting for the headers (a 60 s timeout on each read)
        self.assertTrue(task.poll())
        task.cancel()
        self.assertFalse(task.poll())
        self.assertTrue(task.cancelled)
        task._thread.join(2)  # the download's watchdog shuts its socket down within a tenth of a second
        self.assertFalse(task._thread.is_alive(), "the download thread still waits for the server's headers")
        self.assertEqual(list(self.store.iterdir()), [])


class BackgroundProbeTest(unittest.TestCase):
    """The probe of a Python (it imports torch there: seconds) runs off the polling thread."""

    def test_the_probe_runs_on_its_own_thread_and_polls_finish_it(self):
        done = []
        # tasks.probe_call reads Slicer's startup environment here, on the polling thread, as the panel does
        task = BackgroundTask("probe", probe_call(sys.executable), done=done.append).start()
        self.assertTrue(task.poll(), "the probe finished before the first poll: it ran on the caller's thread?")
        task.wait(timeout_s=120)
        self.assertEqual(done, [task])
        self.assertIsNone(task.error)
        self.assertEqual(task.result.executable, sys.executable)
        self.assertFalse(task.poll())  # finished once
        self.assertEqual(done, [task])

    def test_a_cancelled_probe_is_finished_at_once_and_its_result_dropped(self):
        release = threading.Event()
        done = []
        task = BackgroundTask("probe", lambda: release.wait(10) and "late result", done=done.append).start()
        task.cancel()
        self.assertFalse(task.poll())
        self.assertEqual(done, [task])
        release.set()
        task._thread.join(10)
        self.assertIsNone(task.result)
        self.assertFalse(task.poll())

    def test_an_exception_in_the_call_is_handed_to_the_poller(self):
        task = BackgroundTask("probe", lambda: 1 / 0).start()
        task.wait()
        self.assertIsInstance(task.error, ZeroDivisionError)


if __name__ == "__main__":
    unittest.main()
