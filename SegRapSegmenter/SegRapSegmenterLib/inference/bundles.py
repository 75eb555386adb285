"""Model bundles and the model store.

A bundle is a folder (or a zip of one) with a manifest ``segrap-model.json`` and one nnU-Net result
folder per task (``dataset.json``, ``plans.json``, ``fold_X/checkpoint_final.pth``). The manifest
names the bundle and, per task, the trainer, plans, configuration, input image, folds, label names
and how the model was trained with respect to mirroring; it lists the sha256 of every file. The
store is ``$SEGRAP_HOME/models`` (default ``~/.segrap/models``), one folder per bundle name.

A bundle is untrusted data. Checkpoints are read with ``torch.load(weights_only=True)`` (tensors,
numbers, strings and plain containers) after their zip records are checked to be stored, not
compressed, so a tensor cannot inflate past the file's size; ``plans.json`` is checked against an
allow-list of network classes and building blocks (``architecture``) and the network is built from
that list, never by importing a name from the file; every file must be listed in the manifest at a
plain relative path, and sources are unpacked within size limits (``unpack``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, ModelError
from . import unpack
from .architecture import check_plans
from .unpack import Limits, Report, plain_relative

MANIFEST_NAME = unpack.MANIFEST_NAME
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
    pretrained_sha256: tuple[str, ...] = ()  # checkpoints the training started from (fine-tuning, warm start)


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
                              "training_mirroring": m.training_mirroring,
                              **({"pretrained_sha256": list(m.pretrained_sha256)} if m.pretrained_sha256 else {})}
                          for t, m in self.tasks.items()}}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_labels(task: str) -> dict[str, int]:
    from ..anatomy import structures as S  # here, not above: the CLI's parent process reads the store without numpy

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
    """A bundle's JSON file as an object; missing, invalid or another kind of value is a ModelError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object (found {type(data).__name__}).")
    return data


def _dataset_labels(dataset: dict, path: Path) -> dict[str, int]:
    """dataset.json's label names and values, or a ModelError naming the file when they are not that."""
    labels = dataset.get("labels", {})
    try:
        return {str(k): int(v) for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: 'labels' is not an object of label names and whole numbers ({exc}).") from None


def load_bundle(root: str | Path, check_network: bool = True) -> Bundle:
    """Read and check a bundle folder's manifest (labels, folds, inputs); checksums are ``verify_bundle``'s job.

    ``check_network=False`` leaves out the plans' allow-list check, which needs torch: for listing bundles
    in a Python without torch (Slicer's, when the worker runs elsewhere). The predictor checks them again
    before it builds a network, so nothing is built from unchecked plans.
    """
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
                task=task, result_folder=plain_relative(spec["result_folder"], f"{manifest_path}: {task} result_folder")
                .as_posix(), trainer=spec["trainer"], plans=spec["plans"],
                configuration=spec["configuration"], input=spec["input"],
                folds=tuple(str(f) for f in spec["folds"]), labels=dict(spec["labels"]),
                test_time_mirroring=bool(spec.get("test_time_mirroring", False)),
                training_mirroring=spec.get("training_mirroring", "plain"),
                orientation=spec.get("orientation"),
                pretrained_sha256=tuple(str(p.get("sha256", "")) for p in spec.get("pretrained_weights", [])
                                        if isinstance(p, dict)))
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
            _check_labels(task, _dataset_labels(dataset, dataset_json), dataset_json)
            trained_in = dataset.get(DATASET_ORIENTATION_KEY)
            if trained_in is not None and model.orientation != trained_in:
                # inputs would be reoriented to the wrong axes and reach the network mirrored or transposed
                raise ModelError(f"{manifest_path}: the {task} model's orientation is {model.orientation!r}, but "
                                 f"{dataset_json} says its training cases were stored in {trained_in!r}; "
                                 f"left and right could come out swapped. Fix the manifest (or re-export the bundle).")
            if not model.folds:
                raise ModelError(f"{manifest_path}: the {task} model lists no folds.")
            for fold in model.folds:
                plain_relative(f"fold_{fold}", f"{manifest_path}: {task} fold")
            plans_json = root / model.result_folder / "plans.json"
            if check_network:
                check_plans(_read_json(plans_json), model.configuration, str(plans_json))
            tasks[task] = model
        bundle = Bundle(root=root, name=str(data["name"]), version=str(data["version"]),
                        license=str(data["license"]), description=str(data.get("description", "")),
                        tasks=tasks, files={plain_relative(k, str(manifest_path)).as_posix(): str(v)
                                            for k, v in dict(data["files"]).items()})
    except KeyError as exc:
        raise ModelError(f"{manifest_path}: required field {exc.args[0]!r} is missing.") from None
    except (AttributeError, TypeError, ValueError) as exc:  # a field of the wrong kind: a list for an object...
        raise ModelError(f"{manifest_path}: malformed: a field has the wrong kind of value ({exc}).") from None
    if not bundle.tasks:
        raise ModelError(f"{manifest_path}: the bundle has no tasks.")
    for task in bundle.tasks:
        for fold in bundle.tasks[task].folds:
            if not bundle.checkpoint_path(task, fold).is_file():
                raise ModelError(f"{bundle.checkpoint_path(task, fold)}: missing; the manifest lists fold {fold}.")
    return bundle


