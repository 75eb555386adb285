"""The SCP bounds every connection: idle, trickling and overlong associations and oversized PDUs are cut, audited."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from node_peers import dcmtk, storescu, wait_until
from SegRapSegmenterLib.errors import DicomNetworkError
from SegRapSegmenterLib.node.address import Destination
from SegRapSegmenterLib.node.audit import AuditLog, read_events
from SegRapSegmenterLib.node.scp import StorageScp
from SegRapSegmenterLib.node.scu import echo
from SegRapSegmenterLib.node.spool import Spool


@pytest.fixture
def bounded_scp(tmp_path, request):
    """The node's SCP in this process with short deadlines (``request.param``: overrides)."""
    spool = Spool(tmp_path / "spool")
    settings = {"negotiation_s": 3, "idle_s": 2, "association_s": 60, **getattr(request, "param", {})}
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), **settings)
    server.start()
    yield server
    server.stop()
    spool.close()


def _associate(port: int, network_timeout: float = 60):
    """A real pynetdicom requestor's established association (its own timeouts long, so the node acts first)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = network_timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="SEGRAP")
    assert assoc.is_established
    return assoc


def _dropped(server) -> list[dict]:
    return [e for e in read_events(server.spool.audit_path) if e["event"] == "association_dropped"]


def _echoscu(port: int) -> int:
    import subprocess

    return subprocess.run([dcmtk("echoscu"), "-aet", "CT1", "-aec", "SEGRAP", "127.0.0.1", str(port)],
                          capture_output=True, timeout=60).returncode


@pytest.mark.parametrize("bounded_scp", [{"idle_s": 4}], indirect=True)
def test_established_associations_trickling_a_pdu_are_closed_after_idle_s_and_free_their_slots(bounded_scp):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # every slot of the node, taken within the idle time
        slots = list(pool.map(lambda _: _associate(bounded_scp.port), range(16)))
    addresses = set()
    try:
        with pytest.raises(DicomNetworkError, match="Local limit exceeded"):  # no slot left
            echo(Destination("SEGRAP", "127.0.0.1", bounded_scp.port), "CT1", timeout=5)
        header = struct.pack(">BBL", 0x04, 0, 100)  # a P-DATA-TF of 100 bytes, then one byte every half second
        for assoc in slots:
            sock = assoc.dul.socket.socket
            addresses.add("{}:{}".format(*sock.getsockname()[:2]))
            sock.sendall(header)
        started = time.monotonic()
        for _ in range(20):
            for assoc in slots:
                try:
                    assoc.dul.socket.socket.sendall(b"\0")
                except (OSError, AttributeError):
                    pass
            time.sleep(0.5)
            if len(_dropped(bounded_scp)) == 16:
                break
        assert time.monotonic() - started < 6  # idle_s of 4 and the watchdog's beat, not for ever
        wait_until(lambda: _echoscu(bounded_scp.port) == 0, 10, "echoscu to get a freed slot")
    finally:
        for assoc in slots:
            assoc.abort()
    dropped = _dropped(bounded_scp)
    assert {e["address"] for e in dropped} == addresses  # the peers' addresses, nothing of a patient
    assert all(e["reason"] == "a PDU trickling in: not complete after 4 s (idle_s)" for e in dropped)


def _tricklers(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each send the first byte of an A-ASSOCIATE-RQ and then nothing (the caller
    closes them)."""
    tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    for sock in tricklers:
        try:
            sock.sendall(b"\x01")
        except OSError:  # a connection the node already closed to make room (it resets what it drops)
            pass
    return tricklers


@pytest.mark.parametrize("bounded_scp", [{"negotiation_s": 60}], indirect=True)
def test_connections_that_never_finish_their_request_cannot_lock_senders_out(bounded_scp):
    # twenty connections each send the first byte of an A-ASSOCIATE-RQ and then nothing, more than the node's
    # sixteen slots; a real sender must still get through at once, long before the negotiation deadline
    tricklers = _tricklers(bounded_scp.port, 20)
    try:
        time.sleep(1.0)  # negotiating for longer than a real sender's request takes
        started = time.monotonic()
        assert _echoscu(bounded_scp.port) == 0  # before: A-ASSOCIATE-RJ, local limit exceeded, for 60 s
        assert time.monotonic() - started < 10
        room = [e for e in _dropped(bounded_scp) if "the oldest makes room" in e["reason"]]
        assert len(room) >= 20 - bounded_scp.max_negotiating and all(e["address"].startswith("127.0.0.1:")
                                                                      for e in room)
    finally:
        for sock in tricklers:
            sock.close()


@pytest.mark.parametrize("bounded_scp", [{"negotiation_s": 60, "idle_s": 60}], indirect=True)
def test_connections_still_negotiating_give_way_when_established_senders_hold_most_slots(bounded_scp):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(12) as pool:  # twelve senders at work: at most four slots left
        working = list(pool.map(lambda _: _associate(bounded_scp.port), range(12)))
    tricklers = _tricklers(bounded_scp.port, 10)
    try:
        time.sleep(1.0)
        assert _echoscu(bounded_scp.port) == 0  # before: rejected, 12 + 8 negotiating connections over 16 slots
        assert all(assoc.is_established for assoc in working)  # the senders at work are never the ones closed
        assert any("association slots were taken" in e["reason"] for e in _dropped(bounded_scp))
    finally:
        for sock in tricklers:
            sock.close()
        for assoc in working:
            assoc.release()


