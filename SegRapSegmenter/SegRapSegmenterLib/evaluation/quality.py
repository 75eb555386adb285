"""How a run's per-structure confidence and review flag ranked against the true DSC: so any site can check the flag
on its own cases (``segrap evaluate``) and the benchmark can check it on the phantom (bench_quality.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

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


PROVENANCE_SUFFIX = ".provenance.json"


def provenance_of(prediction: Path, case_id: str) -> Path | None:
    """The provenance file ``segrap segment`` wrote beside a prediction (a .seg.nrrd, a --nifti folder, a case
    folder); None when there is none (predictions of other tools)."""
    prediction = Path(prediction)
    name = prediction.name
    candidates = []
    if name.endswith(".seg.nrrd"):
        candidates.append(prediction.with_name(name[:-len(".seg.nrrd")] + PROVENANCE_SUFFIX))
    if prediction.is_dir():
        candidates += [prediction / f"{case_id}{PROVENANCE_SUFFIX}", *sorted(prediction.glob(f"*{PROVENANCE_SUFFIX}"))]
    candidates += [prediction.parent / f"{case_id}{PROVENANCE_SUFFIX}"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def review_of(prediction: Path, case_id: str) -> dict[str, tuple[float, bool]] | None:
    """Per structure the run's (confidence, review flag), from its provenance; None when there is no provenance or it
    recorded none (a run before the flag existed).

    A provenance file that is there but cannot be read (no permission, not JSON, not the layout ``segrap segment``
    writes) is an InputError naming it, so the caller says which case's figures are missing instead of dropping them.
    """
    path = provenance_of(prediction, case_id)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"The provenance {path} cannot be read ({exc.__class__.__name__}: {exc}).") from exc
    except ValueError as exc:
        raise InputError(f"The provenance {path} is not valid JSON ({exc}).") from exc
    if not isinstance(record, dict):
        raise InputError(f"The provenance {path} holds a JSON {type(record).__name__}, not the object segrap segment "
                         f"writes.")
    structures = record.get("structures")
    if structures is None:
        return None
    if not isinstance(structures, dict):
        raise InputError(f"The provenance {path} holds 'structures' as {type(structures).__name__}, not an object "
                         f"of structure names.")
    try:
        found = {name: (float(e["confidence"]), bool(e["review"])) for name, e in structures.items()
                 if isinstance(e, dict) and "confidence" in e and "review" in e}
    except (TypeError, ValueError) as exc:
        raise InputError(f"The provenance {path} holds a confidence that is not a number ({exc}).") from exc
    return found or None
