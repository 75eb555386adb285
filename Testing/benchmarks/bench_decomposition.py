"""Benchmark: recompose (54 classes -> 45 masks) and decompose on a full-size phantom (126 x 512 x 512).

Target (issue 2): recompose under 1 s on one core. Run: python Testing/benchmarks/bench_decomposition.py
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the target says

import time  # noqa: E402

import numpy as np  # noqa: E402
from SegRapSegmenterLib.anatomy import structures as S  # noqa: E402
from SegRapSegmenterLib.phantom import cases as phantom  # noqa: E402


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    t0 = time.perf_counter()
    case = phantom.make_case(0, seed=0, size="full")
    print(f"phantom full case {case.labelmap.shape}: generated in {time.perf_counter() - t0:.1f} s")
    labelmap = case.labelmap

    t_rec, masks = best_of(lambda: S.recompose(labelmap))
    print(f"recompose (45 cropped masks):          {t_rec:.3f} s   target < 1 s   ratio to target {t_rec / 1.0:.2f}")
    t_full, _ = best_of(lambda: [masks[n] for n in S.OAR_NAMES], repeats=1)
    print(f"  expanding all 45 to full-size arrays: {t_full:.3f} s (only when a caller asks for full masks)")
    t_stack, _ = best_of(lambda: masks.stack(), repeats=1)
    print(f"  as one (45, z, y, x) stack:           {t_stack:.3f} s")
    t_dec, back = best_of(lambda: S.decompose(masks), repeats=1)
    assert np.array_equal(back, labelmap)
    print(f"decompose (from the cropped masks):    {t_dec:.3f} s")
    full = {n: masks[n] for n in S.OAR_NAMES}
    t_dec_full, back = best_of(lambda: S.decompose(full), repeats=1)
    assert np.array_equal(back, labelmap)
    print(f"decompose (45 full-size masks):        {t_dec_full:.3f} s")
    # the straightforward way, one full-volume pass per structure, for comparison
    t_naive, _ = best_of(lambda: {n: np.isin(labelmap, S.OAR_CLASSES[n]) for n in S.OAR_NAMES}, repeats=1)
    print(f"baseline np.isin per structure:        {t_naive:.3f} s   (recompose is {t_naive / t_rec:.1f}x faster)")


if __name__ == "__main__":
    main()
