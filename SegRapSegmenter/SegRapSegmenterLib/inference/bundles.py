"""Model bundles and the model store.

A bundle is a folder (or a zip of one) with a manifest ``segrap-model.json`` and one nnU-Net result
folder per task (``dataset.json``, ``plans.json``, ``fold_X/checkpoint_final.pth``). The manifest
names the bundle and, per task, the trainer, plans, configuration, input image, folds, label names
and how the model was trained with respect to mirroring; it lists the sha256 of every file. The
store is ``$SEGRAP_HOME/models`` (default ``~/.segrap/models``), one folder per bundle name.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only, so a bundle cannot run code when it is loaded. What remains trusted is the
bundle's ``plans.json`` (it names the network class nnU-Net builds, which must be importable).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..anatomy import structures as S
from ..errors import Cancelled, ModelError

MANIFEST_NAME = "segrap-model.json"
FORMAT = "segrap-model/1"
CHECKPOINT_NAME = "checkpoint_final.pth"
TASK_INPUTS = {"oar": "ct", "gtv": "contrast_ct"}
MIRRORING_KINDS = ("none", "plain", "laterality-aware")
# dataset.json key in which the training conversion records the orientation its cases were stored in;
# nnU-Net copies dataset.json into the result folder, so a bundle carries it next to its manifest
DATASET_ORIENTATION_KEY = "segrap_orientation"
DEMO_BUNDLE_NAME = "demo"
DEMO_BUNDLE_PATH = Path(__file__).resolve().parents[1] / "data" / "segrap-demo"


def store_root() -> Path:
    """Where installed bundles live: ``$SEGRAP_HOME/models`` or ``~/.segrap/models``."""
    home = os.environ.get("SEGRAP_HOME")
    return (Path(home) if home else Path.home() / ".segrap") / "models"


@dataclass(frozen=True)
class TaskModel:
    """One task's nnU-Net model inside a bundle."""

    task: str  # "oar" or "gtv"
    result_folder: str  # relative to the bundle root
    trainer: str
    plans: str
    configuration: str
    input: str  # "ct" or "contrast_ct"
    folds: tuple[str, ...]
    labels: dict[str, int]
    test_time_mirroring: bool = False
    training_mirroring: str = "none"  # how left-right mirroring was used in training (see MIRRORING_KINDS)
    orientation: str | None = None  # axis orientation of the training images (DICOM letters, e.g. "LPS")


@dataclass(frozen=True)
class Bundle:
    """A bundle on disk, as its manifest describes it."""

    root: Path
    name: str
    version: str
    license: str
    description: str
    tasks: dict[str, TaskModel]
    files: dict[str, str] = field(default_factory=dict)  # relative posix path -> sha256

    def task(self, task: str) -> TaskModel:
        """The model of a task, or a ModelError saying which tasks the bundle has."""
        if task not in self.tasks:
            raise ModelError(f"Bundle {self.name} {self.version} ({self.root}) has no {task!r} model; "
                             f"it has: {', '.join(self.tasks) or 'none'}.")
        return self.tasks[task]

    def result_path(self, task: str) -> Path:
        return self.root / self.task(task).result_folder

    def checkpoint_path(self, task: str, fold: str) -> Path:
        return self.result_path(task) / f"fold_{fold}" / CHECKPOINT_NAME

    def summary(self) -> dict:
        """Name, version, license, tasks and folds: what provenance records."""
        return {"name": self.name, "version": self.version, "license": self.license,
                "manifest_sha256": sha256_file(self.root / MANIFEST_NAME),
                "tasks": {t: {"folds": list(m.folds), "configuration": m.configuration, "trainer": m.trainer,
                              "training_mirroring": m.training_mirroring} for t, m in self.tasks.items()}}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_labels(task: str) -> dict[str, int]:
    return S.class_labels() if task == "oar" else S.gtv_class_labels()


def _label_difference(found: dict, expected: dict[str, int]) -> str:
    missing = [f"{k}={v}" for k, v in expected.items() if k not in found]
    extra = [f"{k}={v}" for k, v in found.items() if k not in expected]
    wrong = [f"{k}={found[k]} (expected {v})" for k, v in expected.items() if k in found and found[k] != v]
    parts = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else "",
             f"wrong values {', '.join(wrong)}" if wrong else ""]
    return "; ".join(p for p in parts if p)


def _check_labels(task: str, labels: dict, where: Path) -> None:
    expected = _expected_labels(task)
    if labels != expected:
        what = "the 54 SegRap Task 1 classes" if task == "oar" else "background=0, GTVp=1, GTVnd=2"
        raise ModelError(f"{where}: the {task} model's labels are not {what}: "
                         f"{_label_difference(labels, expected)}.")


