"""Mutual TLS: the node's SCP and ``segrap send`` with DCMTK's echoscu, storescu and storescp speaking ``+tls``."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from node_peers import dcmtk, free_port, make_pki, storescu, wait_until
from SegRapSegmenterLib.errors import DicomNetworkError, InputError
from SegRapSegmenterLib.node.address import Destination
from SegRapSegmenterLib.node.audit import AuditLog
from SegRapSegmenterLib.node.scp import StorageScp
from SegRapSegmenterLib.node.scu import echo, send_files
from SegRapSegmenterLib.node.spool import Spool
from SegRapSegmenterLib.node.tls import TlsFiles, tls_files


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_scp(tmp_path, pki):
    spool = Spool(tmp_path / "spool")
    server = StorageScp("SEGRAP", "127.0.0.1", 0, spool, AuditLog(spool.audit_path), negotiation_s=3,
                        tls=TlsFiles(pki["node_crt"], pki["node_key"], pki["ca_crt"]))
    server.start()
    yield server
    server.stop()
    spool.close()


def _echoscu(port: int, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aet", "SCANNER", "-aec", "SEGRAP", *tls, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_the_scp_admits_only_peers_with_a_certificate_signed_by_the_ca(tls_scp, pki, phantom_studies):
    client = ("+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"]))
    assert _echoscu(tls_scp.port, *client).returncode == 0
    assert _echoscu(tls_scp.port).returncode != 0  # plain TCP on the TLS port
    rogue = ("+tls", str(pki["rogue_key"]), str(pki["rogue_crt"]), "+cf", str(pki["ca_crt"]))
    assert _echoscu(tls_scp.port, *rogue).returncode != 0  # a certificate the CA did not sign
    anonymous = ("+tla", "+cf", str(pki["ca_crt"]))
    assert _echoscu(tls_scp.port, *anonymous).returncode != 0  # no certificate at all

    # a connection that never starts its handshake does not hold up the others (the handshake runs in the
    # association's thread, under the negotiation deadline, not in the thread that accepts connections)
    with socket.create_connection(("127.0.0.1", tls_scp.port)):
        first = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]
        sent = storescu(first, tls_scp.port, options=client)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(list((tls_scp.spool.root / "studies").rglob("*.dcm"))) == 1

    ours = TlsFiles(pki["client_crt"], pki["client_key"], pki["ca_crt"])
    echo(Destination("SEGRAP", "127.0.0.1", tls_scp.port), "CT1", tls=ours)
    with pytest.raises(DicomNetworkError):
        echo(Destination("SEGRAP", "127.0.0.1", tls_scp.port), "CT1", timeout=5)


def test_send_speaks_mutual_tls_to_dcmtk_storescp_and_refuses_a_server_the_ca_did_not_sign(
        tmp_path, pki, phantom_studies):
    port = free_port()
    folder = tmp_path / "tps"
    folder.mkdir()
    storescp = subprocess.Popen([dcmtk("storescp"), "-aet", "TPS", "-od", str(folder), "+tls", str(pki["node_key"]),
                                 str(pki["node_crt"]), "+cf", str(pki["ca_crt"]), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "storescp +tls to listen")
        first = sorted(phantom_studies[0].ct_dir.glob("*.dcm"))[0]
        cli = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "send", str(first), "--to",
                              f"TPS@127.0.0.1:{port}", "--tls-cert", str(pki["client_crt"]), "--tls-key",
                              str(pki["client_key"]), "--tls-ca", str(pki["ca_crt"])],
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        wait_until(lambda: len(list(folder.iterdir())) == 1, 30, "the file at storescp")
        # trusting another CA only: the server's certificate does not verify, nothing is sent
        stranger = TlsFiles(pki["rogue_crt"], pki["rogue_key"], pki["rogue_crt"])
        with pytest.raises(DicomNetworkError):
            send_files([first], Destination("TPS", "127.0.0.1", port), tls=stranger, timeout=10)
    finally:
        storescp.terminate()
        storescp.wait(30)
    with pytest.raises(InputError, match="all three"):
        tls_files(pki["client_crt"], None, pki["ca_crt"])


def _storescp_tls(folder, port: int, pki, name: str = "node") -> subprocess.Popen:
    """DCMTK's storescp as a planning system that takes mutual-TLS peers signed by its CA only."""
    folder.mkdir()
    process = subprocess.Popen([dcmtk("storescp"), "-od", str(folder), "+tls", str(pki[f"{name}_key"]),
                                str(pki[f"{name}_crt"]), "+cf", str(pki["ca_crt"]), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, "storescp +tls to listen")
    return process


def test_the_node_takes_studies_over_mutual_tls_only_and_delivers_with_each_destinations_tls_files(
        tmp_path, pki, phantom_studies, node_factory, storescp_factory):
    from node_peers import audit_events

    planning = make_pki(tmp_path / "planning-pki")  # a planning system's own CA, not the node's
    port, spool = free_port(), tmp_path / "spool"
    tps_port, good_port, bad_port = free_port(), free_port(), free_port()
    planning_systems = [_storescp_tls(tmp_path / "tps", tps_port, pki, "client"),  # the node's CA, [delivery] tls
                        _storescp_tls(tmp_path / "plan", good_port, planning),
                        _storescp_tls(tmp_path / "plan2", bad_port, planning)]
    pacs = storescp_factory(tmp_path / "pacs", free_port(), "PACS")  # plain TCP: tls = false
    own = f'tls_cert = "{planning["client_crt"]}", tls_key = "{planning["client_key"]}"'
    config = tmp_path / "node.toml"
    config.write_text(f'tls_cert = "{pki["node_crt"]}"\ntls_key = "{pki["node_key"]}"\ntls_ca = "{pki["ca_crt"]}"\n'
                      f'destinations = ["TPS@127.0.0.1:{tps_port}",\n'
                      f'  {{address = "PACS@127.0.0.1:{pacs.port}", tls = false}},\n'
                      f'  {{address = "PLAN@127.0.0.1:{good_port}", {own}, tls_ca = "{planning["ca_crt"]}"}},\n'
                      f'  {{address = "PLAN@127.0.0.1:{bad_port}", {own}, tls_ca = "{planning["rogue_crt"]}"}}]\n'
                      f'[delivery]\ntls = true\nfirst_delay_s = 120\n')  # a retry would come after the test's wait
    try:
        node = node_factory(spool, port, "--config", str(config), "--settle", "1", "--tasks", "oar",
                            ready=TlsFiles(pki["client_crt"], pki["client_key"], pki["ca_crt"]))
        client = ("+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"]))
        assert storescu(phantom_studies[0].ct_dir, port).returncode != 0  # plain TCP: nothing gets in
        assert storescu(phantom_studies[0].ct_dir, port, options=client).returncode == 0
        wait_until(lambda: audit_events(spool, "failed"), 240, "the deliveries to be concluded", interval=1)
        started = audit_events(spool, "started")[0]
        assert started["tls"] == "mutual" and len(started["destinations_tls"]) == 3  # all but the PACS
        status = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--status", "--spool",
                                 str(spool)], capture_output=True, text=True, timeout=60)
        assert f"node: running (pid {node.process.pid}" in status.stdout, status.stdout + status.stderr
        assert node.terminate() == 0
    finally:
        for process in planning_systems:
            process.terminate()
            process.wait(30)
    assert {e["destination"] for e in audit_events(spool, "sent")} == \
        {f"TPS@127.0.0.1:{tps_port}", f"PACS@127.0.0.1:{pacs.port}", f"PLAN@127.0.0.1:{good_port}"}
    assert [len(list((tmp_path / name).iterdir())) for name in ("tps", "pacs", "plan", "plan2")] == [1, 1, 1, 0]
    refused = audit_events(spool, "delivery_failed")  # the one whose CA is wrong: at once, not retried
    assert [(e["destination"], e["attempt"], e["permanent"]) for e in refused] == \
        [(f"PLAN@127.0.0.1:{bad_port}", 1, True)] and not audit_events(spool, "delivery_retry")
    assert "not signed by our CA (tls_ca): CERTIFICATE_VERIFY_FAILED" in refused[0]["error"]


