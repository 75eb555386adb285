"""Benchmark: DSC and NSD of all 47 structures of one `full` phantom case (126 x 512 x 512, 3 x 0.54 x 0.54 mm).

The reference is phantom case 0 of cohort 0; the prediction is the same case of cohort 1 (another
anatomy scale and pose, so every structure is scored with real disagreements). The masks are
passed full-size, as an evaluation reading files sees them. Target: under 30 s on the dev machine.

    python Testing/benchmarks/bench_metrics.py [--size full|small]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.evaluation import metrics
from SegRapSegmenterLib.phantom import cases as phantom


def _all_masks(case: phantom.PhantomCase) -> dict[str, np.ndarray]:
    masks = case.oar_masks()
    out = {name: masks[name] for name in S.OAR_NAMES}
    out.update(case.gtv_masks())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "small"), default="full")
    args = parser.parse_args()

    t0 = time.perf_counter()
    ref_case = phantom.make_case(0, seed=0, size=args.size)
    pred_case = phantom.make_case(0, seed=1, size=args.size)
    reference, prediction = _all_masks(ref_case), _all_masks(pred_case)
    spacing = ref_case.ct.GetSpacing()[::-1]
    print(f"phantom cases ({args.size}, {sitk.GetArrayViewFromImage(ref_case.ct).shape} voxels, spacing z,y,x "
          f"{tuple(round(s, 3) for s in spacing)} mm) built in {time.perf_counter() - t0:.1f} s")

    metrics.surfel_area_table(spacing)  # the marching-cubes table is built once per process
    t0 = time.perf_counter()
    scores = [metrics.score_structure(name, reference[name], prediction[name], spacing) for name in S.STRUCTURE_NAMES]
    elapsed = time.perf_counter() - t0
    dsc = np.mean([s.dsc for s in scores])
    nsd = np.mean([s.nsd for s in scores])
    slowest = sorted(((s.structure, s.reference_voxels) for s in scores), key=lambda x: -x[1])[:3]
    print(f"{len(scores)} structures scored in {elapsed:.2f} s ({elapsed / len(scores) * 1000:.0f} ms per structure); "
          f"mean DSC {dsc:.4f}, mean NSD {nsd:.4f}")
    print("largest structures: " + ", ".join(f"{n} ({v} voxels)" for n, v in slowest))
    print(f"BENCH metrics_47_structures_{args.size}_s {elapsed:.2f}")


if __name__ == "__main__":
    main()
