"""Which contours a physicist should check first: a confidence in [0, 1] and a review flag with reasons per structure.

One combination of the signals a run has (docs/quality.md says how it was measured):
- the network's certainty: the expected Dice of the contour against the network's own probabilities
  (``inference.certainty``); below ``CERTAINTY_REVIEW_BELOW`` it is a reason, and so is a confidence
  below it (certainty times the share kept by post-processing);
- post-processing: the share of the predicted voxels that the clean-up removed (a second component the
  network drew); above ``REMOVED_REVIEW_ABOVE`` it is a reason, and it scales the confidence down;
- the QA flags of ``qa``: an empty structure (confidence 0), left/right partners in the wrong order;
- the body: a contour mostly outside the patient (``inference.body``);
- plausibility against the training set, where the bundle carries its statistics: a volume outside the
  range seen in training (widened by ``VOLUME_MARGIN``): a reason, without changing the confidence.
The confidence is the certainty, times the share kept by post-processing, capped by the hard flags;
a structure is flagged for review when any reason holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CERTAINTY_REVIEW_BELOW = 0.90  # chosen on bench_quality (docs/quality.md): sensitivity vs false flags
REMOVED_REVIEW_ABOVE = 0.10
VOLUME_MARGIN = 1.5  # a volume below min / 1.5 or above max * 1.5 of the training set is implausible
OUTSIDE_REVIEW_ABOVE = 0.5  # share of a contour outside the patient's body (air, the couch)
LATERALITY_CAP, OUTSIDE_CAP = 0.25, 0.2


@dataclass
class Review:
    """One structure's confidence, flag and reasons (short sentences a physicist understands)."""

    confidence: float
    review: bool
    reasons: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"confidence": round(self.confidence, 3), "review": self.review, "review_reasons": list(self.reasons)}


def review_structure(*, voxels: int, flags: list[str], certainty: float | None, removed_fraction: float,
                     volume_ml: float, volume_range_ml: tuple[float, float] | None,
                     outside_fraction: float = 0.0) -> Review:
    """The review of one structure from its signals (see the module docstring)."""
    if voxels == 0:
        return Review(0.0, True, ["empty"])
    reasons = []
    if outside_fraction > OUTSIDE_REVIEW_ABOVE:
        reasons.append(f"{outside_fraction:.0%} outside the body")
    confidence = 1.0 if certainty is None else float(certainty)
    if certainty is not None and certainty < CERTAINTY_REVIEW_BELOW:
        reasons.append(f"low network certainty (expected Dice {certainty:.2f})")
    if removed_fraction > REMOVED_REVIEW_ABOVE:
        reasons.append(f"{removed_fraction:.0%} removed by post-processing")
    confidence *= 1.0 - removed_fraction
    if not reasons and confidence < CERTAINTY_REVIEW_BELOW:  # each a little off, together enough to look
        reasons.append(f"low confidence (expected Dice {certainty:.2f}, {removed_fraction:.0%} removed by "
                       f"post-processing)")
    if outside_fraction > OUTSIDE_REVIEW_ABOVE:
        confidence = min(confidence, OUTSIDE_CAP)
    if "laterality" in flags:
        reasons.append("left/right order")
        confidence = min(confidence, LATERALITY_CAP)
    if volume_range_ml is not None:
        low, high = volume_range_ml
        if volume_ml < low / VOLUME_MARGIN or volume_ml > high * VOLUME_MARGIN:
            middle = (low + high) / 2
            reasons.append(f"volume {volume_ml / middle:.1f}x the training set's typical ({volume_ml:.1f} ml; "
                           f"training {low:.1f}-{high:.1f} ml)")
            # a reason only: the confidence stays the network's own estimate. A volume outside the training
            # range often means an anatomy the bundle never saw rather than a wrong contour (on the full-size
            # phantom, scaling the confidence by it dropped the AUC there from 0.84 to 0.62)
    return Review(max(0.0, min(1.0, confidence)), bool(reasons), reasons)


REVIEW_TAG, CONFIDENCE_TAG, REASONS_TAG = "SegRap.Review", "SegRap.Confidence", "SegRap.ReviewReasons"
SUMMARY_REASONS_UP_TO = 6  # more flagged structures than this: names only in the summary line


def review_tags(structures: dict[str, dict]) -> dict[str, dict[str, str]]:
    """The .seg.nrrd segment tags of each structure's review record (provenance ``structures[NAME]``)."""
    tags = {}
    for name, entry in structures.items():
        if "confidence" in entry:
            tags[name] = {REVIEW_TAG: "1" if entry["review"] else "0", CONFIDENCE_TAG: f"{entry['confidence']:.3f}"}
            if entry["review"]:
                tags[name][REASONS_TAG] = "; ".join(entry["review_reasons"])
    return tags


def summary_line(reviews: dict[str, Review]) -> str:
    """One line naming the structures to review, least confident first (or saying there are none)."""
    flagged = [name for _, name in sorted((r.confidence, name) for name, r in reviews.items() if r.review)]
    if not flagged:
        return "no structure flagged for review"
    head = f"review {len(flagged)} of {len(reviews)} structures: "
    if len(flagged) > SUMMARY_REASONS_UP_TO:
        return head + ", ".join(flagged) + " (reasons in the provenance and the segment tags)"
    return head + "; ".join(f"{name} ({', '.join(reviews[name].reasons)})" for name in flagged)
