"""Rebuild the demo model bundle: phantom cohort -> nnU-Net datasets -> tiny plans -> CPU training -> bundle.

    python -m SegRapSegmenterLib.training.demo_bundle --work /tmp/segrap-demo-train --out DIR

The plans use the small phantom's 3 x 2 x 2 mm (see DEMO_SPACING for why not SegRap's median),
so a full-size 0.54 mm case goes through nnU-Net's resampling of the class scores back to the
input grid, the memory-hungry path of real models. The patch is the whole small phantom (full-size
cases in the cohort, DEMO_COHORT, give a window, most of them centred on a class, rarer classes more often) and
the network is small (8 or 16 to 64 features) so that inference of a small phantom takes a few seconds; 0.2.0
trained in about 35 minutes on two CPU cores, 0.3.0 in about 4 hours of one training thread on top of it
(docs/training.md). It is a demo, not a
clinical model.
Left-right mirroring and rotations are off in training: they would teach the network that left
and right are interchangeable (see the laterality issue); the trainer is demo_trainer's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .convert import dataset_folder_name

# z, y, x. SegRap's median is 3 x 0.54 x 0.54 mm; at that spacing 500 CPU iterations of this tiny
# network learned the brain only (held-out mean OAR DSC 0.02), so the demo is planned at the small
# phantom's own 3 x 2 x 2 mm. A full-size 0.54 mm input then takes nnU-Net's resampling path.
DEMO_SPACING = [3.0, 2.0, 2.0]
SEGRAP_MEDIAN_SPACING = [3.0, 0.54, 0.54]
# The patch is the whole small phantom (48 x 96 x 96 at 3 x 2 x 2 mm): every class is in every
# batch (class balance without a sampler) and the midline is always in view, so the network can
# tell left from right by position; inference is then one patch, no tiling.
DEMO_PATCH = {"oar": [48, 96, 96], "gtv": [48, 96, 96]}
# Task 1's last decoder stage feeds a 1x1 convolution to 55 classes: 16 full-resolution features
# separate them (4 collapsed to background, 8 learned only the large organs in 1000 iterations);
# Task 2 has 3 classes and needs fewer. Cheaper was tried (2026-12-02): 8-16 features with 1 x 3 x 3
# kernels in the two full-z stages cost 0.21 s per tile instead of 0.38 s, but had 21 of the 54 classes
# above a pseudo-Dice of 0.5 at iteration 1125, where this network had 53 at 1000; stopped there.
DEMO_FEATURES = {"oar": [16, 24, 32, 48, 64], "gtv": [8, 16, 32, 48, 64]}
DEMO_ARCH = {
    "n_stages": 5,
    "kernel_sizes": [[3, 3, 3]] * 5,
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 2, 2, 2, 2],
    "n_conv_per_stage_decoder": [1, 1, 1, 1],
}
DEMO_BATCH = 1
# Training budgets in iterations (about 30 and 6 minutes on 2 CPU cores); --time-budget can end a run
# earlier in wall-clock seconds (the cosine schedule follows whichever runs out first). A Task 1 run
# planned for 5250 s already scored 0.95 on the held-out cases at iteration 1800, so 2700 with the whole
# cosine decay are enough (docs/training.md).
DEMO_ITERATIONS = {"oar": 2700, "gtv": 1500}
DATASETS = {"oar": 601, "gtv": 602}
# glibc's malloc hands each large tensor back to the kernel when it is freed and faults fresh zeroed pages
# in for the next one: on the 2-core machine two thirds of the training CPU time went to the kernel, and
# an iteration took 1.1 s instead of 0.6 s. These keep freed memory in the process, for training only: the
# Task 1 process then holds 4.1 GB instead of 2.3 GB (inference keeps glibc's defaults: its memory
# figures are a product property). Read by glibc at start-up, so the CLI re-executes itself once.
TRAINING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36),
                       "MALLOC_TOP_PAD_": str(2**30)}
# 0.1.0: 16-slice patches, 1000 iterations, 30 of 47 structures empty on held-out cases
# 0.2.0: 48 small cases only; mean OAR DSC 0.18 at the full size (0.54 mm). 0.3.0: DEMO_COHORT, three warm starts
# on 0.2.0 (full-size OARs 0.73, then 0.86 with class-centred windows, then with rarer classes first the shipped
# data/segrap-demo; docs/training.md, "Every resolution" and the sections after it)
DEMO_VERSION = "0.3.0"


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                "nnUNet_results": str(work / "nnUNet_results")})
    env.setdefault("nnUNet_n_proc_DA", "1")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    beside = Path(sys.executable).parent / cmd[0]  # nnU-Net's commands of this Python's environment, activated or not
    cmd = [str(beside) if beside.is_file() else cmd[0], *cmd[1:]]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def edit_plans(plans_path: Path, task: str, configuration: str = "3d_fullres", intensity: dict | None = None) -> None:
    """Set the demo spacing, patch, batch size and tiny architecture in nnU-Net's plans file (and, for a
    warm start, the CT normalisation's intensity statistics of the network started from)."""
    plans = json.loads(plans_path.read_text())
    if intensity is not None:
        plans["foreground_intensity_properties_per_channel"] = intensity
    conf = plans["configurations"][configuration]
    conf["spacing"] = DEMO_SPACING
    conf["patch_size"] = DEMO_PATCH[task]
    conf["batch_size"] = DEMO_BATCH
    conf["architecture"]["arch_kwargs"].update(DEMO_ARCH, features_per_stage=DEMO_FEATURES[task])
    for name in list(plans["configurations"]):
        if name != configuration:
            del plans["configurations"][name]
    plans_path.write_text(json.dumps(plans, indent=1))


