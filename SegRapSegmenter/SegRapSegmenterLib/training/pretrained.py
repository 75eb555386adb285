"""Pre-trained weights into an nnU-Net network: the architecture checked, input channels and heads adapted.

The body of the network the plans describe (every tensor but the segmentation heads) must be in the
checkpoint with the same names and shapes: a checkpoint of another architecture is refused with a
ModelError that compares the two encoders (stages, features, convolutions per stage), because loading
the few tensors that happen to match would fine-tune a mostly random network without anyone noticing.
Two differences are adapted instead: the segmentation heads (another class count: left freshly
initialised for our 54 + background or 3 classes; the same count: loaded) and the input channels
of the first convolution (the checkpoint's kernels averaged over its channels and shared among
ours, so a constant input gives the same response). ``allow_partial`` keeps the old behaviour for
experiments: load what matches and report the rest. Checkpoints are nnU-Net's
(``{"network_weights": state_dict, ...}``) or a bare state dict; ``module.`` (DDP) and
``_orig_mod.`` (torch.compile) prefixes are removed; the file's sha256 goes into the report, the
trainers write it next to the fold and bundle export into the manifest.

The public pre-trained weights this is meant for (DKFZ's MultiTalent successors, Zenodo record
13753413) fit ``nnUNetResEncUNetLPlansIso1x1x1.json`` of the MIC-DKFZ/MultiTalent repository;
``RESENC_L_ISO`` records that plan's 3d_fullres network (read there, docs/training.md).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelError

HEAD_MARKER = "seg_layers"  # nnU-Net's segmentation heads: decoder.seg_layers.<k>.{weight,bias}
STRIP_PREFIXES = ("module.", "_orig_mod.")
BODY_PREFIXES = ("encoder.", "decoder.")

# nnUNetResEncUNetLPlansIso1x1x1.json (MIC-DKFZ/MultiTalent, commit cfb39c2), configuration 3d_fullres:
# facts of the network, not a copy of the file. Patch 192 x 192 x 192 at 1 x 1 x 1 mm, batch size 2,
# ZScoreNormalization, planner nnUNetPlannerResEncLIso1x1x1_znorm.
RESENC_L_ISO = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "nonlin": "torch.nn.LeakyReLU",
}


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
    adapted: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # input channels: ckpt -> network
    sha256: str = ""  # of the checkpoint file: which weights the model started from

    @property
    def skipped(self) -> list[str]:
        """Network tensors left as initialised (shape mismatch or not in the checkpoint)."""
        return [n for n, _, _ in self.shape_mismatch] + self.missing

    def summary(self) -> str:
        """A few lines for the training log and the terminal."""
        total = len(self.loaded) + len(self.skipped)
        heads = ("segmentation heads loaded (same classes)" if self.heads_loaded
                 else "segmentation heads re-initialised (the class count differs or they are absent)")
        lines = [f"pre-trained weights {self.checkpoint} (sha256 {self.sha256[:16]}...): {len(self.loaded)} of "
                 f"{total} tensors loaded; {heads}"]
        lines += [f"  input channels adapted {n}: checkpoint {tuple(a)} -> network {tuple(b)}" for n, a, b in self.adapted]
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


def is_head_like(name: str) -> bool:
    """A checkpoint tensor that belongs to a segmentation head, ours or a pre-training's (``seg_*``, ``*head*``)."""
    return is_head(name) or any(part.startswith("seg_") or "head" in part for part in name.split("."))


def encoder_outline(state: dict) -> str:
    """Stages, output features and convolutions per stage of a state dict's encoder (for messages)."""
    stages: dict[int, list] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if (len(parts) > 3 and parts[0] == "encoder" and parts[1] == "stages" and parts[2].isdigit()
                and name.endswith("conv.weight") and "all_modules" not in parts and len(tensor.shape) >= 3):
            stages.setdefault(int(parts[2]), []).append(tuple(tensor.shape))
    if not stages:
        return "no nnU-Net encoder (no encoder.stages.N tensors)"
    order = sorted(stages)
    return (f"{len(order)} stages, features {[stages[i][-1][0] for i in order]}, convolutions per stage "
            f"{[len(stages[i]) for i in order]}")


