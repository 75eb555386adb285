"""Load on the DICOM node: N studies sent at once, quietly and then under attack; each RTSTRUCT delivered once.

    python Testing/benchmarks/bench_node.py [--studies 10] [--settle 5] [--workers 1] [--device cpu]
        [--tricklers 20] [--trickle-s 3] [--oversized 6] [--max-instance-mb 8] [--no-hostile]
    python Testing/benchmarks/bench_node.py --nodes 1,2,3 [--queue postgresql://USER@HOST/DB] [--studies 6]

Writes 2 x N small phantom studies (CT + contrast CT, 96 instances each), starts DCMTK's storescp
as the planning system (``+uf``: every copy it receives is a file of its own) and one ``segrap
serve`` (demo bundle) on loopback ports. Quiet phase: N studies, each sent by its own storescu
process at the same moment. Hostile phase, same node: the other N studies sent the same way while
``--tricklers`` connections each trickle a valid A-ASSOCIATE-RQ one byte per ``--trickle-s``
seconds (reconnecting whenever the node drops them) and a pynetdicom sender C-STOREs
``--oversized`` CT data sets over ``--max-instance-mb`` (alternately 1.5 and 3 times the cap). A
storescu whose association is rejected (the node's 16 slots taken) tries again after a second, as
a scanner's queue would. Prints, per study and phase, the seconds from its first received instance
to the destination's confirmation (the node's audit log) and how many RTSTRUCTs the destination
received for it (must be 1), the node's peak memory in each phase (psutil's resident set of the
node process alone, and of the node with its worker processes, sampled every 0.2 s), and what the
node did with the attack (its audit: associations dropped and rejected, instances refused).

With ``--nodes``, for each count N given: N ``segrap serve`` processes on one spool folder and one
PostgreSQL queue (a fresh database per round: on the server of ``--queue``, whose user needs
CREATEDB, or on a throwaway server this script starts like the tests' fixture), one CPU worker
each with its own thread budget (``--threads``, default the CPUs divided by N); the studies go
round-robin to the nodes' ports at once. Prints studies per hour and the scaling efficiency
(rate with N nodes / (N x the rate with one)); every study must reach the destination once.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pydicom
from SegRapSegmenterLib.phantom.dicom_series import write_variant

ROOT = Path(__file__).resolve().parents[2]


def dcmtk(tool: str) -> str:
    """DCMTK's program (pynetdicom installs scripts of the same names)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / tool
        if path.is_file() and os.access(path, os.X_OK):
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(path)
    sys.exit(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(spool: Path, kind: str) -> list[dict]:
    path = spool / "audit.jsonl"
    if not path.is_file():
        return []
    return [e for e in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if e["event"] == kind]


class MemorySampler(threading.Thread):
    """Peak RSS of a process alone and with all its descendants."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak_node = self.peak_tree = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                node = self.process.memory_info().rss
                tree = node + sum(c.memory_info().rss for c in self.process.children(recursive=True))
            except psutil.Error:
                tree = node = 0
            self.peak_node, self.peak_tree = max(self.peak_node, node), max(self.peak_tree, tree)
            self.done.wait(0.2)


CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def associate_rq(called: str = "SEGRAP", calling: str = "TRICKLER") -> bytes:
    """A valid A-ASSOCIATE-RQ PDU (CT Image Storage, implicit VR little endian), as a scanner opens with."""
    def item(kind: int, body: bytes) -> bytes:
        return bytes([kind, 0]) + struct.pack(">H", len(body)) + body

    context = item(0x10, b"1.2.840.10008.3.1.1.1")
    presentation = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, CT_IMAGE_STORAGE.encode())
                        + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
            + context + presentation + user)
    return b"\x01\x00" + struct.pack(">I", len(body)) + body


class Trickler(threading.Thread):
    """One connection sending an A-ASSOCIATE-RQ a byte at a time; reconnects when the node drops it."""

    def __init__(self, port: int, every_s: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.every_s, self.stop = port, every_s, stop
        self.connections = self.dropped = self.completed = 0

    def run(self) -> None:
        pdu = associate_rq()
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    self.connections += 1
                    for i in range(len(pdu)):
                        if self.stop.wait(self.every_s if i else 0):
                            return
                        if select.select([sock], [], [], 0)[0] and not sock.recv(4096):
                            break  # the node closed it
                        sock.sendall(pdu[i:i + 1])
                    else:
                        self.completed += 1  # the whole request went through: the node did not drop it
                        continue
                    self.dropped += 1
            except OSError:
                self.dropped += 1
                self.stop.wait(0.2)


def oversized_ct(template: Path, megabytes: float) -> pydicom.Dataset:
    """A CT data set of about ``megabytes`` (a phantom slice's header, a larger zero image, new UIDs)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    columns = 2048
    rows = int(megabytes * 1e6 / (columns * 2)) + 1
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = bytes(rows * columns * 2)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def send_oversized(port: int, template: Path, count: int, cap_mb: float, results: Counter) -> None:
    """C-STORE ``count`` data sets over the cap, alternately 1.5 and 3 times it; tallies what became of them."""
    from pynetdicom import AE

    for k in range(count):
        ds = oversized_ct(template, cap_mb * (1.5 if k % 2 == 0 else 3.0))
        ae = AE(ae_title="BIGSENDER")
        ae.add_requested_context(CT_IMAGE_STORAGE, str(ds.file_meta.TransferSyntaxUID))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        for _ in range(30):  # rejected while the tricklers hold the slots: try again, as a sender would
            assoc = ae.associate("127.0.0.1", port, ae_title="SEGRAP")
            if assoc.is_established:
                break
            results["association rejected, retried"] += 1
            time.sleep(1.0)
        else:
            results["never associated"] += 1
            continue
        reply = assoc.send_c_store(ds)
        status = int(reply.Status) if "Status" in reply else None
        results["stored (wrong)" if status == 0 else f"refused 0x{status:04X}" if status is not None
                else "association dropped"] += 1
        if assoc.is_established:
            assoc.release()


def send_study(storescu: str, port: int, study, attempts: int = 60) -> int:
    """Send a study with storescu, trying again after a second when it fails; returns the failed attempts."""
    for failed in range(attempts):
        run = subprocess.run([storescu, "-aet", "SCANNER", "-aec", "SEGRAP", "+sd", "+r", "127.0.0.1", str(port),
                              str(study.ct_dir), str(study.contrast_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if run.returncode == 0:
            return failed
        time.sleep(1.0)
    return attempts


def run_phase(name: str, studies, node: subprocess.Popen, storescu: str, node_port: int, spool: Path,
              tps: Path, timeout: float, hostile: dict | None = None) -> dict:
    """Send ``studies`` at once (with the attack when ``hostile``) and wait for their deliveries."""
    uids = {s.study_uid for s in studies}
    stop = threading.Event()
    tricklers: list[Trickler] = []
    oversize = Counter()
    threads: list[threading.Thread] = []
    events_before = {kind: len(events(spool, kind)) for kind in
                     ("association_dropped", "association_rejected", "instance_refused")}
    sampler = MemorySampler(node.pid)
    sampler.start()
    if hostile:
        tricklers = [Trickler(node_port, hostile["trickle_s"], stop) for _ in range(hostile["tricklers"])]
        for t in tricklers:
            t.start()
        time.sleep(1.0)  # the slots are taken before the studies come
        template = sorted(studies[0].ct_dir.glob("*.dcm"))[0]
        threads.append(threading.Thread(target=send_oversized, daemon=True, args=(
            node_port, template, hostile["oversized"], hostile["max_instance_mb"], oversize)))
    t0 = time.time()
    retries: list[int] = []
    senders = [threading.Thread(target=lambda s=s: retries.append(send_study(storescu, node_port, s)), daemon=True)
               for s in studies]
    for t in threads + senders:
        t.start()
    for t in senders:
        t.join()
    sent_all = time.time() - t0  # the studies' senders, not the attacker's big data sets (each waits on its drop)
    for t in threads:
        t.join()
    while len({e["study_uid"] for e in events(spool, "finished") + events(spool, "failed")} & uids) < len(uids):
        if time.time() - t0 > timeout or node.poll() is not None:
            break
        time.sleep(1.0)
    total = time.time() - t0
    stop.set()
    sampler.done.set()
    sampler.join()
    copies = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                     for p in tps.iterdir() if p.is_file())
    latency = {e["study_uid"]: e["received_to_sent_s"] for e in events(spool, "sent") if e["study_uid"] in uids}
    return {"name": name, "sent_all_s": sent_all, "total_s": total, "retries": sum(retries),
            "latency": [latency.get(s.study_uid, float("nan")) for s in studies],
            "copies": [copies.get(s.study_uid, 0) for s in studies],
            "sent_events": Counter(e["study_uid"] for e in events(spool, "sent") if e["study_uid"] in uids),
            "peak_node_mib": sampler.peak_node / 2**20, "peak_tree_mib": sampler.peak_tree / 2**20,
            "tricklers": {"connections": sum(t.connections for t in tricklers),
                          "dropped": sum(t.dropped for t in tricklers),
                          "completed": sum(t.completed for t in tricklers)} if hostile else None,
            "oversized": dict(oversize) if hostile else None,
            "audit": {kind: len(events(spool, kind)) - n for kind, n in events_before.items()}}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def report(phases: list[dict], studies: int) -> bool:
    """Print the phases side by side; True when every study of every phase got exactly one RTSTRUCT."""
    print(f"{'study':>6} " + " ".join(f"{p['name'] + ' received->delivered s':>32} {'copies':>6}" for p in phases))
    for i in range(studies):
        print(f"{i:>6} " + " ".join(f"{p['latency'][i]:>32.1f} {p['copies'][i]:>6}" for p in phases))
    ok = True
    for p in phases:
        once = all(c == 1 for c in p["copies"]) and all(n == 1 for n in p["sent_events"].values()) \
            and len(p["sent_events"]) == studies
        ok = ok and once
        lat = p["latency"]
        print(f"{p['name']}: delivered exactly once: {'yes' if once else 'NO'}; received->delivered min "
              f"{min(lat):.1f} s, median {_median(lat):.1f} s, max {max(lat):.1f} s; all instances in after "
              f"{p['sent_all_s']:.1f} s (storescu retries {p['retries']}), all delivered after {p['total_s']:.1f} s; "
              f"peak RSS: node process {p['peak_node_mib']:.0f} MiB, node with its workers "
              f"{p['peak_tree_mib']:.0f} MiB")
        if p["tricklers"] is not None:
            print(f"  attack: trickling connections {p['tricklers']}, oversized C-STOREs {p['oversized']}")
        print(f"  node's audit in this phase: {p['audit']}")
    return ok


def _database(server_url: str | None, name: str, own: list) -> str:
    """A new, empty database for one round: on the --queue server, or on a PostgreSQL this script starts."""
    if server_url is None:
        if not own:
            sys.path.insert(0, str(ROOT / "Testing"))
            import postgres_peer

            bin_dir = postgres_peer.postgres_bin_dir()
            if bin_dir is None:
                sys.exit("PostgreSQL is not installed (Debian package postgresql); or give --queue URL")
            own.append(postgres_peer._start(bin_dir))
        return own[0].create_database(name)
    import psycopg
    from urllib.parse import urlsplit

    with psycopg.connect(server_url, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name if urlsplit(server_url).path else server_url + "/" + name


def _cluster_round(n: int, studies, args, queue: str, work: Path, env: dict, storescu: str, storescp: str) -> float:
    """N nodes on one spool and queue; returns studies per hour (first send to the last RTSTRUCT confirmed)."""
    import psycopg

    round_dir = work / f"nodes{n}"
    tps_port, spool, tps = free_port(), round_dir / "spool", round_dir / "tps"
    tps.mkdir(parents=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    procs = [subprocess.Popen([storescp, "-aet", "TPS", "-od", str(tps), str(tps_port)])]
    ports = [free_port() for _ in range(n)]
    try:
        log = open(round_dir / "serve.log", "w")
        for i, port in enumerate(ports):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--spool", str(spool), "--queue", queue, "--node-name", f"bench-{i}", "--bundle", "demo",
                 "--device", args.device, "--settle", str(args.settle), "--workers", "1", "--threads", str(threads),
                 "--destination", f"TPS@127.0.0.1:{tps_port}"], stdout=log, stderr=log, env=env))
        while not all((spool / f"audit-bench-{i}.jsonl").is_file() and "\"started\"" in
                      (spool / f"audit-bench-{i}.jsonl").read_text() for i in range(n)):
            if any(p.poll() is not None for p in procs[1:]):
                sys.exit(f"segrap serve exited: {(round_dir / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        t0 = time.time()
        senders = [subprocess.Popen([storescu, "-aet", "SCANNER", "-aec", "SEGRAP", "+sd", "+r", "127.0.0.1",
                                     str(ports[i % n]), str(s.ct_dir), str(s.contrast_dir)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i, s in enumerate(studies)]
        failed_senders = sum(p.wait() != 0 for p in senders)
        with psycopg.connect(queue) as db:
            while True:
                states = Counter(r[0] for r in db.execute("SELECT state FROM jobs").fetchall())
                if states["sent"] + states["failed"] >= len(studies) or time.time() - t0 > args.timeout:
                    break
                time.sleep(1.0)
        total = time.time() - t0
        files = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                        for p in tps.iterdir() if p.is_file())
        once = all(files.get(s.study_uid) == 1 for s in studies)
        rate = states["sent"] / total * 3600
        print(f"{n} node(s), {threads} thread(s) each: {states['sent']}/{len(studies)} studies sent in {total:.1f} s "
              f"= {rate:.1f} studies/hour; failed {states['failed']}, sender errors {failed_senders}, "
              f"each delivered once: {'yes' if once else 'NO'}", flush=True)
        return rate if once else float("nan")
    finally:
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for p in procs[1:]:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        procs[0].kill()
        procs[0].wait()


def cluster_main(args) -> int:
    """--nodes: studies per hour for each node count, and the scaling efficiency against one node."""
    storescu, storescp = dcmtk("storescu"), dcmtk("storescp")
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    own: list = []
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SegRapSegmenter"))
    try:
        studies = [write_variant("standard", work / f"study{i}", index=i) for i in range(args.studies)]
        counts = [int(c) for c in args.nodes.split(",")]
        rates = {}
        for n in counts:
            queue = _database(args.queue, f"segrap_bench_{n}_{os.getpid()}", own)
            rates[n] = _cluster_round(n, studies, args, queue, work, env, storescu, storescp)
        base = rates.get(1)
        for n, rate in rates.items():
            efficiency = f"{rate / (n * base):.2f}" if base else "n/a (no 1-node round)"
            print(f"nodes {n}: {rate:.1f} studies/hour, scaling efficiency {efficiency}")
        print(f"machine: {os.cpu_count()} CPUs; shared with other work, the numbers are a lower bound")
        return 0 if all(r == r for r in rates.values()) else 1
    finally:
        if own:
            sys.path.insert(0, str(ROOT / "Testing"))
            import postgres_peer

            postgres_peer._stop(own[0])
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on a phase after this many seconds")
    parser.add_argument("--tricklers", type=int, default=20)
    parser.add_argument("--trickle-s", type=float, default=3.0, help="seconds between a trickler's bytes")
    parser.add_argument("--oversized", type=int, default=6)
    parser.add_argument("--max-instance-mb", type=float, default=8.0)
    parser.add_argument("--no-hostile", action="store_true", help="the quiet phase only")
    parser.add_argument("--nodes", help="node counts to compare on one PostgreSQL queue, e.g. 1,2,3")
    parser.add_argument("--queue", help="postgresql://USER@HOST/DB whose server gets a database per round "
                        "(default: a throwaway PostgreSQL this script starts)")
    parser.add_argument("--threads", type=int, help="--nodes: CPU threads of each node's worker "
                        "(default: the CPUs divided by the node count)")
    args = parser.parse_args()
    if args.nodes:
        return cluster_main(args)
    storescu, storescp = dcmtk("storescu"), dcmtk("storescp")
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    procs: list[subprocess.Popen] = []
    try:
        phases = 1 if args.no_hostile else 2
        studies = [write_variant("standard", work / f"study{i}", index=i) for i in range(phases * args.studies)]
        tps_port, node_port, spool = free_port(), free_port(), work / "spool"
        (work / "tps").mkdir()
        procs.append(subprocess.Popen([storescp, "-aet", "TPS", "+uf", "-od", str(work / "tps"), str(tps_port)]))
        env = dict(os.environ, PYTHONPATH=str(ROOT / "SegRapSegmenter"))
        log = open(work / "serve.log", "w")
        node = subprocess.Popen([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(node_port), "--spool", str(spool), "--bundle", "demo", "--device",
                                 args.device, "--settle", str(args.settle), "--workers", str(args.workers),
                                 "--max-instance-mb", str(args.max_instance_mb),
                                 "--destination", f"TPS@127.0.0.1:{tps_port}"], stdout=log, stderr=log, env=env)
        procs.append(node)
        while not events(spool, "started"):
            if node.poll() is not None:
                sys.exit(f"segrap serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)
        n = args.studies
        results = [run_phase("quiet", studies[:n], node, storescu, node_port, spool, work / "tps", args.timeout)]
        if not args.no_hostile:
            results.append(run_phase("hostile", studies[n:], node, storescu, node_port, spool, work / "tps",
                                     args.timeout, {"tricklers": args.tricklers, "trickle_s": args.trickle_s,
                                                    "oversized": args.oversized,
                                                    "max_instance_mb": args.max_instance_mb}))
        node.send_signal(signal.SIGTERM)
        node.wait(120)
        print(f"{n} studies per phase, each sent by its own storescu process at the same moment; one node "
              f"({args.workers} worker(s), {args.device}), settle {args.settle:g} s")
        ok = report(results, n)
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
