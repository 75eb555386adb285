"""Making nnU-Net find the SegRap trainers by name, without editing nnU-Net's files by hand.

nnU-Net looks a trainer up by class name (``recursive_find_trainer_class_by_name``): first in its
own package ``nnunetv2.training.nnUNetTrainer``, then (recent nnU-Net; 2.8 does) in each folder listed in
the environment variable ``nnUNet_extTrainer``, importing every module there. So:

- Primary mechanism: ``trainer_folder()`` writes a folder holding one module,
  ``segrap_trainers.py``, whose only line imports our trainer classes from this package; point
  ``nnUNet_extTrainer`` at it. ``segrap train run`` does this itself; for ``nnUNetv2_train -tr``
  run ``export nnUNet_extTrainer=$(segrap train trainers --path)``. Nothing of nnU-Net changes,
  the environment variable inherits into DDP worker processes, and the classes stay in our package.
- Fallback for nnU-Net versions without ``nnUNet_extTrainer``: ``install_shim()`` writes the same
  one-line module into nnU-Net's trainer package (``segrap train trainers --install``) and
  ``remove_shim()`` deletes it again (``--uninstall``). Reinstalling nnU-Net also removes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError

SHIM_NAME = "segrap_trainers.py"
SHIM_TEXT = ("# Written by SegRapSegmenterLib (segrap train trainers): nnU-Net finds the SegRap trainers here.\n"
             "from SegRapSegmenterLib.training.trainers import *  # noqa: F401,F403\n")
EXT_TRAINER_ENV = "nnUNet_extTrainer"


def _segrap_home() -> Path:
    home = os.environ.get("SEGRAP_HOME")
    return Path(home) if home else Path.home() / ".segrap"


def _write_shim(path: Path) -> Path:
    if path.is_file() and path.read_text() == SHIM_TEXT:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(SHIM_TEXT)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the trainer module ({exc}).") from exc
    return path


def trainer_folder(folder: str | Path | None = None) -> Path:
    """The folder (default ``$SEGRAP_HOME/nnunet_trainers``) holding the one-line trainer module, written if needed."""
    folder = Path(folder) if folder else _segrap_home() / "nnunet_trainers"
    _write_shim(folder / SHIM_NAME)
    return folder


def register_trainers(folder: str | Path | None = None) -> Path:
    """Add the trainer folder to ``nnUNet_extTrainer`` in this process (and the processes it starts)."""
    folder = trainer_folder(folder)
    paths = [p for p in os.environ.get(EXT_TRAINER_ENV, "").split(os.pathsep) if p]
    if str(folder) not in paths:
        os.environ[EXT_TRAINER_ENV] = os.pathsep.join([*paths, str(folder)])
    return folder


def nnunet_supports_ext_trainer() -> bool:
    """True when this nnU-Net searches ``nnUNet_extTrainer`` (recent versions; 2.8 does)."""
    import nnunetv2.paths as paths

    return hasattr(paths, EXT_TRAINER_ENV)


def nnunet_trainer_package() -> Path:
    """nnU-Net's own trainer package folder, where it always looks."""
    import nnunetv2

    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def install_shim() -> Path:
    """Write the one-line trainer module into nnU-Net's trainer package; returns its path."""
    return _write_shim(nnunet_trainer_package() / SHIM_NAME)


def remove_shim() -> Path | None:
    """Delete the module ``install_shim`` wrote (only ours: its text must match); returns the path removed."""
    path = nnunet_trainer_package() / SHIM_NAME
    if not path.exists():
        return None
    if path.read_text() != SHIM_TEXT:
        raise OutputError(f"{path}: not the module segrap wrote (its text differs); remove it by hand if intended.")
    path.unlink()
    return path


def find_trainer(name: str):
    """The trainer class for ``name``: ours directly, others as nnU-Net resolves them; None if unknown."""
    from .trainers import TRAINERS

    if name in TRAINERS:
        return TRAINERS[name]
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        return recursive_find_trainer_class_by_name(name)
    except (ImportError, RuntimeError, AssertionError):
        return None