def test_a_destination_table_names_its_tls_files_or_plain_and_a_wrong_one_says_what(tmp_path, pki):
    from SegRapSegmenterLib.node.config import load_config

    node = f'tls_cert = "{pki["node_crt"]}"\ntls_key = "{pki["node_key"]}"\ntls_ca = "{pki["ca_crt"]}"\n'
    own = f'tls_cert = "{pki["client_crt"]}", tls_key = "{pki["client_key"]}", tls_ca = "{pki["rogue_crt"]}"'
    config = tmp_path / "node.toml"
    config.write_text(f'spool = "s"\n{node}destinations = ["A@h:1", {{address = "B@h:2", tls = false}}, '
                      f'{{address = "C@h:3", {own}}}]\n[delivery]\ntls = true\n')
    a, b, c = load_config(config).destinations
    assert a.tls == TlsFiles(pki["node_crt"], pki["node_key"], pki["ca_crt"]) and b.tls is None
    assert c.tls == TlsFiles(pki["client_crt"], pki["client_key"], pki["rogue_crt"])
    assert [str(d) for d in (a, b, c)] == ["A@h:1", "B@h:2", "C@h:3"]  # the spool's keys do not change
    config.write_text('spool = "s"\n[[destinations]]\naddress = "A@h:1"\ntls = true\n')
    with pytest.raises(InputError, match="tls = true needs the node's tls_cert"):
        load_config(config)
    config.write_text(f'spool = "s"\n[[destinations]]\naddress = "A@h:1"\ntls_cert = "{pki["client_crt"]}"\n')
    with pytest.raises(InputError, match="destination 'A@h:1': tls_cert/tls_key/tls_ca: give all three"):
        load_config(config)
    config.write_text('spool = "s"\n[[destinations]]\naddress = "A@h:1"\ntls_ca_file = "x"\n')
    with pytest.raises(InputError, match="unknown tls_ca_file"):
        load_config(config)
