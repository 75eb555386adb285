"""The torch device a run uses: ``auto`` (CUDA, then Apple's MPS, then the CPU) or an explicit choice.

Its own module so that the CLI can offer the choices without importing the predictor (torch and
nnU-Net are imported only when a device is picked, in the worker).
"""

from __future__ import annotations

import re

from ..errors import InputError, ModelError

DEVICES = ("auto", "cuda", "mps", "cpu")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def check_device_name(name: str) -> str:
    """A device name as written (one of DEVICES or ``cuda:N``), or an InputError listing the choices."""
    if name in DEVICES or _CUDA_INDEX.fullmatch(str(name)):
        return name
    raise InputError(f"Unknown device {name!r}; choose one of {', '.join(DEVICES)} or cuda:N (a GPU's index).")


def pick_device(name: str):
    """The torch device for ``auto`` (cuda, then mps, then cpu) or an explicit, available choice (``cuda:N`` too).

    A Python without torch (a stock Slicer) is a ModelError: no model can run there, whatever the bundle.
    """
    check_device_name(name)
    try:
        import torch
    except ImportError as exc:
        import sys

        raise ModelError(f"PyTorch (torch) is not installed in this Python ({sys.executable}), so no model can run: "
                         f"in Slicer press Apply and let the module install it; elsewhere pip install torch "
                         f"({exc}).") from exc

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available to this torch "
                         f"({torch.__version__}); use --device cpu or auto.")
    index = _CUDA_INDEX.fullmatch(name)
    if index and int(index.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InputError(f"--device {name}: this machine has {count} CUDA device(s), numbered 0 to {count - 1} "
                         f"(CUDA_VISIBLE_DEVICES renumbers them); choose one of those.")
    if name == "mps" and not has_mps:
        raise InputError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto.")
    return torch.device(name)


def describe_device(device) -> str:
    """Human-readable device: the GPU's name and memory where there is one."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return device.type
