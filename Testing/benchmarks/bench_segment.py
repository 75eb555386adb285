"""Benchmark: `segrap segment` against stock nnU-Net (`nnUNetv2_predict_from_modelfolder`) on the same model and input.

A `full` phantom case (126 x 512 x 512 at 3 x 0.54 x 0.54 mm; `--size 1024`: the same case resampled
to 126 x 1024 x 1024 at 0.27 mm), both tasks, the same bundle, folds and device, no test-time
mirroring. Wall time and peak memory of the whole process tree (proportional set size, so pages
shared between nnU-Net's worker processes count once; sampled from /proc every 0.1 s) are printed
per method and as ratios ours / stock. Each command runs twice: once sampled, for its memory, and
once unobserved, for its wall time (reading a process's smaps takes ~25 ms for a 1.4 GB process and
holds its memory-map lock, so sampling slows the process it measures: ours by 2-5 s of ~18 s, 10-20%,
on 2 cores). Both walls are printed; the ratio uses the unobserved ones (`--single-run`: one sampled
run each, as before). A run whose memory passes `--cap-gib` is killed and reported
as such (stock nnU-Net on a 1024 x 1024 case needs more than this machine has).

Agreement: ours is run without the largest-component clean-up, so both outputs are the networks'
labels; the 54-class map of our Task 1 structures (``decompose``) and our GTV labels are compared
voxel by voxel with stock's, and every structure's Dice between the two is printed.

    python Testing/benchmarks/bench_segment.py [--bundle demo] [--device cpu] [--size full|1024|small]
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


def unobserved_wall(cmd: list[str]) -> float:
    """Wall time (s) of a command run with nothing sampling it (nan when it fails)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0 if done.returncode == 0 else float("nan")


def measure(cmd: list[str], env: dict | None = None, cap_bytes: int | None = None) -> tuple[float, int, int]:
    """Wall time (s), peak tree PSS (bytes) and exit code of a command (-9: killed above ``cap_bytes``)."""
    import signal

    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            if cap_bytes and peak > cap_bytes:
                os.killpg(proc.pid, signal.SIGKILL)
                return
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


def _simulated_1024(case):
    """The phantom case resampled in-plane to 1024 x 1024 (0.27 mm), as a high-resolution planning CT."""
    import SimpleITK as sitk

    def finer(image, fill):
        spacing = (image.GetSpacing()[0] / 2, image.GetSpacing()[1] / 2, image.GetSpacing()[2])
        size = (image.GetSize()[0] * 2, image.GetSize()[1] * 2, image.GetSize()[2])
        origin = image.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, 0.0))
        return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, image.GetDirection(),
                             fill, image.GetPixelID())

    return finer(case.ct, -1000.0), finer(case.contrast_ct, -1000.0)