@dataclass(frozen=True)
class CohortGroup:
    """Training cases rendered alike: phantom indices ``first``..``first + count - 1`` of the cohort seed, on
    the small grid or on the full-size field of view at a given spacing (z, y, x mm)."""

    name: str
    grid: str | tuple[float, float, float]
    first: int
    count: int
    scanners: bool  # a drawn scanner per case (offset, blur, noise), else the phantom's default

    def spec(self):
        from ..phantom.cases import full_size_grid

        return self.grid if isinstance(self.grid, str) else full_size_grid(self.grid)


# 0.2.0 trained on the 48 small cases alone and fell apart at the full size (mean OAR DSC 0.18 at 0.54 mm):
# the small phantom compresses the anatomy into a 144 x 192 x 192 mm field of view, so a full-size case
# resampled to 3 x 2 x 2 mm showed the network organs twice as large and a head it had never seen whole.
# The cohort now holds the full-size anatomy too: rendered straight at the network's spacing (cheap, many
# shapes), and at scanner-like spacings (SegRap's median 3 x 0.54 x 0.54 mm, thinner slices, coarser pixels)
# that nnU-Net's preprocessing resamples exactly as inference does. Most cases get a scanner of their own.
DEMO_COHORT = (
    CohortGroup("small", "small", 0, 24, False),
    CohortGroup("smallscan", "small", 24, 24, True),
    CohortGroup("fov2mm", (3.0, 2.0, 2.0), 100, 24, True),
    CohortGroup("fov054", (3.0, 0.54, 0.54), 200, 6, True),
    CohortGroup("fov08", (2.0, 0.8, 0.8), 300, 4, True),
    CohortGroup("fov1", (2.5, 1.0, 1.0), 400, 4, True),
    CohortGroup("fov07", (1.25, 0.7, 0.7), 500, 2, True),
)


def write_cohort_datasets(raw: Path, cohort=DEMO_COHORT, seed: int = 2023) -> None:
    """Render every case of the cohort and write it straight into both raw datasets (plain CT + 54 classes
    for Task 1, contrast CT + GTVs for Task 2); cases already written are kept, so a stopped run resumes."""
    from ..phantom.cases import Scanner, make_case
    from .convert import CaseReport, dataset_dirs, finish_dataset, write_training_case

    dirs = {task: dataset_dirs(raw, task, dataset_id) for task, dataset_id in DATASETS.items()}
    reports: dict[str, list] = {task: [] for task in DATASETS}
    for group in cohort:
        for index in range(group.first, group.first + group.count):
            case_id = f"{group.name}_{index:04d}"
            done = all((d[2] / f"{case_id}.nii.gz").exists() for d in dirs.values())
            if not done:
                scanner = Scanner.draw(np.random.default_rng([seed, index, 1])) if group.scanners else Scanner()
                t0 = time.time()
                case = make_case(index, seed=seed, size=group.spec(), scanner=scanner)
                write_training_case(case.ct, case.labelmap, dirs["oar"][1], dirs["oar"][2], case_id)
                write_training_case(case.contrast_ct, case.gtv_labelmap, dirs["gtv"][1], dirs["gtv"][2], case_id)
                print(f"{case_id}: {case.labelmap.shape} {scanner} in {time.time() - t0:.0f} s", flush=True)
            for task in DATASETS:
                reports[task].append(CaseReport(case_id, skipped=done))
    for task, (out, _, _) in dirs.items():
        finish_dataset(out, task, reports[task])


