"""Pre-trained weights into an nnU-Net network: tensors matched by name and shape, the rest reported.

Unlike nnU-Net's ``load_pretrained_weights`` (which asserts that every non-head tensor matches
and never transfers the segmentation heads), this keeps the heads when the class count is the
same and leaves them freshly initialised when it differs, loads what matches and says exactly
what it skipped and why. Checkpoints are nnU-Net's (``{"network_weights": state_dict, ...}``) or
a bare state dict; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are removed.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelError

HEAD_MARKER = "seg_layers"  # nnU-Net's segmentation heads: decoder.seg_layers.<k>.{weight,bias}
STRIP_PREFIXES = ("module.", "_orig_mod.")


def is_head(name: str) -> bool:
    """True for a parameter of a segmentation head (the 1x1x1 convolutions that output class scores)."""
    return HEAD_MARKER in name.split(".")


def bare_module(network):
    """The plain network inside DDP and torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


@dataclass
class PretrainedReport:
    """What loading a checkpoint into a network did."""

    checkpoint: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # name, checkpoint, network
    missing: list[str] = field(default_factory=list)  # in the network, not in the checkpoint
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the network
    heads_loaded: bool = False

    @property
    def skipped(self) -> list[str]:
        """Network tensors left as initialised (shape mismatch or not in the checkpoint)."""
        return [n for n, _, _ in self.shape_mismatch] + self.missing

    def summary(self) -> str:
        """A few lines for the training log and the terminal."""
        total = len(self.loaded) + len(self.skipped)
        heads = ("segmentation heads loaded (same classes)" if self.heads_loaded
                 else "segmentation heads re-initialised (the class count differs or they are absent)")
        lines = [f"pre-trained weights {self.checkpoint}: {len(self.loaded)} of {total} tensors loaded; {heads}"]
        lines += [f"  skipped {n}: checkpoint {tuple(a)} vs network {tuple(b)}" for n, a, b in self.shape_mismatch]
        lines += [f"  skipped {n}: not in the checkpoint" for n in self.missing]
        if self.unused:
            lines.append(f"  {len(self.unused)} checkpoint tensors unused (no such name in the network), e.g. "
                         f"{', '.join(self.unused[:3])}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))


def _numpy_scalar_globals() -> list:
    """What unpickling numpy scalars needs: the scalar constructor, ``dtype`` and the dtype classes."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = getattr(np, "dtypes", None)
    dtype_classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    return [core.multiarray.scalar, np.dtype, *dtype_classes]


def read_state_dict(path: str | Path) -> dict:
    """A checkpoint's network tensors, read without running pickled code (``weights_only=True``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file for the pre-trained weights.")
    try:
        # nnU-Net's checkpoints log numpy scalars: their reconstruction from bytes runs no code, so allow it
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{path}: refused: it holds Python objects beyond tensors, and loading them could run "
                         f"code. Save only the weights: torch.save({{'network_weights': ckpt['network_weights']}}, "
                         f"'weights.pth') in a Python session you trust, and give that file. ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable checkpoint (truncated or damaged?): {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("network_weights"), dict):
        data = data["network_weights"]
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(hasattr(v, "shape") for v in data.values()):
        raise ModelError(f"{path}: neither an nnU-Net checkpoint (with 'network_weights') nor a state dict of tensors.")
    out = {}
    for key, value in data.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_pretrained(network, checkpoint: str | Path) -> PretrainedReport:
    """Copy every checkpoint tensor whose name and shape match into ``network``; report the rest.

    Heads are loaded only when all of them match (same class count); otherwise they all keep their
    fresh initialisation. Raises ModelError when no tensor outside the heads matches: then the
    checkpoint is for another architecture (compare the plans' network topology).
    """
    import torch

    source = read_state_dict(checkpoint)
    module = bare_module(network)
    target = module.state_dict()
    report = PretrainedReport(str(checkpoint))
    heads_match = all(n in source and tuple(source[n].shape) == tuple(t.shape)
                      for n, t in target.items() if is_head(n))
    report.heads_loaded = heads_match and any(is_head(n) for n in target)
    update = {}
    for name, tensor in target.items():
        if name not in source:
            report.missing.append(name)
        elif tuple(source[name].shape) != tuple(tensor.shape):
            report.shape_mismatch.append((name, list(source[name].shape), list(tensor.shape)))
        elif is_head(name) and not heads_match:
            report.shape_mismatch.append((name, list(source[name].shape), list(tensor.shape)))
        else:
            update[name] = source[name].to(dtype=tensor.dtype)
            report.loaded.append(name)
    report.unused = [n for n in source if n not in target]
    if not any(not is_head(n) for n in update):
        raise ModelError(f"{checkpoint}: no tensor of the network matches the checkpoint by name and shape "
                         f"(network e.g. {next(iter(target))}, checkpoint e.g. {next(iter(source), 'nothing')}). "
                         f"It was trained with another architecture: fine-tune with the pre-training's plans "
                         f"(nnUNetv2_move_plans_between_datasets), see docs/training.md.")
    with torch.no_grad():
        for name, value in update.items():
            target[name].copy_(value)
    return report


def network_from_plans(plans_path: str | Path, dataset_json_path: str | Path, configuration: str):
    """The network nnU-Net would train for a plans file, configuration and dataset.json (deep supervision on)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(Path(plans_path).read_text())
    dataset_json = json.loads(Path(dataset_json_path).read_text())
    manager = PlansManager(plans)
    conf = manager.get_configuration(configuration)
    return get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                  conf.network_arch_init_kwargs_req_import,
                                  determine_num_input_channels(manager, conf, dataset_json),
                                  manager.get_label_manager(dataset_json).num_segmentation_heads,
                                  allow_init=True, deep_supervision=True)


def check_pretrained(checkpoint: str | Path, plans_path: str | Path, dataset_json_path: str | Path,
                     configuration: str) -> PretrainedReport:
    """What loading ``checkpoint`` for this plans' network would load and skip, without training."""
    return load_pretrained(network_from_plans(plans_path, dataset_json_path, configuration), checkpoint)