def agreement(ours_seg: Path, stock: dict[str, Path]) -> None:
    """Voxel agreement of the label maps and per-structure Dice, ours vs stock."""
    import numpy as np
    import SimpleITK as sitk
    from SegRapSegmenterLib.anatomy import structures as S
    from SegRapSegmenterLib.evaluation import metrics
    from SegRapSegmenterLib.formats.segfile import read_seg_nrrd

    ours = read_seg_nrrd(ours_seg).masks
    dices = {}
    for task, path in stock.items():
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if task == "oar":
            mine = S.decompose({n: ours[n] for n in S.OAR_NAMES})
            theirs_masks = S.recompose(theirs)
        else:
            mine = np.zeros_like(theirs)
            for s in S.GTVS:
                mine[ours[s.name]] = s.label
            theirs_masks = S.recompose_gtv(theirs)
        same = float(np.mean(mine == theirs))
        print(f"  {task}: labels identical on {same:.5%} of voxels ({int((mine != theirs).sum())} differ)")
        for name in theirs_masks:
            dices[name] = metrics.dice(np.asarray(theirs_masks[name]), ours[name])
    worst = sorted(dices.items(), key=lambda kv: kv[1])[:5]
    print(f"  per-structure Dice ours vs stock: min {worst[0][1]:.4f} ({worst[0][0]}); lowest five: "
          + ", ".join(f"{n} {d:.4f}" for n, d in worst))
    print(f"  structures with Dice >= 0.99: {sum(d >= 0.99 for d in dices.values())} of {len(dices)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="full", choices=("small", "full", "1024"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tasks", default="oar,gtv")
    parser.add_argument("--cap-gib", type=float, default=20.0, help="kill a run whose memory passes this")
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--single-run", action="store_true",
                        help="one sampled run per command; its wall time is the one compared")
    args = parser.parse_args()

    import SimpleITK as sitk
    from SegRapSegmenterLib.inference.bundles import resolve_bundle
    from SegRapSegmenterLib.phantom import cases as phantom

    bundle = resolve_bundle(args.bundle)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-segment-"))
    case = phantom.make_case(0, seed=99, size="small" if args.size == "small" else "full")
    paths = phantom.write_case(case, work / "case")
    inputs = {"oar": paths.ct, "gtv": paths.contrast_ct}
    size = case.ct.GetSize()
    if args.size == "1024":
        ct, contrast = _simulated_1024(case)
        inputs = {"oar": work / "ct_1024.nii.gz", "gtv": work / "contrast_1024.nii.gz"}
        sitk.WriteImage(ct, str(inputs["oar"]), useCompression=True)
        sitk.WriteImage(contrast, str(inputs["gtv"]), useCompression=True)
        size = ct.GetSize()
        del ct, contrast
    del case
    tasks = args.tasks.split(",")
    cap = int(args.cap_gib * 2**30)
    print(f"case {size} (x, y, z); bundle {bundle.name} {bundle.version}; device {args.device}; tasks {tasks}; "
          f"memory cap {args.cap_gib} GiB", flush=True)

    stock_wall, stock_peak, stock_ok, stock_out = 0.0, 0, True, {}
    for task in ([] if args.skip_stock else tasks):
        folder = work / f"stock_in_{task}"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(inputs[task], folder / "case_0000.nii.gz")
        model = bundle.task(task)
        cmd = ["nnUNetv2_predict_from_modelfolder", "-i", str(folder), "-o", str(work / f"stock_out_{task}"),
               "-m", str(bundle.result_path(task)), "-f", *model.folds, "-device", args.device, "--disable_tta",
               "-npp", "1", "-nps", "1"]
        sampled, peak, rc = measure(cmd, cap_bytes=cap)
        wall = sampled if args.single_run or rc != 0 else unobserved_wall(cmd)
        state = "killed above the cap" if rc == -9 else f"exit {rc}"
        print(f"stock nnU-Net {task}: {wall:7.1f} s  (sampled run {sampled:.1f} s)  peak PSS {peak / 2**30:6.2f} GiB  "
              f"({state})", flush=True)
        stock_wall += wall
        stock_peak = max(stock_peak, peak)
        stock_ok = stock_ok and rc == 0
        stock_out[task] = work / f"stock_out_{task}" / "case.nii.gz"

    cmd = [sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(inputs["oar"]), "--contrast-ct",
           str(inputs["gtv"]), "--out", str(work / "ours"), "--case-id", "case", "--bundle", args.bundle,
           "--device", args.device, "--no-mirror", "--tasks", args.tasks, "--json", "--no-largest-component"]
    sampled, ours_peak, rc = measure(cmd, cap_bytes=cap)
    ours_wall = sampled if args.single_run or rc != 0 else unobserved_wall(cmd)
    print(f"segrap segment ({'+'.join(tasks)}): {ours_wall:7.1f} s  (sampled run {sampled:.1f} s)  peak PSS "
          f"{ours_peak / 2**30:6.2f} GiB  (exit {rc})")
    if args.skip_stock:
        return 0
    print(f"stock nnU-Net ({'+'.join(tasks)}): {stock_wall:7.1f} s  peak PSS {stock_peak / 2**30:6.2f} GiB"
          + ("" if stock_ok else "  (did not finish: figures are up to where it stopped)"))
    print(f"ratios ours/stock: wall time {ours_wall / stock_wall:.2f}, peak PSS {ours_peak / stock_peak:.2f}")
    if stock_ok and rc == 0:
        agreement(work / "ours" / "case.seg.nrrd", stock_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
