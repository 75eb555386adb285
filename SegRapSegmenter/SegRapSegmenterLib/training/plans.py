"""Plans edits: a new nnU-Net configuration with another patch size, batch size or network settings.

The edit adds a configuration that ``inherits_from`` an existing one (nnU-Net's own mechanism) and
overrides only what is asked, so the preprocessed data of the base configuration is reused (same
``data_identifier`` and spacing: no second preprocessing) and the base stays as planned. The
poster's patch: ``segrap train edit-plans PLANS.json --name 3d_fullres_p32x320x256 --patch-size 32 320 256``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

POSTER_PATCH = (32, 320, 256)


@dataclass(frozen=True)
class PlansEdit:
    """What an edit wrote: the plans file, the new configuration and its resolved patch, batch and strides."""

    plans_path: Path
    name: str
    base: str
    patch_size: tuple[int, ...]
    batch_size: int
    divisors: tuple[int, ...]  # per axis: the network's total downsampling, which the patch must be a multiple of


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such plans file. Plans are in $nnUNet_preprocessed/DatasetXXX_Name/, written "
                         f"by nnUNetv2_plan_experiment.") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc}).") from exc


def _resolved(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain applied (as nnU-Net's PlansManager does)."""
    configurations = plans.get("configurations", {})
    seen = []
    conf: dict = {}
    while name is not None:
        if name not in configurations:
            raise InputError(f"The plans have no configuration {name!r}; they have {', '.join(configurations)}.")
        if name in seen:
            raise InputError(f"Configuration inheritance loops: {' -> '.join(seen + [name])}.")
        seen.append(name)
        conf = {**configurations[name], **conf}
        name = configurations[name].get("inherits_from")
    conf.pop("inherits_from", None)
    return conf


def downsampling(architecture: dict, dims: int) -> tuple[int, ...]:
    """Per axis, the product of the encoder's strides: a patch must be a multiple of it."""
    strides = architecture.get("arch_kwargs", {}).get("strides")
    if not strides:
        return (1,) * dims
    per_axis = [[s] * dims if isinstance(s, int) else list(s) for s in strides]
    return tuple(math.prod(s[d] for s in per_axis) for d in range(dims))


def add_configuration(plans_path: str | Path, name: str, *, base: str = "3d_fullres",
                      patch_size: tuple[int, ...] | None = None, batch_size: int | None = None,
                      arch_kwargs: dict | None = None, overwrite: bool = False) -> PlansEdit:
    """Add (or with ``overwrite`` replace) configuration ``name`` inheriting ``base``; returns what it holds."""
    plans_path = Path(plans_path)
    plans = _read(plans_path)
    configurations = plans.setdefault("configurations", {})
    if not name or "__" in name:
        raise InputError(f"Configuration name {name!r}: give a non-empty name without '__' (nnU-Net splits on it).")
    if name == base:
        raise InputError("Give the new configuration a name of its own (--name); the base stays as planned.")
    if name in configurations and not overwrite:
        raise InputError(f"{plans_path}: configuration {name!r} exists already; choose another --name or --overwrite.")
    base_conf = _resolved(plans, base)
    entry: dict = {"inherits_from": base}
    architecture = base_conf.get("architecture", {})
    if arch_kwargs:
        architecture = json.loads(json.dumps(architecture))
        unknown = sorted(set(arch_kwargs) - set(architecture.get("arch_kwargs", {})))
        if unknown:
            raise InputError(f"Unknown network setting(s) {', '.join(unknown)}; the {base} network has: "
                             f"{', '.join(architecture.get('arch_kwargs', {}))}.")
        architecture["arch_kwargs"].update(arch_kwargs)
        entry["architecture"] = architecture
    patch = tuple(int(v) for v in (patch_size or base_conf["patch_size"]))
    if len(patch) != len(base_conf["patch_size"]):
        raise InputError(f"--patch-size needs {len(base_conf['patch_size'])} values (z y x), got {list(patch)}.")
    divisors = downsampling(architecture, len(patch))
    bad = [f"{p} (axis {a}) is not a multiple of {d}" for a, (p, d) in enumerate(zip(patch, divisors)) if p % d]
    if bad:
        raise InputError(f"Patch {list(patch)} does not fit the network's downsampling {list(divisors)}: "
                         f"{'; '.join(bad)}. Choose multiples, or plan again with nnUNetv2_plan_experiment.")
    if patch_size is not None:
        entry["patch_size"] = list(patch)
    if batch_size is not None:
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}.")
        entry["batch_size"] = int(batch_size)
    configurations[name] = entry
    tmp = plans_path.with_name(f".{plans_path.name}.part")
    tmp.write_text(json.dumps(plans, indent=1))
    os.replace(tmp, plans_path)
    return PlansEdit(plans_path, name, base, patch, int(entry.get("batch_size", base_conf["batch_size"])), divisors)
