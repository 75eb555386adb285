"""A download's deadline covers connecting and the headers, not only the body: servers that accept and stall."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from SegRapSegmenterLib.errors import Cancelled, ModelError
from SegRapSegmenterLib.inference import unpack


@pytest.fixture(params=["silent", "trickling headers"])
def stalling_server(request):
    """A local server that accepts connections and then never answers, or sends its headers a byte every 0.2 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)
            if request.param == "trickling headers":
                threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 10000:
            if stop.wait(0.2):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/bundle.zip", held
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_the_deadline_covers_connecting_and_the_headers(stalling_server, tmp_path):
    url, held = stalling_server
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"longer than 2 s \(connecting, the headers and the body\)"):
        unpack.download(url, tmp_path / "bundle.zip", unpack.Limits(download_s=2.0, read_timeout_s=60.0),
                        allow_http=True)
    assert time.monotonic() - started < 3.5 and held  # 2 s and the watchdog's beat, whatever the read timeout


def test_cancel_stops_a_download_waiting_for_its_headers(stalling_server, tmp_path):
    url, held = stalling_server
    asked = threading.Event()
    threading.Timer(0.5, asked.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        unpack.download(url, tmp_path / "bundle.zip", unpack.Limits(), allow_http=True, should_stop=asked.is_set)
    assert time.monotonic() - started < 1.5 and held


def test_cancel_stops_a_connection_being_made(tmp_path):
    """A listener whose backlog is full leaves the next connection unanswered, as a firewall dropping it would."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue (never accepted); later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.2)
        asked = threading.Event()
        threading.Timer(0.5, asked.set).start()
        started = time.monotonic()
        with pytest.raises(Cancelled):  # the default limits: a 60 s timeout on each socket operation
            unpack.download(f"http://127.0.0.1:{listener.getsockname()[1]}/b.zip", tmp_path / "b.zip",
                            unpack.Limits(), allow_http=True, should_stop=asked.is_set)
        assert time.monotonic() - started < 1.5
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_the_deadline_covers_a_tls_handshake_the_server_never_answers(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))  # takes the connection, never answers the ClientHello
    try:
        started = time.monotonic()
        with pytest.raises(ModelError, match=r"longer than 1.5 s \(connecting"):
            unpack.download(f"https://127.0.0.1:{listener.getsockname()[1]}/b.zip", tmp_path / "b.zip",
                            unpack.Limits(download_s=1.5, read_timeout_s=60.0))
        assert time.monotonic() - started < 3
    finally:
        listener.close()
