"""Trained nnU-Net result folders (one per task) -> a model bundle that ``segrap models install`` takes.

A result folder is nnU-Net's ``$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>``
with ``fold_X/checkpoint_final.pth``. The bundle records how each model was trained with respect
to left-right mirroring: what the trainer did on that dataset where it says (ours do:
``training_mirroring_for``, "laterality-aware" for Task 1, "plain" for Task 2), else what its
checkpoint recorded (mirroring axes: 'plain'; none: 'none'), unless given explicitly. And the
orientation the training cases were stored in: the dataset.json's ``segrap_orientation`` (written
by the conversion); for our trainers "LPS" when it is missing, as they assumed it; otherwise unknown.
Checkpoints record ``nnUNetTrainer`` so stock nnU-Net can load the bundle too (the network comes
from the plans; our trainers do not change the architecture); the trainer actually used goes
into the description.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..anatomy import structures as S
from ..errors import ModelError
from ..inference.bundles import CHECKPOINT_NAME, MIRRORING_KINDS, Bundle, build_bundle, install_bundle
from .convert import ORIENTATION, dataset_orientation


@dataclass(frozen=True)
class ResultFolder:
    """One task's nnU-Net result folder and what its name and checkpoints say."""

    path: Path
    trainer: str
    plans: str
    configuration: str
    folds: tuple[str, ...]  # folds with a final checkpoint


def read_result_folder(path: str | Path) -> ResultFolder:
    """Parse ``<Trainer>__<Plans>__<configuration>`` and list the folds that finished."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such result folder. Give $nnUNet_results/DatasetXXX_Name/"
                         f"<Trainer>__<Plans>__<configuration>.")
    parts = path.name.split("__")
    if len(parts) != 3:
        raise ModelError(f"{path}: not an nnU-Net result folder name (<Trainer>__<Plans>__<configuration>).")
    for needed in ("dataset.json", "plans.json"):
        if not (path / needed).is_file():
            raise ModelError(f"{path / needed}: missing; nnU-Net writes it when training starts.")
    folds = tuple(sorted(p.name[len("fold_"):] for p in path.glob("fold_*") if (p / CHECKPOINT_NAME).is_file()))
    return ResultFolder(path, parts[0], parts[1], parts[2], folds)


def _dataset_json(result: ResultFolder) -> dict:
    return json.loads((result.path / "dataset.json").read_text())


def orientation_of(result: ResultFolder) -> str | None:
    """The orientation the task's training cases were stored in; None when nothing says."""
    from .registry import find_trainer

    recorded = dataset_orientation(_dataset_json(result))
    if recorded:
        return recorded
    return ORIENTATION if hasattr(find_trainer(result.trainer), "training_mirroring_for") else None