@dataclass(frozen=True)
class Verification:
    """What a bundle check did: files hashed, files passed on their recorded size and times, and the record."""

    hashed: int
    unchanged: int
    record: str | None  # where the record of this check was written, None when it was not
    stats: dict[str, list[int]] = field(default_factory=dict, repr=False)  # rel -> file_stamp of each hashed file

    def summary(self) -> dict:
        """What provenance records of the check."""
        how = ("sha256 of every file" if not self.unchanged else
               f"sha256 of {self.hashed} file(s) changed or not yet recorded; the other {self.unchanged} unchanged "
               f"since they passed a full sha256 check (same size, modification and change time, file id)")
        return {"hashed": self.hashed, "unchanged_since_full_check": self.unchanged, "how": how}


VERIFIED_FOLDER = "verified"  # beside the store: SEGRAP_HOME/verified/<key of the bundle's folder>.json


def file_stamp(path: Path) -> list[int]:
    """Size, modification time, change time (ns) and file id of a file: what any write to it changes."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verification_record_path(bundle: Bundle) -> Path:
    """Where the record of a bundle's last full check is kept (under SEGRAP_HOME, not inside the bundle)."""
    key = hashlib.sha256(os.path.normcase(os.path.abspath(bundle.root)).encode("utf-8")).hexdigest()[:32]
    return store_root().parent / VERIFIED_FOLDER / f"{key}.json"


def _read_record(bundle: Bundle, manifest_sha256: str) -> dict[str, dict]:
    """The file entries of the bundle's record, or {} when there is none or it is of another manifest or folder."""
    try:
        data = json.loads(verification_record_path(bundle).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("manifest_sha256") != manifest_sha256 \
            or data.get("root") != os.path.abspath(bundle.root) or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def record_verification(bundle: Bundle, verification: Verification) -> str | None:
    """Write the record that later quick checks trust: each hashed file's stamp, kept only if it is still the same.

    Best effort: a store that cannot be written means every run hashes every file again (nothing is skipped).
    """
    files = {}
    for rel, stamp in verification.stats.items():
        try:
            if file_stamp(bundle.root / rel) == stamp:
                files[rel] = {"stamp": stamp, "sha256": bundle.files[rel]}
        except OSError:
            continue
    path = verification_record_path(bundle)
    data = {"root": os.path.abspath(bundle.root), "manifest_sha256": sha256_file(bundle.root / MANIFEST_NAME),
            "files": files}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(data, indent=0))
        os.replace(tmp, path)
    except OSError:
        return None
    return str(path)


def verify_bundle(bundle: Bundle, quick: bool = False, record: bool = True) -> Verification:
    """Check every listed file's sha256; a missing or changed file is a ModelError naming it.

    ``quick`` (each run): a file whose size, modification time, change time and file id are those
    recorded when it last passed a full hash is not hashed again; any other file is. ``record``:
    write that record after a check that passed (``segrap models verify`` and install write it).
    Links and files missing from the manifest are looked for every time.
    """
    problems = []
    manifest_sha256 = sha256_file(bundle.root / MANIFEST_NAME)
    recorded = _read_record(bundle, manifest_sha256) if quick else {}
    hashed, unchanged, stats = 0, 0, {}
    for rel, expected in sorted(bundle.files.items()):
        path = bundle.root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        before = file_stamp(path)
        entry = recorded.get(rel)
        if isinstance(entry, dict) and entry.get("stamp") == before and entry.get("sha256") == expected:
            unchanged += 1
            continue
        digest = sha256_file(path)
        hashed += 1
        if digest != expected:
            problems.append(f"{rel}: checksum differs (file changed or damaged)")
        elif file_stamp(path) == before:  # not written to while it was read
            stats[rel] = before
    required = [f"{model.result_folder}/{name}" for model in bundle.tasks.values()
                for name in ("dataset.json", "plans.json")]
    required += [bundle.checkpoint_path(t, f).relative_to(bundle.root).as_posix()
                 for t, m in bundle.tasks.items() for f in m.folds]
    present = set()
    for folder, dirs, names in os.walk(bundle.root):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(bundle.root).as_posix()
            if path.is_symlink():
                problems.append(f"{rel}: a link (bundles may not contain links)")
            elif name in names and rel != MANIFEST_NAME:
                present.add(rel)
    problems += [f"{rel}: not listed in the manifest's checksums" for rel in required if rel not in bundle.files]
    problems += [f"{rel}: not listed in the manifest's checksums" for rel in sorted(present - set(bundle.files))
                 if rel not in required]
    if problems:
        raise ModelError(f"Bundle {bundle.name} {bundle.version} at {bundle.root} failed verification:\n  "
                         + "\n  ".join(problems) + "\nReinstall it from its source.")
    if quick:  # the files that passed on their record keep it
        stats |= {rel: entry["stamp"] for rel, entry in recorded.items() if rel in bundle.files and rel not in stats
                  and file_stamp(bundle.root / rel) == entry["stamp"]}
    result = Verification(hashed, unchanged, None, stats)
    if record and hashed:
        result = Verification(hashed, unchanged, record_verification(bundle, result), stats)
    return result