def test_a_silent_association_is_closed_after_idle_s(bounded_scp):
    assoc = _associate(bounded_scp.port)
    wait_until(lambda: not assoc.is_established, 6, "the node to close the idle association")
    assert [e["reason"] for e in _dropped(bounded_scp)] == ["idle for 2 s (idle_s)"]


@pytest.mark.parametrize("bounded_scp", [{"association_s": 3}], indirect=True)
def test_an_association_kept_busy_is_closed_at_association_s(bounded_scp):
    assoc = _associate(bounded_scp.port)
    started, answered = time.monotonic(), 0
    while assoc.is_established and time.monotonic() - started < 10:
        status = assoc.send_c_echo()  # never idle: a C-ECHO every 0.2 s
        answered += bool(status) and status.Status == 0
        time.sleep(0.2)
    assert not assoc.is_established and 2.5 < time.monotonic() - started < 5 and answered > 5
    assert [e["reason"] for e in _dropped(bounded_scp)] == ["association open over 3 s (association_s)"]


def _flood_after(header: bytes, sock: socket.socket, up_to: int = 64 << 20) -> int:
    """Send ``header`` then zeros until the node closes the connection; the bytes it took."""
    sock.sendall(header)
    sent, chunk = 0, b"\0" * (1 << 16)
    sock.settimeout(10)
    try:
        while sent < up_to:
            sent += sock.send(chunk)
    except OSError:  # reset or broken pipe: the node closed it
        return sent
    return sent


def test_a_pdu_longer_than_max_pdu_is_refused_before_it_is_read_and_audited(bounded_scp):
    import psutil

    rss = psutil.Process().memory_info().rss
    huge = struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0)  # an A-ASSOCIATE-RQ announcing 4 GB
    with socket.create_connection(("127.0.0.1", bounded_scp.port)) as raw:
        address = "{}:{}".format(*raw.getsockname()[:2])
        taken = _flood_after(huge, raw)
    assert taken < 16 << 20  # closed at once, not after reading 64 MB (nor 4 GB) into memory
    assoc = _associate(bounded_scp.port)  # and in an established association: a P-DATA-TF of 2 GB
    taken = _flood_after(struct.pack(">BBL", 0x04, 0, 1 << 31), assoc.dul.socket.socket)
    assert taken < 16 << 20
    assert psutil.Process().memory_info().rss - rss < 48 << 20
    wait_until(lambda: len(_dropped(bounded_scp)) == 2, 5, "both drops in the audit")
    dropped = _dropped(bounded_scp)
    assert dropped[0]["address"] == address
    assert [e["reason"] for e in dropped] == [
        f"A-ASSOCIATE-RQ PDU of {0xFFFFFFF0} bytes announced, over the node's limit of 1048576 for a PDU other "
        f"than P-DATA-TF", f"P-DATA-TF PDU of {1 << 31} bytes announced, over the node's maximum of 262144 "
        f"(max_pdu_kb 256)"]


@pytest.mark.parametrize("bounded_scp", [{"max_pdu_kb": 16}], indirect=True)
def test_senders_keep_to_the_maximum_pdu_the_node_announces(bounded_scp, phantom_studies):
    from pynetdicom import evt

    sent = storescu(sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[:2], bounded_scp.port)  # DCMTK, 16 KB PDUs
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(list((bounded_scp.spool.root / "studies").rglob("*.dcm"))) == 2 and not _dropped(bounded_scp)
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="PACS")  # an association request over 16 KB (120 contexts of 6 syntaxes): not a P-DATA-TF
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax, [*context.transfer_syntax, "1.2.840.10008.1.2.4.70",
                                                           "1.2.840.10008.1.2.4.80"])
    request = []
    assoc = ae.associate("127.0.0.1", bounded_scp.port, ae_title="SEGRAP",
                         evt_handlers=[(evt.EVT_PDU_SENT, lambda event: request.append(len(event.pdu.encode())))])
    assert assoc.is_established and request[0] > 16 * 1024 and not _dropped(bounded_scp)
    assoc.release()


def test_the_deadlines_and_maximum_pdu_are_node_settings_with_sane_bounds(tmp_path):
    from SegRapSegmenterLib.errors import InputError
    from SegRapSegmenterLib.node.config import load_config

    config = tmp_path / "node.toml"
    config.write_text('spool = "s"\nidle_s = 30\nassociation_s = 600\nmax_pdu_kb = 64\nnegotiation_s = 5\n')
    loaded = load_config(config)
    assert (loaded.idle_s, loaded.association_s, loaded.max_pdu_kb, loaded.negotiation_s) == (30, 600, 64, 5)
    assert (load_config(spool="s").idle_s, load_config(spool="s").max_pdu_kb) == (60, 256)
    with pytest.raises(InputError, match="max_pdu_kb = 8: choose from 16 to 65536"):
        load_config(spool="s", max_pdu_kb=8)
    with pytest.raises(InputError, match="idle_s = 0: choose from 1"):
        load_config(spool="s", idle_s=0)