def prepare(work: Path, seed: int, init_from: Path | None = None, processes: int = 1) -> None:
    """Write the cohort into both raw datasets, plan, edit the plans and preprocess."""
    env = _env(work)
    write_cohort_datasets(work / "nnUNet_raw", DEMO_COHORT, seed)
    for task, dataset_id in DATASETS.items():
        name = dataset_folder_name(dataset_id, task)
        _run(["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", str(processes),
              "--verify_dataset_integrity"], env)
        _run(["nnUNetv2_plan_experiment", "-d", str(dataset_id)], env)
        intensity = None
        if init_from is not None:  # the warm start's network expects its own CT normalisation
            plans = json.loads((init_from / task / "plans.json").read_text())
            intensity = plans["foreground_intensity_properties_per_channel"]
        edit_plans(work / "nnUNet_preprocessed" / name / "nnUNetPlans.json", task, intensity=intensity)
        _run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(processes)], env)


def train(work: Path, task: str, iterations: int, time_budget_s: float = float("inf"),
          init_from: Path | None = None, peak_lr: float | None = None) -> Path:
    """Train fold 'all' of a task on the CPU with the demo trainer (from scratch, or from the weights of a
    bundle's same network with ``init_from``); return the result folder."""
    os.environ.update(_env(work))
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from .demo_trainer import SegRapDemoTrainer

    dataset_id = DATASETS[task]
    name = f"Dataset{dataset_id:03d}_SegRap{'OAR' if task == 'oar' else 'GTV'}"
    pre = work / "nnUNet_preprocessed" / name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    dataset_json = load_json(str(pre / "dataset.json"))
    torch.set_num_threads(int(os.environ.get("SEGRAP_TRAIN_THREADS", 0)) or max(1, os.cpu_count() or 1))
    plans["continue_training"] = False  # nnU-Net 2.8 reads this flag from the plans it is given
    trainer = SegRapDemoTrainer(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 10_000
    trainer.num_iterations_per_epoch = 25
    trainer.iteration_budget = iterations
    trainer.time_budget_s = time_budget_s
    if init_from is not None:
        trainer.initial_weights = str(init_from / task / "fold_all" / "checkpoint_final.pth")
    if peak_lr is not None:
        trainer.initial_lr = peak_lr
    t0 = time.time()
    trainer.run_training()
    print(f"{task}: trained {trainer._iteration} iterations in {time.time() - t0:.0f} s", flush=True)
    return Path(trainer.output_folder).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (datasets, preprocessing, results)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the bundle folder")
    parser.add_argument("--stage", choices=("prepare", "train", "export", "evaluate", "all"), default="all")
    parser.add_argument("--task", choices=("oar", "gtv", "both"), default="both")
    parser.add_argument("--seed", type=int, default=2023, help="phantom cohort seed (held-out cases use another)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="warm start: a demo bundle folder whose networks (same plans) training starts from")
    parser.add_argument("--peak-lr", type=float, default=None, help="peak learning rate (default the trainer's 3e-3)")
    parser.add_argument("--processes", type=int, default=1, help="nnU-Net fingerprint/preprocessing processes")
    parser.add_argument("--iterations", type=int, default=DEMO_ITERATIONS["oar"], help="iterations of the OAR model")
    parser.add_argument("--gtv-iterations", type=int, default=DEMO_ITERATIONS["gtv"], help="iterations of the GTV model")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds that end OAR training early")
    parser.add_argument("--gtv-time-budget", type=float, default=float("inf"), help="seconds that end GTV training early")
    parser.add_argument("--heldout", type=int, default=3, help="held-out phantom cases (seed 99) to score per size")
    parser.add_argument("--heldout-sizes", default="small,full", help="phantom sizes to score the held-out cases at")
    args = parser.parse_args(argv)
    if argv is None and args.stage in ("train", "all") and sys.platform.startswith("linux") \
            and not all(k in os.environ for k in TRAINING_MALLOC_ENV):
        print("re-executing with glibc's malloc tuned for training (TRAINING_MALLOC_ENV)", flush=True)
        entry = ["-m", __spec__.name] if __spec__ is not None else [sys.argv[0]]
        os.execve(sys.executable, [sys.executable, *entry, *sys.argv[1:]], {**os.environ, **TRAINING_MALLOC_ENV})
    tasks = ["oar", "gtv"] if args.task == "both" else [args.task]
    if args.stage in ("prepare", "all"):
        prepare(args.work, args.seed, args.init_from, args.processes)
    if args.stage in ("train", "all"):
        for task in tasks:
            if task == "oar":
                train(args.work, task, args.iterations, args.time_budget, args.init_from, args.peak_lr)
            else:
                train(args.work, task, args.gtv_iterations, args.gtv_time_budget, args.init_from, args.peak_lr)
    if args.stage in ("export", "all"):
        from ..inference.bundles import CHECKPOINT_NAME, build_bundle, sha256_file

        results = args.work / "nnUNet_results"
        started_from = {}  # the warm start's checkpoints, recorded in the manifest like fine-tuning's
        if args.init_from is not None:
            for task in ("oar", "gtv"):
                path = args.init_from / task / "fold_all" / CHECKPOINT_NAME
                started_from[task] = [{"file": f"{args.init_from.name}/{task}/fold_all/{CHECKPOINT_NAME}",
                                       "sha256": sha256_file(path)}]
        folders = {task: next(results.glob(f"Dataset{DATASETS[task]:03d}_*/*__nnUNetPlans__3d_fullres"))
                   for task in ("oar", "gtv")}
        bundle = build_bundle(
            args.out, name="segrap-demo", version=DEMO_VERSION, license="Apache-2.0",
            description=("Demo model trained on the synthetic phantom only, small and full-size, at several "
                         "resolutions and scanners (SegRapSegmenterLib.training.demo_bundle, trainer "
                         "SegRapDemoTrainer: whole-volume or windowed batches, class-weighted cross-entropy, "
                         "no mirroring). Not for clinical use: it has never seen a real CT."),
            result_folders=folders, folds={"oar": ["all"], "gtv": ["all"]},
            training_mirroring={"oar": "none", "gtv": "none"}, orientation="LPS", pretrained=started_from)
        print(f"bundle written to {bundle}", flush=True)
    if args.stage in ("evaluate", "all"):
        evaluate_heldout(args.out, args.work / "heldout", args.heldout,
                         sizes=tuple(s for s in args.heldout_sizes.split(",") if s))
    return 0


def score_heldout(bundle_dir: Path, work: Path, cases: int, size: str, seed: int = 99) -> dict:
    """Segment held-out phantom cases of one size with the bundle (its default mirroring, then left-right
    mirroring on): DSC per structure, structures found and laterality warnings."""
    from ..anatomy import structures as S
    from ..anatomy.qa import laterality_warnings
    from ..demo import measure
    from ..phantom import cases as phantom
    from ..pipeline import SegmentRequest, run

    modes = {"default": None, "mirrored": True}
    scores = {mode: [] for mode in modes}
    swaps = {mode: [] for mode in modes}
    for index in range(cases):
        case = phantom.make_case(index, seed=seed, size=size)
        paths = phantom.write_case(case, work / size / "cases")
        for mode, mirror in modes.items():
            result = run(SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct),
                                        out_dir=str(work / size / f"out-{mode}"), case_id=case.case_id,
                                        bundle=str(bundle_dir), device="cpu", mirror=mirror))
            scores[mode].append(measure(case, Path(result.outputs["segmentation"])))
            swaps[mode].append(len(laterality_warnings(result.warnings)))

    def table(per_case, reduce):
        return {n: round(float(reduce([c.dsc[n] for c in per_case])), 4) for n in S.STRUCTURE_NAMES}

    def mean_of(per_structure, names):
        return round(float(np.mean([per_structure[n] for n in names])), 4)

    def found(per_case):
        return [len(S.STRUCTURE_NAMES) - len(c.empty) for c in per_case]

    mean, lowest = table(scores["default"], np.mean), table(scores["default"], np.min)
    return {"heldout_cases": cases, "seed": seed, "size": size,
            "mean_dsc_oar": mean_of(mean, S.OAR_NAMES), "mean_dsc_gtv": mean_of(mean, S.GTV_NAMES),
            "min_dsc_oar": min(mean[n] for n in S.OAR_NAMES),
            "structures_found_per_case": found(scores["default"]),
            "laterality_warnings_per_case": swaps["default"],
            "mirrored": {"mean_dsc_oar": mean_of(table(scores["mirrored"], np.mean), S.OAR_NAMES),
                         "structures_found_per_case": found(scores["mirrored"]),
                         "laterality_warnings_per_case": swaps["mirrored"]},
            "mean_dsc_per_structure": mean, "lowest_case_dsc_per_structure": lowest}


def evaluate_heldout(bundle_dir: Path, work: Path, cases: int, seed: int = 99,
                     sizes: tuple[str, ...] = ("small", "full")) -> dict:
    """Score held-out cases at each phantom size and write the record next to the bundle: the first size's
    summary at the top level (as 0.2.0's record had it), every size's under ``by_size``."""
    by_size = {size: score_heldout(bundle_dir, work, cases, size, seed) for size in sizes}
    summary = {**by_size[sizes[0]], "by_size": by_size}
    target = Path(bundle_dir).parent / f"{Path(bundle_dir).name}-heldout-dsc.json"
    target.write_text(json.dumps(summary, indent=1))
    for size, s in by_size.items():
        print(f"held-out DSC ({size}): OARs {s['mean_dsc_oar']}, GTVs {s['mean_dsc_gtv']}, lowest OAR mean "
              f"{s['min_dsc_oar']}, found {s['structures_found_per_case']}, laterality warnings "
              f"{s['laterality_warnings_per_case']} / mirrored {s['mirrored']['laterality_warnings_per_case']}",
              flush=True)
    print(f"-> {target}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