def _valid_orientation(code: str) -> bool:
    """Three DICOM axis letters naming each of the left-right, front-back and head-foot axes once."""
    axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(c) for c in str(code).upper()]
    return len(axes) == 3 and sorted(a for a in axes if a is not None) == [0, 1, 2]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}).") from exc


def load_bundle(root: str | Path) -> Bundle:
    """Read and check a bundle folder's manifest (labels, folds, inputs); checksums are ``verify_bundle``'s job."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelError(f"{root}: not a model bundle (no {MANIFEST_NAME}).")
    data = _read_json(manifest_path)
    try:
        if data.get("format") != FORMAT:
            raise ModelError(f"{manifest_path}: format {data.get('format')!r} is not {FORMAT!r}; "
                             f"this version of SegRapSegmenter cannot read it.")
        tasks = {}
        for task, spec in data["tasks"].items():
            if task not in TASK_INPUTS:
                raise ModelError(f"{manifest_path}: unknown task {task!r}; tasks are 'oar' and 'gtv'.")
            model = TaskModel(
                task=task, result_folder=spec["result_folder"], trainer=spec["trainer"], plans=spec["plans"],
                configuration=spec["configuration"], input=spec["input"],
                folds=tuple(str(f) for f in spec["folds"]), labels=dict(spec["labels"]),
                test_time_mirroring=bool(spec.get("test_time_mirroring", False)),
                training_mirroring=spec.get("training_mirroring", "plain"),
                orientation=spec.get("orientation"))
            if model.input != TASK_INPUTS[task]:
                raise ModelError(f"{manifest_path}: the {task} model's input is {model.input!r}; "
                                 f"it must be {TASK_INPUTS[task]!r}.")
            if model.orientation is not None and not _valid_orientation(model.orientation):
                raise ModelError(f"{manifest_path}: orientation {model.orientation!r} is not three DICOM axis "
                                 f"letters such as 'LPS'.")
            if model.training_mirroring not in MIRRORING_KINDS:
                raise ModelError(f"{manifest_path}: training_mirroring must be one of {MIRRORING_KINDS}.")
            _check_labels(task, model.labels, manifest_path)
            dataset_json = root / model.result_folder / "dataset.json"
            dataset = _read_json(dataset_json)
            _check_labels(task, {k: int(v) for k, v in dataset.get("labels", {}).items()}, dataset_json)
            trained_in = dataset.get(DATASET_ORIENTATION_KEY)
            if trained_in is not None and model.orientation != trained_in:
                # inputs would be reoriented to the wrong axes and reach the network mirrored or transposed
                raise ModelError(f"{manifest_path}: the {task} model's orientation is {model.orientation!r}, but "
                                 f"{dataset_json} says its training cases were stored in {trained_in!r}; "
                                 f"left and right could come out swapped. Fix the manifest (or re-export the bundle).")
            if not model.folds:
                raise ModelError(f"{manifest_path}: the {task} model lists no folds.")
            tasks[task] = model
        bundle = Bundle(root=root, name=str(data["name"]), version=str(data["version"]),
                        license=str(data["license"]), description=str(data.get("description", "")),
                        tasks=tasks, files=dict(data["files"]))
    except KeyError as exc:
        raise ModelError(f"{manifest_path}: required field {exc.args[0]!r} is missing.") from None
    if not bundle.tasks:
        raise ModelError(f"{manifest_path}: the bundle has no tasks.")
    for task in bundle.tasks:
        for fold in bundle.tasks[task].folds:
            if not bundle.checkpoint_path(task, fold).is_file():
                raise ModelError(f"{bundle.checkpoint_path(task, fold)}: missing; the manifest lists fold {fold}.")
    return bundle


def verify_bundle(bundle: Bundle) -> None:
    """Check every listed file's sha256; a missing or changed file is a ModelError naming it."""
    problems = []
    for rel, expected in sorted(bundle.files.items()):
        path = bundle.root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel}: checksum differs (file changed or damaged)")
    for task, model in bundle.tasks.items():
        for fold in model.folds:
            rel = bundle.checkpoint_path(task, fold).relative_to(bundle.root).as_posix()
            if rel not in bundle.files:
                problems.append(f"{rel}: not listed in the manifest's checksums")
    if problems:
        raise ModelError(f"Bundle {bundle.name} {bundle.version} at {bundle.root} failed verification:\n  "
                         + "\n  ".join(problems) + "\nReinstall it from its source.")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without executing pickled code (``weights_only=True``)."""
    import pickle

    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: the checkpoint holds Python objects beyond weights, and loading them "
                         f"could run code. Re-export it with `segrap train export-bundle`. ({exc})".strip()) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable checkpoint (truncated or damaged?): {exc}") from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights').")
    return checkpoint


# --------------------------------------------------------------------------------------------
# Building bundles from nnU-Net results
# --------------------------------------------------------------------------------------------


def _slim_checkpoint(source: Path, target: Path, trainer_name: str | None = None) -> None:
    """Keep what inference needs (weights, trainer name, configuration, mirroring axes) as plain types."""
    import torch

    full = torch.load(source, map_location="cpu", weights_only=False)  # our own training output: trusted
    axes = full.get("inference_allowed_mirroring_axes")
    slim = {
        "network_weights": {k: v.detach().clone() for k, v in full["network_weights"].items()},
        "trainer_name": trainer_name or full.get("trainer_name", "nnUNetTrainer"),
        "init_args": {"configuration": str(full["init_args"]["configuration"])},
        "inference_allowed_mirroring_axes": tuple(int(a) for a in axes) if axes is not None else None,
        "current_epoch": int(full.get("current_epoch", 0)),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, target)


def build_bundle(out: str | Path, *, name: str, version: str, license: str, description: str,
                 result_folders: dict[str, Path], folds: dict[str, list], training_mirroring: dict[str, str],
                 test_time_mirroring: dict[str, bool] | None = None, trainer_name: str = "nnUNetTrainer",
                 orientation: str | dict[str, str | None] | None = None) -> Path:
    """Write a bundle folder from nnU-Net result folders (one per task); returns its path.

    ``trainer_name`` is what the checkpoints record; nnU-Net builds the network from the plans for
    ``nnUNetTrainer`` and for trainers that do not override ``build_network_architecture``.
    ``orientation``: the axis orientation the training images were stored in (e.g. "LPS"; or one per
    task); inputs are reoriented to it before inference, so a flipped storage cannot swap left and right.
    """
    out = Path(out)
    if out.exists():
        raise ModelError(f"{out}: already exists; choose a new folder for the bundle.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        tasks = {}
        for task, result in result_folders.items():
            result = Path(result)
            dest = tmp / task
            dest.mkdir()
            for fname in ("dataset.json", "plans.json"):
                shutil.copyfile(result / fname, dest / fname)
            for fold in folds[task]:
                src = result / f"fold_{fold}" / CHECKPOINT_NAME
                if not src.is_file():
                    raise ModelError(f"{src}: missing; train fold {fold} first or leave it out of --folds.")
                _slim_checkpoint(src, dest / f"fold_{fold}" / CHECKPOINT_NAME, trainer_name)
            plans_name, configuration = result.name.split("__")[1:3]
            tasks[task] = {
                "result_folder": task, "trainer": trainer_name, "plans": plans_name, "configuration": configuration,
                "input": TASK_INPUTS[task], "folds": [str(f) for f in folds[task]],
                "labels": _expected_labels(task),
                "test_time_mirroring": bool((test_time_mirroring or {}).get(task, False)),
                "training_mirroring": training_mirroring[task],
                "orientation": orientation.get(task) if isinstance(orientation, dict) else orientation,
            }
            _check_labels(task, _read_json(dest / "dataset.json")["labels"], result / "dataset.json")
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "name": name, "version": version, "license": license,
                    "description": description, "tasks": tasks, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# The store: install, list, verify, remove, resolve
# --------------------------------------------------------------------------------------------


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing absolute paths, '..' components and links."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
                    raise ModelError(f"{archive}: refused: entry {name!r} would be written outside the bundle folder.")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ModelError(f"{archive}: refused: entry {name!r} is a link; bundles may not contain links.")
            for info in zf.infolist():
                destination = (target / info.filename).resolve()
                if not str(destination).startswith(str(target.resolve())):
                    raise ModelError(f"{archive}: refused: entry {info.filename!r} escapes the bundle folder.")
                zf.extract(info, target)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{archive}: not a valid zip file ({exc}).") from exc


def _copy_folder(source: Path, target: Path) -> None:
    root = source.resolve()
    for path in source.rglob("*"):
        if path.is_symlink() and not str(path.resolve()).startswith(str(root)):
            raise ModelError(f"{path}: refused: a link pointing outside the bundle ({path.resolve()}).")
    shutil.copytree(source, target, symlinks=False)


Report = Callable[[str, "float | None"], None]  # message, fraction done (None: not known)


def _download(url: str, target: Path, report: Report | None = None,
              should_stop: Callable[[], bool] | None = None) -> None:
    """Copy ``url`` to ``target`` in 1 MiB blocks, reporting bytes so far; ``should_stop()`` True cancels."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as fh:
            total = int(response.headers.get("Content-Length") or 0) or None
            done = 0
            while True:
                if should_stop is not None and should_stop():
                    raise Cancelled(f"{url}: download cancelled.")
                block = response.read(1 << 20)
                if not block:
                    break
                fh.write(block)
                done += len(block)
                if report is not None:
                    size = f" of {total / 2**20:.0f}" if total else ""
                    report(f"Downloading: {done / 2**20:.0f}{size} MiB", done / total if total else None)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{url}: download failed ({exc}).") from exc