def _input_tensor_shape(target: dict):
    """The shape of the network's first convolution kernel (its input channels are axis 1)."""
    return next((tuple(t.shape) for t in target.values() if len(t.shape) == 5), None)


def _adapt_input_channels(weight, channels: int):
    """A first-layer kernel for ``channels`` inputs: the checkpoint's averaged over its inputs, shared among ours."""
    return weight.mean(dim=1, keepdim=True).repeat(1, channels, *([1] * (weight.dim() - 2))) / channels


def load_pretrained(network, checkpoint: str | Path, allow_partial: bool = False) -> PretrainedReport:
    """Load ``checkpoint`` into ``network``: the body exactly, the input channels and heads adapted.

    Heads are loaded only when all of them match (same class count); otherwise they all keep their
    fresh initialisation. Raises ModelError when the checkpoint's body differs from the network's
    (a tensor missing, of another shape, or a body tensor the network lacks) unless ``allow_partial``;
    then, and always when no tensor outside the heads matches, it is another architecture.
    """
    import torch

    from ..inference.bundles import sha256_file

    source = read_state_dict(checkpoint)
    module = bare_module(network)
    target = module.state_dict()
    report = PretrainedReport(str(checkpoint), sha256=sha256_file(Path(checkpoint)))
    heads_match = all(n in source and tuple(source[n].shape) == tuple(t.shape)
                      for n, t in target.items() if is_head(n))
    report.heads_loaded = heads_match and any(is_head(n) for n in target)
    first = _input_tensor_shape(target)
    update = {}
    for name, tensor in target.items():
        have = tuple(source[name].shape) if name in source else None
        if have is None:
            report.missing.append(name)
        elif is_head(name) and not heads_match:
            report.shape_mismatch.append((name, list(have), list(tensor.shape)))
        elif have != tuple(tensor.shape):
            if (tuple(tensor.shape) == first and len(have) == 5 and have[0] == first[0] and have[2:] == first[2:]):
                update[name] = _adapt_input_channels(source[name].float(), first[1]).to(dtype=tensor.dtype)
                report.adapted.append((name, list(have), list(tensor.shape)))
            else:
                report.shape_mismatch.append((name, list(have), list(tensor.shape)))
        else:
            update[name] = source[name].to(dtype=tensor.dtype)
            report.loaded.append(name)
    report.unused = [n for n in source if n not in target]
    if not any(not is_head(n) for n in update):
        raise ModelError(f"{checkpoint}: no tensor of the network matches the checkpoint by name and shape "
                         f"(network e.g. {next(iter(target))}, checkpoint e.g. {next(iter(source), 'nothing')}). "
                         f"It was trained with another architecture: fine-tune with the pre-training's plans "
                         f"(nnUNetv2_move_plans_between_datasets), see docs/training.md.")
    body_problems = ([f"{n}: checkpoint {tuple(a)}, network {tuple(b)}" for n, a, b in report.shape_mismatch
                      if not is_head(n)]
                     + [f"{n}: not in the checkpoint" for n in report.missing if not is_head(n)]
                     + [f"{n}: in the checkpoint, not in the network" for n in report.unused
                        if n.startswith(BODY_PREFIXES) and not is_head_like(n)])
    if body_problems and not allow_partial:
        raise ModelError(
            f"{checkpoint}: refused: its architecture differs from the network of the plans "
            f"({len(body_problems)} tensors outside the segmentation heads differ, e.g. "
            f"{'; '.join(body_problems[:4])}). Checkpoint encoder: {encoder_outline(source)}; the plans' network: "
            f"{encoder_outline(target)}. Fine-tune with the plans the weights were trained with (for DKFZ's "
            f"MultiTalent weights nnUNetResEncUNetLPlansIso1x1x1, moved to the dataset with "
            f"nnUNetv2_move_plans_between_datasets), see docs/training.md.")
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
                     configuration: str, allow_partial: bool = False) -> PretrainedReport:
    """What loading ``checkpoint`` for this plans' network would load, adapt and skip, without training
    (a ModelError when its architecture is not the plans')."""
    return load_pretrained(network_from_plans(plans_path, dataset_json_path, configuration), checkpoint,
                           allow_partial)
