"""Rebuild the demo model bundle: phantom cohort -> nnU-Net datasets -> tiny plans -> CPU training -> bundle.

    python -m SegRapSegmenterLib.training.demo_bundle --work /tmp/segrap-demo-train --out DIR

The plans use the small phantom's 3 x 2 x 2 mm (see DEMO_SPACING for why not SegRap's median),
so a full-size 0.54 mm case goes through nnU-Net's resampling of the class scores back to the
input grid, the memory-hungry path of real models. The patch is the whole small phantom and the
network is small (8 or 16 to 64 features) so that training takes about 35 minutes on two CPU
cores and inference of a small phantom a few seconds. It is a demo, not a clinical model.
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
from pathlib import Path

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
DEMO_VERSION = "0.2.0"


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                "nnUNet_results": str(work / "nnUNet_results")})
    env.setdefault("nnUNet_n_proc_DA", "1")
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def edit_plans(plans_path: Path, task: str, configuration: str = "3d_fullres") -> None:
    """Set the demo spacing, patch, batch size and tiny architecture in nnU-Net's plans file."""
    plans = json.loads(plans_path.read_text())
    conf = plans["configurations"][configuration]
    conf["spacing"] = DEMO_SPACING
    conf["patch_size"] = DEMO_PATCH[task]
    conf["batch_size"] = DEMO_BATCH
    conf["architecture"]["arch_kwargs"].update(DEMO_ARCH, features_per_stage=DEMO_FEATURES[task])
    for name in list(plans["configurations"]):
        if name != configuration:
            del plans["configurations"][name]
    plans_path.write_text(json.dumps(plans, indent=1))


def prepare(work: Path, train_cases: int, seed: int) -> None:
    """Write the phantom cohort, convert both tasks, plan, edit the plans and preprocess."""
    from ..phantom.cases import write_cohort
    from .convert import convert_release

    env = _env(work)
    cohort = work / "phantom"
    if not (cohort / "done").exists():
        write_cohort(cohort, train_cases, seed=seed, size="small")
        (cohort / "done").write_text("ok")
    for task, dataset_id in DATASETS.items():
        report = convert_release(cohort, work / "nnUNet_raw", task, dataset_id)
        print(report.summary(), flush=True)
        _run(["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "2", "--verify_dataset_integrity"], env)
        _run(["nnUNetv2_plan_experiment", "-d", str(dataset_id)], env)
        plans_dir = work / "nnUNet_preprocessed" / report.dataset_dir.name
        edit_plans(plans_dir / "nnUNetPlans.json", task)
        _run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "2"], env)


def train(work: Path, task: str, iterations: int, time_budget_s: float = float("inf")) -> Path:
    """Train fold 'all' of a task on the CPU with the demo trainer; return the result folder."""
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
    parser.add_argument("--cases", type=int, default=48, help="phantom training cases")
    parser.add_argument("--seed", type=int, default=2023, help="phantom cohort seed (held-out cases use another)")
    parser.add_argument("--iterations", type=int, default=DEMO_ITERATIONS["oar"], help="iterations of the OAR model")
    parser.add_argument("--gtv-iterations", type=int, default=DEMO_ITERATIONS["gtv"], help="iterations of the GTV model")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds that end OAR training early")
    parser.add_argument("--gtv-time-budget", type=float, default=float("inf"), help="seconds that end GTV training early")
    parser.add_argument("--heldout", type=int, default=3, help="held-out phantom cases (seed 99) to score")
    args = parser.parse_args(argv)
    if argv is None and args.stage in ("train", "all") and sys.platform.startswith("linux") \
            and not all(k in os.environ for k in TRAINING_MALLOC_ENV):
        print("re-executing with glibc's malloc tuned for training (TRAINING_MALLOC_ENV)", flush=True)
        entry = ["-m", __spec__.name] if __spec__ is not None else [sys.argv[0]]
        os.execve(sys.executable, [sys.executable, *entry, *sys.argv[1:]], {**os.environ, **TRAINING_MALLOC_ENV})
    tasks = ["oar", "gtv"] if args.task == "both" else [args.task]
    if args.stage in ("prepare", "all"):
        prepare(args.work, args.cases, args.seed)
    if args.stage in ("train", "all"):
        for task in tasks:
            if task == "oar":
                train(args.work, task, args.iterations, args.time_budget)
            else:
                train(args.work, task, args.gtv_iterations, args.gtv_time_budget)
    if args.stage in ("export", "all"):
        from ..inference.bundles import build_bundle

        results = args.work / "nnUNet_results"
        folders = {task: next(results.glob(f"Dataset{DATASETS[task]:03d}_*/*__nnUNetPlans__3d_fullres"))
                   for task in ("oar", "gtv")}
        bundle = build_bundle(
            args.out, name="segrap-demo", version=DEMO_VERSION, license="Apache-2.0",
            description=("Demo model trained on the synthetic phantom only (SegRapSegmenterLib.training."
                         "demo_bundle, trainer SegRapDemoTrainer: whole-volume batches, class-weighted cross-entropy, "
                         "no mirroring). "
                         "Not for clinical use: it has never seen a real CT."),
            result_folders=folders, folds={"oar": ["all"], "gtv": ["all"]},
            training_mirroring={"oar": "none", "gtv": "none"}, orientation="LPS")
        print(f"bundle written to {bundle}", flush=True)
    if args.stage in ("evaluate", "all"):
        evaluate_heldout(args.out, args.work / "heldout", args.heldout)
    return 0


def evaluate_heldout(bundle_dir: Path, work: Path, cases: int, seed: int = 99) -> dict:
    """Segment held-out phantom cases with the bundle (its default mirroring, then left-right mirroring
    on) and write DSC per structure, structures found and laterality warnings next to the bundle."""
    import numpy as np

    from ..anatomy import structures as S
    from ..anatomy.qa import laterality_warnings
    from ..demo import measure
    from ..phantom import cases as phantom
    from ..pipeline import SegmentRequest, run

    modes = {"default": None, "mirrored": True}
    scores = {mode: [] for mode in modes}
    swaps = {mode: [] for mode in modes}
    for index in range(cases):
        case = phantom.make_case(index, seed=seed, size="small")
        paths = phantom.write_case(case, work / "cases")
        for mode, mirror in modes.items():
            result = run(SegmentRequest(ct=str(paths.ct), contrast_ct=str(paths.contrast_ct),
                                        out_dir=str(work / f"out-{mode}"), case_id=case.case_id,
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
    summary = {"heldout_cases": cases, "seed": seed, "size": "small",
               "mean_dsc_oar": mean_of(mean, S.OAR_NAMES), "mean_dsc_gtv": mean_of(mean, S.GTV_NAMES),
               "min_dsc_oar": min(mean[n] for n in S.OAR_NAMES),
               "structures_found_per_case": found(scores["default"]),
               "laterality_warnings_per_case": swaps["default"],
               "mirrored": {"mean_dsc_oar": mean_of(table(scores["mirrored"], np.mean), S.OAR_NAMES),
                            "structures_found_per_case": found(scores["mirrored"]),
                            "laterality_warnings_per_case": swaps["mirrored"]},
               "mean_dsc_per_structure": mean, "lowest_case_dsc_per_structure": lowest}
    target = Path(bundle_dir).parent / f"{Path(bundle_dir).name}-heldout-dsc.json"
    target.write_text(json.dumps(summary, indent=1))
    print(f"held-out DSC: OARs {summary['mean_dsc_oar']}, GTVs {summary['mean_dsc_gtv']} -> {target}", flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
