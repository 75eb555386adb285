"""Load on the DICOM node: N studies sent at once by parallel storescu processes, each RTSTRUCT delivered once.

    python Testing/benchmarks/bench_node.py [--studies 10] [--settle 5] [--workers 1] [--device cpu]
    python Testing/benchmarks/bench_node.py --nodes 1,2,3 [--queue postgresql://USER@HOST/DB] [--studies 6]

Writes N small phantom studies (CT + contrast CT, 96 instances each), starts DCMTK's storescp as
the planning system and ``segrap serve`` (demo bundle) on loopback ports, sends every study with
its own storescu process at the same moment, and waits until every study is sent. Prints, per
study, the seconds from its first received instance to the destination's confirmation (the
node's audit log), how many RTSTRUCTs each study got (must be 1), and the node's peak memory
(resident set of the node process, and of the node with its worker processes, sampled every 0.2 s).

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
import shutil
import signal
import socket
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
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
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
        studies = [write_variant("standard", work / f"study{i}", index=i) for i in range(args.studies)]
        tps_port, node_port, spool = free_port(), free_port(), work / "spool"
        procs.append(subprocess.Popen([storescp, "-aet", "TPS", "-od", str(work / "tps"), str(tps_port)]))
        (work / "tps").mkdir()
        env = dict(os.environ, PYTHONPATH=str(ROOT / "SegRapSegmenter"))
        log = open(work / "serve.log", "w")
        node = subprocess.Popen([sys.executable, "-m", "SegRapSegmenterLib.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(node_port), "--spool", str(spool), "--bundle", "demo", "--device",
                                 args.device, "--settle", str(args.settle), "--workers", str(args.workers),
                                 "--destination", f"TPS@127.0.0.1:{tps_port}"], stdout=log, stderr=log, env=env)
        procs.append(node)
        while not events(spool, "started"):
            if node.poll() is not None:
                sys.exit(f"segrap serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(1.0)
        sampler = MemorySampler(node.pid)
        sampler.start()
        t0 = time.time()
        senders = [subprocess.Popen([storescu, "-aet", "SCANNER", "-aec", "SEGRAP", "+sd", "+r", "127.0.0.1",
                                     str(node_port), str(s.ct_dir), str(s.contrast_dir)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for s in studies]
        failed_senders = sum(p.wait() != 0 for p in senders)
        sent_all = time.time() - t0
        while len(events(spool, "finished")) + len(events(spool, "failed")) < len(studies):
            if time.time() - t0 > args.timeout or node.poll() is not None:
                break
            time.sleep(1.0)
        total = time.time() - t0
        sampler.done.set()
        sampler.join()
        node.send_signal(signal.SIGTERM)
        node.wait(120)

        sent = events(spool, "sent")
        per_study = Counter(e["study_uid"] for e in sent)
        files = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                        for p in (work / "tps").iterdir() if p.is_file())
        started = {e["study_uid"]: e for e in events(spool, "job_started")}
        print(f"studies: {len(studies)} sent by {len(studies)} parallel storescu processes "
              f"({failed_senders} failed), all instances received after {sent_all:.1f} s")
        print(f"{'study':>6} {'received->delivered s':>22} {'segmentation s':>15} {'RTSTRUCTs at TPS':>17}")
        finished = {e["study_uid"]: e for e in events(spool, "job_finished")}
        times = []
        for i, s in enumerate(studies):
            e = next((e for e in sent if e["study_uid"] == s.study_uid), None)
            seconds = e["received_to_sent_s"] if e else float("nan")
            times.append(seconds)
            print(f"{i:>6} {seconds:>22.1f} {finished.get(s.study_uid, {}).get('seconds', float('nan')):>15.1f} "
                  f"{files.get(s.study_uid, 0):>17}")
        ok = all(per_study[s.study_uid] == 1 and files.get(s.study_uid) == 1 for s in studies)
        print(f"delivered exactly once: {'yes' if ok else 'NO'} ({sum(files.values())} RTSTRUCT files for "
              f"{len(started)} studies started)")
        print(f"received->delivered: min {min(times):.1f} s, median {sorted(times)[len(times) // 2]:.1f} s, "
              f"max {max(times):.1f} s; all done after {total:.1f} s")
        print(f"peak memory: node process {sampler.peak_node / 2**20:.0f} MiB, node with its worker "
              f"{sampler.peak_tree / 2**20:.0f} MiB")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
