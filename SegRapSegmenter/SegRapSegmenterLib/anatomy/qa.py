"""Quality checks of a finished segmentation: volumes, centroids, empty structures, left/right order.

The phrase ``LATERALITY_WARNING`` marks the warnings of a left/right structure found on the wrong
side of its partner; the Slicer module looks for it to show those warnings in a dialog, not only
in the log.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..arrays import CroppedMasks
from . import structures as S

LATERALITY_WARNING = "left and right may be swapped"

EMPTY_WARNING = "empty (the model found no voxel of it)"  # the demo gathers these into one line


def laterality_warnings(warnings: list[str]) -> list[str]:
    """The warnings among ``warnings`` that say a left/right pair may be swapped."""
    return [w for w in warnings if LATERALITY_WARNING in w]


def structure_report(masks: CroppedMasks, reference: sitk.Image) -> tuple[dict, list[str]]:
    """Volume (ml), voxel count, centroid (LPS) and QA flags per structure; and the warnings they raise."""
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    report: dict[str, dict] = {}
    for name in masks:
        box, mask = masks.crop(name)
        count = int(np.count_nonzero(mask))
        entry = {"voxels": count, "volume_ml": round(count * voxel_ml, 3), "flags": []}
        if count:
            zyx = np.argwhere(mask).mean(axis=0) + [b.start for b in box]
            entry["centroid_lps_mm"] = [round(v, 2) for v in reference.TransformContinuousIndexToPhysicalPoint(
                [float(v) for v in zyx[::-1]])]
        else:
            entry["flags"].append("empty")
        report[name] = entry
    warnings = [f"{n}: {EMPTY_WARNING}" for n, e in report.items() if "empty" in e["flags"]]
    for name, entry in report.items():
        s = S.get(name)
        partner = report.get(s.partner) if s.laterality == "L" else None
        if partner and "centroid_lps_mm" in entry and "centroid_lps_mm" in partner:
            if entry["centroid_lps_mm"][0] <= partner["centroid_lps_mm"][0]:
                entry["flags"].append("laterality")
                partner["flags"].append("laterality")
                warnings.append(f"{name} lies to the patient's right of {s.partner}: {LATERALITY_WARNING} "
                                f"(check the image orientation and the contours)")
    return report, warnings
