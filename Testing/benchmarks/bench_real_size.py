"""Benchmark at the real model's size: `segrap segment` vs stock nnU-Net with the DKFZ configuration, 5 folds.

The bundle is ``real_size_bundle.py``'s (nnU-Net ResEnc L planned on SegRap's median geometry, the
poster's patch [32, 320, 256], 141 M parameters, random weights: speed and memory do not depend on
their values), installed with `segrap models install`. The case is the full phantom (126 x 512 x 512
at 3 x 0.54 x 0.54 mm) placed on SegRap's median grid, 126 x 1024 x 1024 at 3 x 0.54 x 0.54 mm: the
same anatomy at the same spacing in a 553 mm field of view with air around it, as SegRap's scans
have (no interpolation: a pad). Both tasks, all folds, test-time mirroring off and on, ours (`segrap
segment` through its worker) and stock (`nnUNetv2_predict_from_modelfolder`, one process per task,
``-npp 1 -nps 1``, its leanest) on the same device in the same run.

Per run: wall time; peak host memory (PSS summed over the process tree, ``bench_segment.measure``);
peak GPU memory (nvidia-smi, summed over the tree's processes, context included; ours also from
torch in the provenance); for ours, where the time goes (the provenance's timings: bundle check,
reading, network, score handling, labels, preprocessing, writing). On CUDA the achieved network
throughput (FLOPs of the forward passes actually run, counted per tile on the bundle's network)
against the card's dense half-precision peak, as a ratio.

``--smoke``: a cheap run that shows the benchmark works (CI runs it as a test, not a timing): a
16 x 64 x 64 crop of that case, one fold, the same network with a 16 x 64 x 64 patch, CPU, mirroring
off. ``--case reduced``: a 32 x 320 x 256 crop (one tile of the real patch) for CPU figures with
the real bundle. Figures are printed last, as a table; ``--results FILE`` also writes them as JSON.

    python Testing/benchmarks/bench_real_size.py [--device cuda] [--mirror off,on] [--bundle FOLDER]
    python Testing/benchmarks/bench_real_size.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_segment
import real_size_bundle

SEGRAP_GRID = ((126, 1024, 1024), (3.0, 0.54, 0.54))  # z, y, x; SegRap's median size and spacing
CROPS = {"segrap": None, "reduced": (32, 320, 256), "smoke": (16, 64, 64)}
SMOKE_PATCH = (16, 64, 64)
# dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def segrap_case(work: Path, crop: tuple[int, int, int] | None) -> tuple[dict[str, Path], tuple, str]:
    """The full phantom on SegRap's median grid (optionally a central crop): input files, size, description."""
    import SimpleITK as sitk
    from SegRapSegmenterLib.phantom import cases as phantom

    case = phantom.make_case(0, seed=99, size="full")
    (nz, ny, nx), spacing = SEGRAP_GRID
    files, size = {}, None
    for task, image in (("oar", case.ct), ("gtv", case.contrast_ct)):
        assert tuple(round(s, 3) for s in image.GetSpacing()[::-1]) == spacing, image.GetSpacing()
        pad_y, pad_x = (ny - image.GetSize()[1]) // 2, (nx - image.GetSize()[0]) // 2
        image = sitk.ConstantPad(image, (pad_x, pad_y, 0), (nx - image.GetSize()[0] - pad_x,
                                                            ny - image.GetSize()[1] - pad_y, 0), -1000.0)
        if crop is not None:
            start = [(n - c) // 2 for n, c in zip(image.GetSize(), crop[::-1])]
            image = sitk.RegionOfInterest(image, crop[::-1], start)
        files[task] = work / f"case_{task}.nii.gz"
        sitk.WriteImage(image, str(files[task]))
        size = image.GetSize()[::-1]
    what = (f"full phantom (126 x 512 x 512) padded with air to SegRap's median grid {' x '.join(map(str, (nz, ny, nx)))}"
            f" at {' x '.join(map(str, spacing))} mm")
    if crop is not None:
        what += f", central crop {' x '.join(map(str, crop))}"
    return files, tuple(size), what


def _gpu_sampler(pids_of, peak: dict) -> None:
    """Peak GPU memory (MiB) of a process tree from nvidia-smi, sampled until ``peak['stop']`` is set."""
    while not peak.get("stop"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        pids = set(pids_of())
        used = sum(int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                   if int(p) in pids)
        peak["mib"] = max(peak.get("mib", 0), used)
        time.sleep(0.5)


def run_measured(cmd: list[str], env: dict, cap_bytes: int, on_cuda: bool) -> dict:
    """``bench_segment.measure`` (wall, peak tree PSS) plus, on CUDA, peak GPU memory of the tree."""
    gpu: dict = {}
    sampler = None
    if on_cuda and shutil.which("nvidia-smi"):
        root = os.getpid()
        sampler = threading.Thread(target=_gpu_sampler, args=(lambda: bench_segment._children(root), gpu), daemon=True)
        sampler.start()
    wall, peak, rc = bench_segment.measure(cmd, env=env, cap_bytes=cap_bytes)
    if sampler is not None:
        gpu["stop"] = True
        sampler.join()
    return {"wall_s": round(wall, 2), "peak_host_gib": round(peak / 2**30, 3), "exit": rc,
            "peak_gpu_gib": round(gpu["mib"] / 1024, 3) if "mib" in gpu else None}


def network_gflop(bundle, task: str) -> float:
    """Forward-pass GFLOP of one tile of the task's network (counted on the meta device: no memory, no time)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch.utils.flop_counter import FlopCounterMode

    model = bundle.task(task)
    plans = json.loads((bundle.result_path(task) / "plans.json").read_text())
    configuration = PlansManager(plans).get_configuration(model.configuration)

    with torch.device("meta"):
        network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                         configuration.network_arch_init_kwargs_req_import, 1, len(model.labels),
                                         allow_init=False, deep_supervision=False)
        x = torch.empty(1, 1, *configuration.patch_size)
        with FlopCounterMode(display=False) as counter:
            network(x)
    return counter.get_total_flops() / 1e9


def card_peak_tflops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return name, value
    return name, None


def run_ours(bundle_name: str, inputs: dict, work: Path, device: str, mirror: bool, tasks: list[str],
             env: dict, cap: int, folds: list[str]) -> dict:
    out = work / f"ours_{'mirror' if mirror else 'plain'}"
    cmd = [sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", "--ct", str(inputs["oar"]), "--contrast-ct",
           str(inputs["gtv"]), "--out", str(out), "--case-id", "case", "--bundle", bundle_name, "--device", device,
           "--mirror" if mirror else "--no-mirror", "--tasks", ",".join(tasks), "--folds", ",".join(folds), "--json",
           "--no-largest-component"]
    result = run_measured(cmd, env, cap, device == "cuda")
    provenance = out / "case.provenance.json"
    result["labels"] = str(out / "case.seg.nrrd") if (out / "case.seg.nrrd").is_file() else None
    if provenance.is_file():
        prov = json.loads(provenance.read_text())
        result["timings_s"] = prov.get("timings_s", {})
        result["tasks"] = {t: {k: rec.get(k) for k in ("tiles", "timings_s", "peak_gpu_memory_gib", "device", "folds",
                                                        "test_time_mirroring_axes", "box_fraction")}
                           for t, rec in prov.get("inference", {}).items()}
    return result


def _stock_command() -> str:
    """nnU-Net's command, beside this Python when it is a virtual environment's."""
    beside = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
    return str(beside) if beside.exists() else "nnUNetv2_predict_from_modelfolder"


def run_stock(bundle, inputs: dict, work: Path, device: str, mirror: bool, tasks: list[str], env: dict,
              cap: int, folds: list[str]) -> dict:
    """Stock nnU-Net, one process per task; wall times add up, peaks are the larger one."""
    total = {"wall_s": 0.0, "peak_host_gib": 0.0, "peak_gpu_gib": None, "exit": 0, "labels": {}, "per_task": {}}
    for task in tasks:
        folder = work / f"stock_in_{task}"
        folder.mkdir(exist_ok=True)
        shutil.copyfile(inputs[task], folder / "case_0000.nii.gz")
        out = work / f"stock_out_{task}_{'mirror' if mirror else 'plain'}"
        cmd = [_stock_command(), "-i", str(folder), "-o", str(out), "-m",
               str(bundle.result_path(task)), "-f", *folds, "-device", device, "-npp", "1",
               "-nps", "1"] + ([] if mirror else ["--disable_tta"])
        result = run_measured(cmd, env, cap, device == "cuda")
        total["per_task"][task] = result
        total["wall_s"] = round(total["wall_s"] + result["wall_s"], 2)
        total["peak_host_gib"] = max(total["peak_host_gib"], result["peak_host_gib"])
        if result["peak_gpu_gib"] is not None:
            total["peak_gpu_gib"] = max(total["peak_gpu_gib"] or 0.0, result["peak_gpu_gib"])
        total["exit"] = total["exit"] or result["exit"]
        total["labels"][task] = str(out / "case.nii.gz") if (out / "case.nii.gz").is_file() else None
    return total


def throughput(ours: dict, stock: dict, gflop: dict, mirror_evaluations: dict, folds: dict,
               peak_tflops: float | None) -> dict:
    """Network TFLOP run and TFLOP/s achieved (per network time and per wall time), and the ratio to the peak."""
    out = {}
    for name, run in (("ours", ours), ("stock", stock)):
        flop, network_s = 0.0, 0.0
        for task, rec in (ours.get("tasks") or {}).items():
            done, all_tiles = rec.get("tiles") or (0, 0)
            tiles = done if name == "ours" else all_tiles  # stock evaluates every tile of the volume
            flop += tiles * folds[task] * mirror_evaluations[task] * gflop[task] / 1e3
            network_s += (rec.get("timings_s") or {}).get("network", 0.0) if name == "ours" else 0.0
        entry = {"network_tflop": round(flop, 1), "tflops_per_wall_s": round(flop / run["wall_s"], 2)}
        if name == "ours" and network_s:
            entry["tflops_per_network_s"] = round(flop / network_s, 2)
        if peak_tflops:
            for key in [k for k in entry if k.startswith("tflops_per")]:
                entry[key.replace("tflops", "ratio_to_peak")] = round(entry[key] / peak_tflops, 3)
        out[name] = entry
    return out


def _gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(report: dict) -> None:
    """The figures, last, as a table."""
    print()
    print(f"== real-size benchmark: {report['case']}")
    print(f"   bundle {report['bundle']}; device {report['device']}; folds {report['folds']}; tasks "
          f"{'+'.join(report['tasks'])}; {report['host']}")
    for note in report["notes"]:
        print(f"   NOTE: {note}")
    head = f"{'run':<22}{'wall s':>9}{'host GiB':>10}{'GPU GiB':>9}{'exit':>6}   where ours' time goes (s)"
    print(head)
    print("-" * len(head))
    for key, run in report["runs"].items():
        where = ""
        if "timings_s" in run:
            t = run["timings_s"]
            stages: dict[str, float] = {}
            for rec in (run.get("tasks") or {}).values():
                for stage, seconds in (rec.get("timings_s") or {}).items():
                    stages[stage] = stages.get(stage, 0.0) + seconds
            io = t.get("read", 0.0) + t.get("write", 0.0)
            inference = sum(t.get(f"{k}_inference", 0.0) for k in report["tasks"])
            model_load = max(0.0, inference - sum(stages.values()))
            where = (f"network {stages.get('network', 0):.1f}, scores {stages.get('scores', 0):.1f}, labels "
                     f"{stages.get('labels', 0):.1f}, preprocess {stages.get('preprocess', 0):.1f}, model load+other "
                     f"{model_load:.1f}, bundle check {t.get('verify_bundle', 0):.1f}, I/O {io:.1f}, post "
                     f"{t.get('postprocess', 0):.1f}, startup {max(0.0, run['wall_s'] - t.get('total', 0)):.1f}")
        print(f"{key:<22}{run['wall_s']:>9.1f}{_gib(run['peak_host_gib']):>10}{_gib(run['peak_gpu_gib']):>9}"
              f"{run['exit']:>6}   {where}")
    for mirror, ratio in report["ratios"].items():
        print(f"ours/stock, mirroring {mirror}: wall time {ratio['wall']}, peak host memory {ratio['host']}"
              + (f", peak GPU memory {ratio['gpu']}" if ratio.get("gpu") is not None else ""))
    for mirror, entry in report.get("throughput", {}).items():
        for name, figures in entry.items():
            print(f"throughput, mirroring {mirror}, {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="cheap CPU run that shows the benchmark works")
    parser.add_argument("--case", choices=tuple(CROPS), default=None, help="segrap (default) or reduced (one tile)")
    parser.add_argument("--bundle", type=Path, help="a bundle folder from real_size_bundle.py (default: build one)")
    parser.add_argument("--folds", type=int, default=None, help="folds of the built bundle (default 5; smoke 1)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if present, else cpu")
    parser.add_argument("--mirror", default=None, help="off, on or off,on (default off,on; smoke off)")
    parser.add_argument("--tasks", default=None, help="default oar,gtv; smoke oar")
    parser.add_argument("--run-folds", type=int, default=None, help="run only the bundle's first N folds")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--cap-gib", type=float, default=None, help="kill a run whose host memory passes this")
    parser.add_argument("--results", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    case_kind = args.case or ("smoke" if args.smoke else "segrap")
    folds = args.folds or (1 if args.smoke else 5)
    mirrors = [m == "on" for m in (args.mirror or ("off" if args.smoke else "off,on")).split(",")]
    tasks = (args.tasks or ("oar" if args.smoke else "oar,gtv")).split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SEGRAP_HOME=str(work / "home"))
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30  # Linux, as the /proc sampler
    cap = int((args.cap_gib or ram_gib * 0.9) * 2**30)
    notes = []
    try:
        t0 = time.perf_counter()
        source = args.bundle
        if source is None:
            patch = SMOKE_PATCH if args.smoke else None
            source = real_size_bundle.build(work / "bundle-source", folds, tuple(tasks), patch)
            notes.append(f"bundle built in {time.perf_counter() - t0:.0f} s")
            if patch:
                notes.append(f"SMOKE: patch shrunk to {list(patch)} (same ResEnc L network) and the case cropped; "
                             f"{folds} fold; these figures show the benchmark works, they are not real-size figures")
        t0 = time.perf_counter()
        install = subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "models", "install", str(source)],
                                 env=env, capture_output=True, text=True, check=False)
        if install.returncode != 0:
            print(install.stdout + install.stderr, file=sys.stderr)
            return 1
        notes.append(f"`segrap models install` took {time.perf_counter() - t0:.0f} s")
        if args.bundle is None:
            shutil.rmtree(source)  # the installed copy is the one both methods use
        from SegRapSegmenterLib.inference.bundles import list_bundles

        bundle = list_bundles(work / "home" / "models")[0]
        inputs, size, what = segrap_case(work, CROPS[case_kind])
        run_folds = list(bundle.task(tasks[0]).folds)[:args.run_folds]
        gflop = {t: network_gflop(bundle, t) for t in tasks}
        card, peak = card_peak_tflops() if device == "cuda" else ("cpu", None)
        host = f"{os.cpu_count()} CPU threads, {ram_gib:.0f} GiB RAM"
        if device == "cuda":
            host += f"; GPU {card}" + (f" (dense fp16 peak {peak:.0f} TFLOP/s)" if peak else " (peak unknown)")
        notes.append("per-tile forward GFLOP: " + ", ".join(f"{t} {g:.1f}" for t, g in gflop.items()))
        notes.append("stock nnU-Net runs one process per task with -npp 1 -nps 1; its wall times add up")
        report = {"case": f"{what}; size {' x '.join(map(str, size))}", "bundle": f"{bundle.name} {bundle.version}",
                  "device": device, "folds": len(run_folds), "tasks": tasks, "host": host, "notes": notes, "runs": {},
                  "ratios": {}, "throughput": {}, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                  "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
        for mirror in mirrors:
            label = "on" if mirror else "off"
            print(f"running mirroring {label}: stock nnU-Net, then ours ...", file=sys.stderr, flush=True)
            stock = run_stock(bundle, inputs, work, device, mirror, tasks, env, cap, run_folds)
            ours = run_ours(bundle.name, inputs, work, device, mirror, tasks, env, cap, run_folds)
            report["runs"][f"stock, mirror {label}"] = stock
            report["runs"][f"ours, mirror {label}"] = ours
            ratio = {"wall": round(ours["wall_s"] / stock["wall_s"], 3),
                     "host": round(ours["peak_host_gib"] / max(stock["peak_host_gib"], 1e-9), 3)}
            if ours["peak_gpu_gib"] and stock["peak_gpu_gib"]:
                ratio["gpu"] = round(ours["peak_gpu_gib"] / stock["peak_gpu_gib"], 3)
            report["ratios"][label] = ratio
            if ours.get("tasks"):
                # each tile: the network once per combination of flips along the mirroring axes
                evaluations = {t: 2 ** len(rec["test_time_mirroring_axes"] or []) for t, rec in ours["tasks"].items()}
                report["throughput"][label] = throughput(ours, stock, gflop, evaluations,
                                                         {t: len(rec["folds"]) for t, rec in ours["tasks"].items()},
                                                         peak)
        if args.results:
            args.results.write_text(json.dumps(report, indent=1))
        print_table(report)
        return 0 if all(r["exit"] == 0 for r in report["runs"].values()) else 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