def check_checkpoint_records(path: Path) -> None:
    """Refuse a checkpoint whose records could inflate in memory: torch's zip format with stored records only.

    ``torch.save`` stores every record uncompressed and torch checks each tensor's declared size
    against its record, so with stored records nothing loaded can exceed the file's own size; a
    deflated record (which torch would inflate whole), records sharing bytes (read once per record) or
    a directory that claims more than the file holds is refused before ``torch.load`` sees the file:
    what torch reads is then bounded by the file's size.
    """
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            unpack.check_records_apart(path, zf)  # shared bytes would be loaded once per record
    except zipfile.BadZipFile as exc:
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                raise ModelError(f"{path}: not a readable checkpoint (truncated or damaged?): {exc}") from exc
        raise ModelError(f"{path}: refused: not in torch's zip checkpoint format (older formats declare tensor sizes "
                         f"that are allocated before they are read). Re-save it with a current torch.") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelError(f"{path}: refused: record {info.filename} is compressed ({info.compress_size} bytes "
                             f"inflating to {info.file_size}); torch.save never compresses, and such a record could "
                             f"fill the memory. Re-export the bundle.")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
            raise ModelError(f"{path}: refused: record {info.filename} claims {info.file_size} bytes that the "
                             f"{size}-byte file does not hold.")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without executing pickled code (``weights_only=True``)."""
    import pickle

    import torch

    check_checkpoint_records(path)
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
        # detached, not cloned: a network's state dict names some tensors twice (ResEnc's decoder holds the
        # encoder; a conv is also an entry of ``all_modules``) and torch.save writes a shared storage once;
        # clones made a ResEnc L checkpoint 2.1 GB instead of 0.56 GB, and as large in memory when loaded
        "network_weights": {k: v.detach() for k, v in full["network_weights"].items()},
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
                 orientation: str | dict[str, str | None] | None = None,
                 pretrained: dict[str, list[dict]] | None = None) -> Path:
    """Write a bundle folder from nnU-Net result folders (one per task); returns its path.

    ``trainer_name`` is what the checkpoints record; nnU-Net builds the network from the plans for
    ``nnUNetTrainer`` and for trainers that do not override ``build_network_architecture``.
    ``orientation``: the axis orientation the training images were stored in (e.g. "LPS"; or one per
    task); inputs are reoriented to it before inference, so a flipped storage cannot swap left and right.
    ``pretrained``: per task, the checkpoints training started from (``{"file": name, "sha256": hex}``).
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
            if (pretrained or {}).get(task):
                tasks[task]["pretrained_weights"] = list(pretrained[task])
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


INSTALL_PREFIX = ".install."
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_bundle_name(name: str, where: str = "bundle name") -> str:
    """A bundle name as a plain folder name (letters, digits, '.', '_', '-'; not starting with '.'), or a ModelError."""
    text = str(name)
    if not text or text.startswith(".") or not set(text) <= _NAME_CHARS or len(text) > 128:
        raise ModelError(f"{where}: {text!r} is not a bundle name; a name is letters, digits, '.', '_' and '-' "
                         f"(no path, not starting with '.').")
    return text


