"""What each structure looked like in a bundle's training set, for the review flag's plausibility check.

A bundle may carry ``structure_stats.json`` beside its manifest, listed and checksummed in the manifest
like every other file: per structure the range of its volume (ml) over the training cases that have it,
and how many cases that was. A predicted volume far outside that range (``anatomy.review``) is a
reason to review the contour. The file is written when a bundle is made (``training.statistics``);
a bundle without it simply has no plausibility check, and the provenance says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .bundles import MANIFEST_NAME, Bundle, sha256_file

STATS_NAME = "structure_stats.json"
FORMAT = "segrap-structure-stats/1"


def volumes_ml(masks: Mapping[str, np.ndarray], spacing) -> dict[str, float]:
    """Each structure's volume in ml (masks z, y, x; ``spacing`` in mm, any axis order)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {name: float(np.count_nonzero(mask)) * voxel_ml for name, mask in masks.items()}


def summarize(per_case: list[dict[str, float]], source: str) -> dict:
    """The statistics file's content from each training case's volumes (a structure absent from a case is left
    out of its range: a patient without nodes has no GTVnd)."""
    names = sorted({n for case in per_case for n in case})
    structures = {}
    for name in names:
        present = np.array([case[name] for case in per_case if case.get(name, 0.0) > 0.0])
        if len(present):
            structures[name] = {"volume_ml": [round(float(present.min()), 4), round(float(np.median(present)), 4),
                                              round(float(present.max()), 4)], "cases": int(len(present))}
    return {"format": FORMAT, "cases": len(per_case), "source": source, "structures": structures}


def write_statistics(bundle_root: str | Path, stats: dict) -> Path:
    """Write ``structure_stats.json`` into a bundle folder and list it, with its sha256, in the manifest."""
    root = Path(bundle_root)
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{manifest_path}: cannot be read as a bundle manifest ({exc}).") from exc
    path = root / STATS_NAME
    _replace_text(path, json.dumps(stats, indent=1) + "\n")
    manifest.setdefault("files", {})[STATS_NAME] = sha256_file(path)
    _replace_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return path


def _replace_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it into place (never half-written)."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_statistics(bundle: Bundle) -> dict | None:
    """The bundle's training statistics when it carries them (checked by the bundle's own verification, as the
    manifest lists the file); None when it has none. ModelError for a file that is not ours."""
    if STATS_NAME not in bundle.files:
        return None
    path = bundle.root / STATS_NAME
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot be read ({exc}); reinstall the bundle.") from exc
    if not isinstance(stats, dict) or stats.get("format") != FORMAT or not isinstance(stats.get("structures"), dict):
        raise ModelError(f"{path}: not a {FORMAT} file; reinstall or re-export the bundle.")
    return stats


def volume_range(stats: dict | None, name: str) -> tuple[float, float] | None:
    """(min, max) volume in ml of a structure over the training cases that had it; None when unknown."""
    entry = (stats or {}).get("structures", {}).get(name)
    try:
        low, _, high = (float(v) for v in entry["volume_ml"])
    except (TypeError, KeyError, ValueError):
        return None
    return (low, high) if 0.0 < low <= high else None
