"""Benchmark: left/right swaps and paired-structure Dice of the demo OAR model under test-time mirroring schemes.

Held-out phantom cases as the demo bundle's held-out DSC was measured (seed 99, cases 0-2, `small`,
stored in LPS), Task 1 of the demo bundle (trained without mirroring), on the CPU, a predictor per mode:

  (a) no test-time mirroring                        mirror=False
  (b) plain nnU-Net mirroring                       every axis, flipped predictions summed as they are
  (c) laterality-aware mirroring                    every axis, paired classes swapped after a left-right flip
  (b') plain, left-right flip only                  the flipped prediction summed as it is
  (d) the bundle's default for `--mirror`           left-right flip only, with the swap (model trained without mirroring)

(b') against (d) isolates the swap: the demo model never saw flips along the other axes, which is
what pulls (b) and (c) down alike.

Structures are ``recompose``d from the network's 54-class labels (no post-processing, unlike the
held-out DSC file, which scores the pipeline's output) and compared with the phantom's truth.

A *swap*: a predicted paired structure X_s (s = L or R, 32 per case) that is not empty and either
overlaps the truth of its partner X_s' in more voxels than its own truth, or whose centroid lies
nearer, along the patient's left-right axis, to the centroid of X_s' truth than to that of X_s truth.
Empty predictions are misses, not swaps. Counted over the 32 paired structures of every case.

    python Testing/benchmarks/bench_laterality.py [--cases 3] [--seed 99]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.evaluation import metrics
from SegRapSegmenterLib.inference.bundles import resolve_bundle
from SegRapSegmenterLib.inference.predictor import InferenceOptions, TaskPredictor
from SegRapSegmenterLib.phantom import cases as phantom

MODES = {
    "(a) no mirroring": InferenceOptions(device="cpu", mirror=False),
    "(b) plain nnU-Net": InferenceOptions(device="cpu", mirror=True, mirror_policy="plain"),
    "(c) laterality-aware": InferenceOptions(device="cpu", mirror=True, mirror_policy="laterality-aware"),
    "(b') plain, left-right only": InferenceOptions(device="cpu", mirror=True, mirror_policy="plain",
                                                    mirror_axes=(2,)),  # x: the demo plans keep z, y, x
    "(d) bundle default": InferenceOptions(device="cpu", mirror=True),
}
PAIRED = [s.name for s in S.OARS if s.partner]


def _left_right_coordinate(mask: np.ndarray, image: sitk.Image) -> float:
    """Patient left-right coordinate (LPS x, mm) of a mask's centroid (z, y, x array on ``image``'s grid)."""
    index_zyx = np.argwhere(mask).mean(axis=0)
    point = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_zyx[::-1]])
    return point[0]


def swapped(name: str, predicted, truth, image: sitk.Image) -> bool:
    """True when the prediction of ``name`` sits on its partner's truth rather than its own (see the docstring)."""
    partner = S.get(name).partner
    found = predicted[name]
    if not found.any():
        return False
    own, other = truth[name], truth[partner]
    if np.count_nonzero(found & other) > np.count_nonzero(found & own):
        return True
    x = _left_right_coordinate(found, image)
    return abs(x - _left_right_coordinate(other, image)) < abs(x - _left_right_coordinate(own, image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()

    bundle = resolve_bundle("demo")
    cases = [phantom.make_case(i, seed=args.seed, size="small") for i in range(args.cases)]
    truths = [{n: np.asarray(c.oar_masks()[n]) for n in S.OAR_NAMES} for c in cases]
    print(f"demo bundle {bundle.name} {bundle.version}, Task 1 trained with mirroring "
          f"'{bundle.task('oar').training_mirroring}'; {args.cases} held-out small phantom cases (seed {args.seed}); "
          f"{len(PAIRED)} paired structures per case")
    rows = []
    for mode, options in MODES.items():
        predictor = TaskPredictor(bundle, "oar", options)
        swaps, paired_dsc, all_dsc, names = 0, [], [], []
        t0 = time.perf_counter()
        labels = [predictor.predict(c.ct) for c in cases]
        wall = time.perf_counter() - t0
        for case, truth, lab in zip(cases, truths, labels):
            predicted = S.recompose(lab)
            predicted = {n: np.asarray(predicted[n]) for n in S.OAR_NAMES}
            for name in PAIRED:
                if swapped(name, predicted, truth, case.ct):
                    swaps += 1
                    names.append(f"{case.case_id}:{name}")
            paired_dsc += [metrics.dice(truth[n], predicted[n]) for n in PAIRED]
            all_dsc += [metrics.dice(truth[n], predicted[n]) for n in S.OAR_NAMES]
        rows.append((mode, predictor.mirroring_axes, predictor.swaps_left_right, swaps, float(np.mean(paired_dsc)),
                     float(np.mean(all_dsc)), wall, names))

    total = len(PAIRED) * args.cases
    print(f"\n| mode | flips along (network axes) | L/R swap | swaps / {total} | mean DSC, 32 paired | "
          f"mean DSC, 45 OARs | wall s |")
    print("|---|---|---|---|---|---|---|")
    for mode, axes, swap, swaps, paired, every, wall, _ in rows:
        print(f"| {mode} | {axes or '-'} | {'yes' if swap else 'no'} | {swaps} | {paired:.4f} | {every:.4f} | "
              f"{wall:.1f} |")
    for mode, *_, names in rows:
        if names:
            print(f"{mode}: swapped {', '.join(names)}")


if __name__ == "__main__":
    main()