def _install_alive(folder: Path) -> bool:
    """Whether the install that made a ``.install.<pid>.*`` work folder may still be running."""
    try:
        pid = int(folder.name[len(INSTALL_PREFIX):].split(".", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name == "nt":  # without psutil, only the age tells: a day-old install is not running
        import time

        return time.time() - folder.stat().st_mtime < 86400
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_interrupted_installs(store: Path) -> list[Path]:
    """Remove the work folders of installs that were killed (their process is gone); returns them."""
    removed = []
    if store.is_dir():
        for folder in store.glob(INSTALL_PREFIX + "*"):
            if folder.is_dir() and not folder.is_symlink() and not _install_alive(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def install_bundle(source: str | Path, store: Path | None = None, force: bool = False, allow_http: bool = False,
                   limits: Limits | None = None, *, report: Report | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Bundle:
    """Install a bundle from a folder, a zip or an https/file URL (http with ``allow_http``), checking it first.

    Nothing reaches the store's bundle folder before the bundle passed every check (limits, listed
    files, plain paths, plans, checksums); a refused or interrupted install leaves only a work
    folder that this function removes (and the next install removes if the process was killed).
    ``report(message, fraction)`` hears about the download; ``should_stop()`` returning True stops
    it with ``Cancelled`` (nothing is installed then).
    """
    store = store or store_root()
    limits = limits or Limits.from_env()
    store.mkdir(parents=True, exist_ok=True)
    clean_interrupted_installs(store)
    work = Path(tempfile.mkdtemp(prefix=f"{INSTALL_PREFIX}{os.getpid()}.", dir=store))
    try:
        text = str(source)
        scheme = urllib.parse.urlparse(text).scheme.lower()
        if scheme in ("http", "https", "file", "ftp"):
            local = work / "download"
            unpack.download(text, local, limits, allow_http=allow_http, report=report, should_stop=should_stop)
        else:
            local = Path(source)
            if not local.exists():
                raise ModelError(f"{local}: no such file or folder to install from.")
        root = work / "unpacked"
        root.mkdir()
        if local.is_dir():
            unpack.copy_folder(local, root, limits)
        elif zipfile.is_zipfile(local):
            unpack.extract_zip(local, root, limits)
        else:
            raise ModelError(f"{source}: neither a bundle folder nor a zip file.")
        try:
            bundle = load_bundle(root)
            if report is not None:
                report("Verifying the checksums", None)
            verification = verify_bundle(bundle, record=False)  # the work folder's record would be of no use
            check_bundle_name(bundle.name, f"{root / MANIFEST_NAME}: bundle name")
            for task in bundle.tasks:
                for fold in bundle.tasks[task].folds:
                    check_checkpoint_records(bundle.checkpoint_path(task, fold))
        except ModelError as exc:  # name the source the user gave, not the work folder
            raise ModelError(str(exc).replace(str(root), str(source).rstrip("/\\"))) from exc
        if should_stop is not None and should_stop():
            raise Cancelled(f"{source}: installation cancelled.")
        final = store / bundle.name
        if final.exists():
            if not force:
                raise ModelError(f"A bundle named {bundle.name} is already installed at {final}; "
                                 f"remove it first or install with --force.")
            shutil.rmtree(final)
        os.replace(root, final)
        installed = load_bundle(final)
        record_verification(installed, verification)  # the same files, moved: runs need not hash them again
        return installed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def list_bundles(store: Path | None = None, check_network: bool = True) -> list[Bundle]:
    """The installed bundles (damaged ones are skipped; ``verify`` names their problems)."""
    store = store or store_root()
    out = []
    if store.is_dir():
        for folder in sorted(store.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                try:
                    out.append(load_bundle(folder, check_network))
                except ModelError:
                    continue
    return out


def remove_bundle(name: str, store: Path | None = None) -> Path:
    """Delete an installed bundle; returns the folder removed."""
    store = store or store_root()
    folder = store / check_bundle_name(name, "models remove")
    if folder.is_symlink() or not (folder / MANIFEST_NAME).is_file():
        installed = ", ".join(b.name for b in list_bundles(store)) or "none"
        raise ModelError(f"No bundle named {name!r} is installed in {store} (installed: {installed}).")
    shutil.rmtree(folder)
    return folder


def resolve_bundle(ref: str | Path | None, store: Path | None = None, check_network: bool = True) -> Bundle:
    """The bundle a user means: a folder path, an installed name, ``demo``, or (None) the only installed one.

    ``check_network=False``: the manifest and files only, not the plans' network (which imports torch).
    """
    store = store or store_root()
    if ref is not None:
        text = str(ref)
        if (store / text / MANIFEST_NAME).is_file():
            return load_bundle(store / text, check_network)
        if text == DEMO_BUNDLE_NAME:
            return load_bundle(DEMO_BUNDLE_PATH, check_network)
        path = Path(text).expanduser()
        if path.is_dir():
            return load_bundle(path, check_network)
        installed = ", ".join(b.name for b in list_bundles(store)) or "none"
        raise ModelError(f"Model bundle {text!r} is not installed (installed in {store}: {installed}). "
                         f"Install it with `segrap models install PATH_OR_URL`, or use --bundle demo for the "
                         f"phantom-trained demo model.")
    installed = list_bundles(store, check_network)
    if len(installed) == 1:
        return installed[0]
    if not installed:
        raise ModelError(f"No model bundle is installed in {store}. Install one with `segrap models install "
                         f"PATH_OR_URL`, or pass --bundle demo to try the phantom-trained demo model.")
    raise ModelError(f"Several bundles are installed ({', '.join(b.name for b in installed)}); choose one with --bundle.")
