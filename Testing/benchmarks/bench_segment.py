"""Benchmark: `segrap segment` against stock `nnUNetv2_predict_from_modelfolder` on the same model and input.

A `full` phantom case (126 x 512 x 512 at 3 x 0.54 x 0.54 mm), both tasks, the same bundle, folds and
device, no test-time mirroring. Wall time and peak memory of the whole process tree (proportional
set size, so pages shared between nnU-Net's worker processes count once; sampled from /proc every
0.1 s) are printed per method and as ratios ours / stock.

    python Testing/benchmarks/bench_segment.py [--bundle demo] [--device cpu] [--size full] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found, frontier = [], [pid]
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    while frontier:
        current = frontier.pop()
        found.append(current)
        frontier.extend(parents.get(current, []))
    return found


def _tree_rss_bytes(pid: int) -> int:
    """Proportional set size (PSS) summed over the process tree: shared pages counted once in total."""
    total = 0
    for p in _children(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """Wall time (s), peak tree RSS (bytes) and exit code of a command."""
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(err[-2000:], file=sys.stderr)
    return wall, peak, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="full", choices=("small", "full"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tasks", default="oar,gtv")
    args = parser.parse_args()

    from SegRapSegmenterLib import phantom
    from SegRapSegmenterLib.models import resolve_bundle

    bundle = resolve_bundle(args.bundle)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-segment-"))
    case = phantom.make_case(0, seed=99, size=args.size)
    paths = phantom.write_case(case, work / "case")
    tasks = args.tasks.split(",")
    inputs = {"oar": paths.ct, "gtv": paths.contrast_ct}
    print(f"case {case.ct.GetSize()} spacing {case.ct.GetSpacing()}; bundle {bundle.name} {bundle.version}; "
          f"device {args.device}; tasks {tasks}", flush=True)

    stock_wall, stock_peak = 0.0, 0
    for task in tasks:
        folder = work / f"stock_in_{task}"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(inputs[task], folder / "case_0000.nii.gz")
        model = bundle.task(task)
        cmd = ["nnUNetv2_predict_from_modelfolder", "-i", str(folder), "-o", str(work / f"stock_out_{task}"),
               "-m", str(bundle.result_path(task)), "-f", *model.folds, "-device", args.device, "--disable_tta",
               "-npp", "1", "-nps", "1"]
        wall, peak, rc = measure(cmd)
        print(f"stock nnU-Net {task}: {wall:7.1f} s  peak PSS {peak / 2**30:6.2f} GiB  (exit {rc})", flush=True)
        stock_wall += wall
        stock_peak = max(stock_peak, peak)

    cmd = [sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(paths.ct), "--contrast-ct",
           str(paths.contrast_ct), "--out", str(work / "ours"), "--bundle", args.bundle, "--device", args.device,
           "--no-mirror", "--tasks", args.tasks, "--json"]
    ours_wall, ours_peak, rc = measure(cmd)
    print(f"segrap segment ({'+'.join(tasks)}): {ours_wall:7.1f} s  peak PSS {ours_peak / 2**30:6.2f} GiB  (exit {rc})")
    print(f"stock nnU-Net ({'+'.join(tasks)}): {stock_wall:7.1f} s  peak PSS {stock_peak / 2**30:6.2f} GiB")
    print(f"ratios ours/stock: wall time {ours_wall / stock_wall:.2f}, peak PSS {ours_peak / stock_peak:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
