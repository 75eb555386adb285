"""Helpers of the model-store tests."""

from __future__ import annotations

import json
from pathlib import Path

from SegRapSegmenterLib.inference import bundles as M


def rewrite_checksums(root: Path) -> None:
    """List every file of the folder in its manifest with its checksum: an attacker's bundle is self-consistent."""
    manifest = json.loads((root / M.MANIFEST_NAME).read_text())
    manifest["files"] = {p.relative_to(root).as_posix(): M.sha256_file(p) for p in sorted(root.rglob("*"))
                         if p.is_file() and p.name != M.MANIFEST_NAME}
    (root / M.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def edit_plans(root: Path, **arch_changes) -> None:
    """Change the OAR network's ``arch_kwargs`` in the bundle's plans and re-list the checksums (self-consistent)."""
    path = root / "oar" / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(arch_changes)
    path.write_text(json.dumps(plans, indent=1))
    rewrite_checksums(root)
