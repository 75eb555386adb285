"""``segrap train run``: nnU-Net's own training entry (``run_training``) with the SegRap trainers registered.

Everything nnU-Net's ``nnUNetv2_train`` does happens here too (dataset, configuration, fold, plans
identifier, ``num_gpus`` for DDP, continue, validation only); in addition the trainer folder is put
on ``nnUNet_extTrainer`` and the pre-trained checkpoint and short-run settings are handed to our
trainers through ``SEGRAP_PRETRAINED_WEIGHTS`` / ``SEGRAP_TRAINER_OPTIONS``, which the DDP worker
processes inherit.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from .registry import find_trainer, nnunet_supports_ext_trainer, register_trainers
from .trainers import OPTIONS_ENV, PRETRAINED_ENV, TRAINERS, parse_options


@contextmanager
def _environment(values: dict[str, str | None]):
    """Set (or with None, unset) environment variables for the duration; restore them after."""
    def apply(settings: dict[str, str | None]) -> None:
        for key, value in settings.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _require_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise InputError(f"Set {', '.join(missing)} first (nnU-Net's data folders), e.g. export "
                         f"{missing[0]}=/data/{missing[0]}; see docs/training.md.")


def result_folder(dataset: str, configuration: str, fold: str, trainer: str, plans: str) -> Path:
    """Where nnU-Net writes this training: $nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<conf>/fold_<fold>."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    return Path(os.environ["nnUNet_results"]) / name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"


def check_pretrained_for(dataset: str, configuration: str, plans: str, pretrained: str | Path):
    """The pre-trained checkpoint against the network of the plans training will use, before nnU-Net starts
    (a ModelError naming both architectures when they differ); returns the report."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from .pretrained import check_pretrained

    name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    plans_path = folder / f"{plans}.json"
    if not plans_path.is_file():
        raise InputError(f"{plans_path}: no such plans file; plan the dataset first (docs/training.md, step 2), or "
                         f"give the plans identifier with -p.")
    return check_pretrained(pretrained, plans_path, folder / "dataset.json", configuration)


def run(dataset: str, configuration: str, fold: str, *, trainer: str = "SegRapStagedTrainer",
        plans: str = "nnUNetPlans", pretrained: str | Path | None = None, options: dict | None = None,
        num_gpus: int = 1, device: str = "cuda", continue_training: bool = False, validation_only: bool = False,
        npz: bool = False, disable_checkpointing: bool = False) -> Path:
    """Train (and validate) one fold with nnU-Net's ``run_training``; returns the fold's result folder."""
    import torch

    _require_env("nnUNet_preprocessed", "nnUNet_results")
    ours = trainer in TRAINERS
    if options and not ours:
        raise InputError(f"--epochs/--iterations/--stage-epochs apply to the SegRap trainers "
                         f"({', '.join(TRAINERS)}), not {trainer}.")
    parse_options(json.dumps(options or {}))
    if pretrained is not None and not Path(pretrained).is_file():
        raise InputError(f"--pretrained {pretrained}: no such checkpoint file.")
    if device not in ("cuda", "cpu", "mps"):
        raise InputError(f"--device must be cuda, cpu or mps, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available to this torch; use --device cpu for a smoke run.")
    register_trainers()
    if ours and not nnunet_supports_ext_trainer():
        from .registry import SHIM_NAME, nnunet_trainer_package

        if not (nnunet_trainer_package() / SHIM_NAME).is_file():
            raise InputError("This nnU-Net does not search nnUNet_extTrainer (older nnU-Net versions do not); run "
                             "`segrap train trainers --install` once, or upgrade nnU-Net.")
    elif find_trainer(trainer) is None:
        raise InputError(f"nnU-Net has no trainer named {trainer!r}; SegRap's are {', '.join(TRAINERS)}.")
    if pretrained is not None and ours and not (continue_training or validation_only):
        check_pretrained_for(dataset, configuration, plans, pretrained)  # refuse another architecture now, not later
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    env = {PRETRAINED_ENV: str(Path(pretrained).resolve()) if (pretrained and ours) else None,
           OPTIONS_ENV: json.dumps(options) if options else None}
    from nnunetv2.run.run_training import run_training

    with _environment(env):
        run_training(str(dataset), configuration, fold, trainer, plans,
                     pretrained_weights=None if ours or pretrained is None else str(pretrained),
                     num_gpus=num_gpus, export_validation_probabilities=npz, continue_training=continue_training,
                     only_run_validation=validation_only, disable_checkpointing=disable_checkpointing,
                     device=torch.device(device))
    return result_folder(str(dataset), configuration, fold, trainer, plans)
