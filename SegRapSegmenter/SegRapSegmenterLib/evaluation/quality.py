"""How a run's per-structure confidence and review flag ranked against the true DSC: so any site can check the flag
on its own cases (``segrap evaluate``) and the benchmark can check it on the phantom (bench_quality.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BAD_DSC, GOOD_DSC = 0.5, 0.9


@dataclass(frozen=True)
class Reviewed:
    """One structure of one case: its true DSC, the run's confidence and flag, and whether it was absent."""

    case_id: str
    structure: str
    dsc: float
    confidence: float
    review: bool
    absent: bool = False  # not in the image (truth empty) and found empty: right to say 'empty', DSC says nothing


def auc_for_bad(rows: list[Reviewed]) -> float | None:
    """P(a contour with DSC < 0.5 has a lower confidence than one with DSC >= 0.5), ties counted half."""
    bad = np.array([r.confidence for r in rows if r.dsc < BAD_DSC])
    good = np.array([r.confidence for r in rows if r.dsc >= BAD_DSC])
    if not len(bad) or not len(good):
        return None
    below = (bad[:, None] < good[None, :]).sum() + 0.5 * (bad[:, None] == good[None, :]).sum()
    return float(below / (len(bad) * len(good)))


def review_figures(rows: list[Reviewed]) -> dict:
    """AUC of the confidence for DSC < 0.5, the flag's sensitivity for it, and its false flags among DSC >= 0.9."""
    kept = [r for r in rows if not r.absent]
    bad = [r for r in kept if r.dsc < BAD_DSC]
    good = [r for r in kept if r.dsc >= GOOD_DSC]
    return {"structures": len(kept), "absent_left_out": len(rows) - len(kept), "dsc_below_0.5": len(bad),
            "dsc_0.9_or_more": len(good), "auc": auc_for_bad(kept),
            "sensitivity": sum(r.review for r in bad) / len(bad) if bad else None,
            "false_flags": sum(r.review for r in good) / len(good) if good else None}