def _bundle_root_in(folder: Path) -> Path:
    """The bundle folder inside an unpacked source: itself, or its one subfolder with a manifest."""
    if (folder / MANIFEST_NAME).is_file():
        return folder
    found = [p.parent for p in folder.glob(f"*/{MANIFEST_NAME}")]
    if len(found) == 1:
        return found[0]
    raise ModelError(f"No {MANIFEST_NAME} at the top of the source or in exactly one folder below it.")


def install_bundle(source: str | Path, store: Path | None = None, force: bool = False, *,
                   report: Report | None = None, should_stop: Callable[[], bool] | None = None) -> Bundle:
    """Install a bundle from a folder, a zip or an http(s)/file URL, verifying every checksum first.

    ``report(message, fraction)`` hears about the download; ``should_stop()`` returning True stops
    it with ``Cancelled`` (nothing is installed then).
    """
    store = store or store_root()
    store.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".install.", dir=store))
    try:
        text = str(source)
        scheme = urllib.parse.urlparse(text).scheme
        if scheme in ("http", "https", "file"):
            local = work / "download"
            _download(text, local, report, should_stop)
        else:
            local = Path(source)
            if not local.exists():
                raise ModelError(f"{local}: no such file or folder to install from.")
        unpacked = work / "unpacked"
        if local.is_dir():
            _copy_folder(local, unpacked)
        elif zipfile.is_zipfile(local):
            unpacked.mkdir()
            _safe_extract(local, unpacked)
        else:
            raise ModelError(f"{source}: neither a bundle folder nor a zip file.")
        root = _bundle_root_in(unpacked)
        bundle = load_bundle(root)
        if report is not None:
            report("Verifying the checksums", None)
        verify_bundle(bundle)
        if should_stop is not None and should_stop():
            raise Cancelled(f"{source}: installation cancelled.")
        if not bundle.name or "/" in bundle.name or bundle.name.startswith("."):
            raise ModelError(f"{root / MANIFEST_NAME}: bundle name {bundle.name!r} is not a usable folder name.")
        final = store / bundle.name
        if final.exists():
            if not force:
                raise ModelError(f"A bundle named {bundle.name} is already installed at {final}; "
                                 f"remove it first or install with --force.")
            shutil.rmtree(final)
        os.replace(root, final)
        return load_bundle(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def list_bundles(store: Path | None = None) -> list[Bundle]:
    """The installed bundles (damaged ones are skipped; ``verify`` names their problems)."""
    store = store or store_root()
    out = []
    if store.is_dir():
        for folder in sorted(store.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                try:
                    out.append(load_bundle(folder))
                except ModelError:
                    continue
    return out


def remove_bundle(name: str, store: Path | None = None) -> Path:
    """Delete an installed bundle; returns the folder removed."""
    store = store or store_root()
    folder = store / name
    if not (folder / MANIFEST_NAME).is_file():
        installed = ", ".join(b.name for b in list_bundles(store)) or "none"
        raise ModelError(f"No bundle named {name!r} is installed in {store} (installed: {installed}).")
    shutil.rmtree(folder)
    return folder


def resolve_bundle(ref: str | Path | None, store: Path | None = None) -> Bundle:
    """The bundle a user means: a folder path, an installed name, ``demo``, or (None) the only installed one."""
    store = store or store_root()
    if ref is not None:
        text = str(ref)
        if (store / text / MANIFEST_NAME).is_file():
            return load_bundle(store / text)
        if text == DEMO_BUNDLE_NAME:
            return load_bundle(DEMO_BUNDLE_PATH)
        path = Path(text).expanduser()
        if path.is_dir():
            return load_bundle(path)
        installed = ", ".join(b.name for b in list_bundles(store)) or "none"
        raise ModelError(f"Model bundle {text!r} is not installed (installed in {store}: {installed}). "
                         f"Install it with `segrap models install PATH_OR_URL`, or use --bundle demo for the "
                         f"phantom-trained demo model.")
    installed = list_bundles(store)
    if len(installed) == 1:
        return installed[0]
    if not installed:
        raise ModelError(f"No model bundle is installed in {store}. Install one with `segrap models install "
                         f"PATH_OR_URL`, or pass --bundle demo to try the phantom-trained demo model.")
    raise ModelError(f"Several bundles are installed ({', '.join(b.name for b in installed)}); choose one with --bundle.")