def training_mirroring_of(result: ResultFolder, fold: str) -> str:
    """'none', 'plain' or 'laterality-aware': what the trainer did on this dataset, else the checkpoint's axes."""
    from .registry import find_trainer

    trainer = find_trainer(result.trainer)
    if hasattr(trainer, "training_mirroring_for"):
        return trainer.training_mirroring_for(_dataset_json(result))
    declared = getattr(trainer, "training_mirroring", None)
    if declared in MIRRORING_KINDS:
        return declared
    import torch

    checkpoint = torch.load(result.path / f"fold_{fold}" / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return "plain" if axes else "none"


def pretrained_of(result: ResultFolder, folds: list[str]) -> list[dict]:
    """The pre-trained checkpoints (file name and sha256) the folds started from, as the trainers recorded
    them (``pretrained_weights.json`` beside each fold's checkpoints); empty when none was used."""
    from .trainers import PRETRAINED_REPORT_NAME

    found: dict[str, dict] = {}
    for fold in folds:
        path = result.path / f"fold_{fold}" / PRETRAINED_REPORT_NAME
        if path.is_file():
            report = json.loads(path.read_text())
            if report.get("sha256"):
                found[report["sha256"]] = {"file": Path(report.get("checkpoint", "")).name, "sha256": report["sha256"]}
    return list(found.values())


def export_bundle(out: str | Path, *, results: dict[str, str | Path], folds: list[str] | None, name: str,
                  version: str, license: str, description: str = "", training_mirroring: str | None = None,
                  test_time_mirroring: bool = False) -> Path:
    """Write a bundle from the result folders of the tasks given (``{"oar": path, "gtv": path}``)."""
    if not results:
        raise ModelError("Give at least one result folder (--oar and/or --gtv).")
    parsed = {task: read_result_folder(path) for task, path in results.items()}
    chosen: dict[str, list[str]] = {}
    for task, result in parsed.items():
        wanted = [str(f) for f in folds] if folds else list(result.folds)
        missing = [f for f in wanted if f not in result.folds]
        if not wanted or missing:
            raise ModelError(f"{result.path}: no final checkpoint for fold(s) {', '.join(missing) or '(any)'}; "
                             f"finished folds: {', '.join(result.folds) or 'none'}.")
        chosen[task] = wanted
    if training_mirroring is not None and training_mirroring not in MIRRORING_KINDS:
        raise ModelError(f"--training-mirroring must be one of {', '.join(MIRRORING_KINDS)}.")
    mirroring = {task: training_mirroring or training_mirroring_of(r, chosen[task][0]) for task, r in parsed.items()}
    if test_time_mirroring and any(m == "none" for m in mirroring.values()):
        raise ModelError("Test-time mirroring needs a model trained with mirroring; these were trained without "
                         f"({mirroring}). Leave out --test-time-mirroring.")
    trained = "; ".join(f"{task}: {r.trainer}, plans {r.plans}, {r.configuration}, folds {','.join(chosen[task])}"
                        for task, r in parsed.items())
    text = f"{description.strip()} " if description.strip() else ""
    return build_bundle(out, name=name, version=version, license=license,
                        description=f"{text}Trained with {trained}.",
                        result_folders={t: r.path for t, r in parsed.items()}, folds=chosen,
                        training_mirroring=mirroring,
                        test_time_mirroring={t: test_time_mirroring for t in parsed},
                        orientation={t: orientation_of(r) for t, r in parsed.items()},
                        pretrained={t: pretrained_of(r, chosen[t]) for t, r in parsed.items()})


def task_of(result: ResultFolder) -> str:
    """'oar' or 'gtv', from the labels of the result folder's dataset.json; a ModelError for any other labels."""
    path = result.path / "dataset.json"
    try:
        labels = {str(k): int(v) for k, v in json.loads(path.read_text()).get("labels", {}).items()}
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: not a readable nnU-Net dataset.json ({exc}).") from exc
    for task, expected in (("oar", S.class_labels()), ("gtv", S.gtv_class_labels())):
        if labels == expected:
            return task
    raise ModelError(f"{path}: its {len(labels)} labels are neither SegRap Task 1's 54 classes (the organs at risk) "
                     f"nor Task 2's background=0, GTVp=1, GTVnd=2, so segrap cannot tell what the model "
                     f"segments. Train on a dataset written by `segrap train convert` (its label names and "
                     f"values), or fix the names in dataset.json if only they differ.")


def import_results(folders: list[str | Path], *, name: str, version: str, license: str,
                   folds: list[str] | None = None, description: str = "", training_mirroring: str | None = None,
                   store: Path | None = None, force: bool = False) -> Bundle:
    """nnU-Net result folders (one per task; the task is read from each dataset.json) -> an installed bundle.

    The bundle is exported to a temporary folder and installed from there by ``install_bundle``, so it
    passes every check ``segrap models install`` makes (plans allow-list, checksums, checkpoint records)
    and nothing reaches the store unless it does.
    """
    results: dict[str, Path] = {}
    for folder in folders:
        task = task_of(read_result_folder(folder))
        if task in results:
            raise ModelError(f"{folder}: a second {task} model (the first is {results[task]}); give one result "
                             f"folder per task.")
        results[task] = Path(folder)
    with tempfile.TemporaryDirectory(prefix="segrap-import-") as tmp:
        out = export_bundle(Path(tmp) / "bundle", results=results, folds=folds, name=name, version=version,
                            license=license, description=description or "Imported from nnU-Net result folders.",
                            training_mirroring=training_mirroring)
        return install_bundle(out, store=store, force=force)
