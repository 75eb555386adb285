"""The network and preprocessing a bundle's ``plans.json`` names, checked against an allow-list: plans are data.

nnU-Net resolves every class path in a plans file with ``pydoc.locate`` and calls it with keyword
arguments from the same file, so a plans file could name any importable callable (``os.system``)
and a name that does not resolve is silently dropped (a network without its nonlinearities).
Here each name is looked up in a fixed table of the dynamic_network_architectures networks and
the torch.nn building blocks nnU-Net plans use, every keyword argument must be a parameter of the
class it goes to, and the names nnU-Net resolves itself (preprocessor, resampling, normalization,
label manager, image reader) must be ones nnU-Net ships. Anything else is a ModelError naming it;
nothing is imported by a name from the plans, and the network is built only from checked values.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from ..errors import ModelError

# network classes: the path the plans may use -> (module, class name); the residual_unet path is
# what nnU-Net writes when converting old plans (the class now lives in unet)
NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": ("unet", "PlainConvUNet"),
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": ("unet", "ResidualEncoderUNet"),
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": ("unet", "ResidualEncoderUNet"),
    "dynamic_network_architectures.architectures.unet.ResidualUNet": ("unet", "ResidualUNet"),
}
# class-valued network arguments (nnU-Net's ``_kw_requires_import``): argument -> torch.nn (or
# dynamic_network_architectures block) class names it may take
_TORCH_CLASSES = {
    "conv_op": ("conv", ("Conv1d", "Conv2d", "Conv3d")),
    "norm_op": ("instancenorm", ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")),
    "dropout_op": ("dropout", ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout")),
    "nonlin": ("activation", ("LeakyReLU", "ReLU", "ReLU6", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU",
                              "Mish", "Hardswish", "Tanh", "Sigmoid")),
}
_EXTRA_TORCH = {"norm_op": ("batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))}
_BLOCKS = ("BasicBlockD", "BottleneckD")  # ResidualEncoderUNet's ``block``
# arguments we set ourselves, and ones a plans file may not choose for a building block
_OURS = ("input_channels", "num_classes", "deep_supervision")
_NOT_FROM_PLANS = ("device", "dtype")
# names nnU-Net resolves itself by searching its own packages (not by import path)
PREPROCESSORS = ("DefaultPreprocessor",)
RESAMPLING = {"resample_data_or_seg_to_shape": "default_resampling", "resample_torch_fornnunet": "resample_torch",
              "no_resampling_hack": "no_resampling"}
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
LABEL_MANAGERS = ("LabelManager",)
READERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient", "Tiff3DIO",
           "NaturalImage2DIO")


# bounds on the sizes a plans file sets (nnU-Net's own presets stay far inside them: 3D networks
# use 4-7 stages of at most 320 features, 3x3x3 kernels, strides of 1-2, 1-6 blocks per stage)
MAX_STAGES = 12
MAX_FEATURES = 2048
MAX_KERNEL = 9
MAX_STRIDE = 8
MAX_REPEATS = 16  # convolutions or residual blocks per stage
_SIZE_BOUNDS = {"features_per_stage": MAX_FEATURES, "kernel_sizes": MAX_KERNEL, "strides": MAX_STRIDE,
                "n_conv_per_stage": MAX_REPEATS, "n_conv_per_stage_decoder": MAX_REPEATS,
                "n_blocks_per_stage": MAX_REPEATS, "stem_channels": MAX_FEATURES,
                "bottleneck_channels": MAX_FEATURES}
MIRROR_AXES = (0, 1, 2)


def _whole_numbers(value) -> list:
    """The numbers of a plans size value (a number, a list of them, or a list of lists), flattened."""
    if isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _whole_numbers(v)]
    return [value]


def check_sizes(kwargs: Mapping, where: str) -> None:
    """Refuse network sizes outside sane bounds (stages, features, kernels, strides, repeats) before anything is built.

    A network is allocated from these numbers before its weights are compared: one feature count of
    10^6, or thousands of stages, costs gigabytes (or minutes) before the checkpoint is even looked at.
    """
    stages = kwargs.get("n_stages")
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES:
        raise ModelError(f"{where}: refused: n_stages {stages!r} is not a whole number from 1 to {MAX_STAGES}.")
    for key, bound in _SIZE_BOUNDS.items():
        if kwargs.get(key) is None:
            continue
        numbers = _whole_numbers(kwargs[key])
        if (not numbers or len(numbers) > 3 * MAX_STAGES
                or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= bound for n in numbers)):
            raise ModelError(f"{where}: refused: {key} {kwargs[key]!r} are not whole numbers from 1 to {bound} "
                             f"(at most {3 * MAX_STAGES} of them).")


def check_mirroring_axes(axes, where: str) -> tuple[int, ...]:
    """Test-time mirroring axes as a tuple, refused unless distinct axes among 0, 1, 2 (each combination is a pass)."""
    if axes is None:
        return ()
    values = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    if (any(isinstance(a, bool) or a not in MIRROR_AXES for a in values) or len(set(values)) != len(values)):
        raise ModelError(f"{where}: refused: mirroring axes {axes!r} are not distinct axes among 0, 1 and 2 "
                         f"(test-time mirroring runs the network once per combination of them).")
    return tuple(int(a) for a in values)


def _allowed_classes(argument: str) -> dict[str, type]:
    """The classes a class-valued network argument may name: every spelling of their path -> class."""
    import torch.nn

    table: dict[str, type] = {}
    if argument == "block":
        from dynamic_network_architectures.building_blocks import residual

        for name in _BLOCKS:
            table[f"dynamic_network_architectures.building_blocks.residual.{name}"] = getattr(residual, name)
        return table
    for module, names in (_TORCH_CLASSES[argument], _EXTRA_TORCH.get(argument, (None, ()))):
        for name in names:
            cls = getattr(torch.nn, name, None)
            if cls is None:  # an older torch without it
                continue
            for path in (f"torch.nn.{name}", f"torch.nn.modules.{module}.{name}", f"{cls.__module__}.{name}"):
                table[path] = cls
    return table


def class_arguments() -> tuple[str, ...]:
    """The network arguments that name a class."""
    return (*_TORCH_CLASSES, "block")


def _parameters(fn, where: str, skip: int = 0) -> tuple[set[str], bool]:
    """Keyword parameters of ``fn`` (its first ``skip`` positional ones left out) and whether it takes **kwargs."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:  # pragma: no cover - every allowed callable has a signature
        raise ModelError(f"{where}: cannot inspect {fn!r} ({exc}).") from exc
    if params and params[0].name == "self":
        params = params[1:]
    params = params[skip:]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_kwargs(kwargs, fn, label: str, where: str, skip: int = 0) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"{where}: {label} must be a JSON object of arguments, got {type(kwargs).__name__}.")
    names, _ = _parameters(fn, where, skip)
    bad = [k for k in kwargs if k not in names or k in _NOT_FROM_PLANS]
    if bad:
        raise ModelError(f"{where}: refused: {label} has argument(s) {', '.join(map(repr, bad))} that "
                         f"{getattr(fn, '__qualname__', fn)} does not take from a plans file.")


def resolve_configuration(plans: Mapping, name: str, where: str) -> dict:
    """A configuration of the plans with its ``inherits_from`` chain merged in (plain dictionaries only)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping) or name not in configurations:
        raise ModelError(f"{where}: no configuration {name!r} (the plans have: "
                         f"{', '.join(configurations or {}) if isinstance(configurations, Mapping) else 'none'}).")
    chain, current = [], name
    while current is not None:
        if current in chain or current not in configurations or not isinstance(configurations[current], Mapping):
            raise ModelError(f"{where}: configuration {name!r} inherits from a missing or circular "
                             f"configuration {current!r}.")
        chain.append(current)
        current = configurations[current].get("inherits_from")
    merged: dict = {}
    for part in reversed(chain):
        merged.update(configurations[part])
    return merged


def network_spec(plans: Mapping, configuration: str, where: str) -> tuple[type, dict]:
    """The checked network class and keyword arguments (classes resolved) of a plans configuration."""
    conf = resolve_configuration(plans, configuration, where)
    arch = conf.get("architecture")
    if not isinstance(arch, Mapping):
        raise ModelError(f"{where}: configuration {configuration!r} has no 'architecture' (plans from nnU-Net "
                         f"before 2.3 are not supported; re-plan the dataset).")
    class_name = arch.get("network_class_name")
    if class_name not in NETWORKS:
        raise ModelError(f"{where}: refused: network class {class_name!r} is not one of the allowed "
                         f"dynamic_network_architectures networks ({', '.join(sorted(set(NETWORKS)))}).")
    from dynamic_network_architectures.architectures import unet

    attribute = NETWORKS[class_name][1]
    network_class = getattr(unet, attribute)
    kwargs = arch.get("arch_kwargs")
    imports = arch.get("_kw_requires_import", [])
    if not isinstance(kwargs, Mapping) or not isinstance(imports, (list, tuple)):
        raise ModelError(f"{where}: the architecture's arch_kwargs / _kw_requires_import are malformed.")
    names, _ = _parameters(network_class, where)
    check_sizes(kwargs, where)
    unknown = [k for k in kwargs if k not in names or k in _OURS]
    if unknown:
        raise ModelError(f"{where}: refused: network argument(s) {', '.join(map(repr, unknown))} are not "
                         f"arguments of {attribute} a plans file may set.")
    resolved = dict(kwargs)
    for key in imports:
        if key not in class_arguments():
            raise ModelError(f"{where}: refused: _kw_requires_import names {key!r}; only "
                             f"{', '.join(class_arguments())} may name classes.")
        if key not in resolved:
            raise ModelError(f"{where}: _kw_requires_import names {key!r}, which arch_kwargs does not set.")
        value = resolved[key]
        if value is None:
            continue
        table = _allowed_classes(key)
        if value not in table:
            allowed = sorted({f"torch.nn.{c.__name__}" if c.__module__.startswith("torch") else c.__name__
                              for c in table.values()})
            raise ModelError(f"{where}: refused: {key} {value!r} is not an allowed class (allowed: "
                             f"{', '.join(allowed)}).")
        resolved[key] = table[value]
    for key in class_arguments():
        if isinstance(resolved.get(key), str):
            raise ModelError(f"{where}: refused: {key} {resolved[key]!r} is a class name that _kw_requires_import "
                             f"does not list.")
    for key in ("norm_op", "dropout_op", "nonlin"):
        cls = resolved.get(key)
        if cls is not None:
            # the network passes the channel count (norms) positionally; the rest must be named parameters
            _check_kwargs(resolved.get(f"{key}_kwargs"), cls, f"{key}_kwargs", where, skip=1 if key == "norm_op" else 0)
        elif resolved.get(f"{key}_kwargs"):
            _check_kwargs(resolved.get(f"{key}_kwargs"), lambda: None, f"{key}_kwargs (with no {key})", where)
    return network_class, resolved


def check_plans(plans: Mapping, configuration: str, where: str) -> None:
    """Refuse a plans file that names anything outside the allow-lists, or arguments those do not take."""
    if not isinstance(plans, Mapping):
        raise ModelError(f"{where}: not a plans file (a JSON object).")
    network_spec(plans, configuration, where)
    conf = resolve_configuration(plans, configuration, where)
    if conf.get("preprocessor_name", "DefaultPreprocessor") not in PREPROCESSORS:
        raise ModelError(f"{where}: refused: preprocessor {conf.get('preprocessor_name')!r} is not one of "
                         f"{', '.join(PREPROCESSORS)}.")
    import importlib

    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        name = conf.get(key)
        if name not in RESAMPLING:
            raise ModelError(f"{where}: refused: {key} {name!r} is not one of nnU-Net's resampling functions "
                             f"({', '.join(RESAMPLING)}).")
        fn = getattr(importlib.import_module(f"nnunetv2.preprocessing.resampling.{RESAMPLING[name]}"), name)
        _check_kwargs(conf.get(f"{key}_kwargs") or {}, fn, f"{key}_kwargs", where, skip=4)
    schemes = conf.get("normalization_schemes")
    if not isinstance(schemes, list) or not schemes or any(s not in NORMALIZATIONS for s in schemes):
        raise ModelError(f"{where}: refused: normalization_schemes {schemes!r} are not all among "
                         f"{', '.join(NORMALIZATIONS)}.")
    if plans.get("label_manager", "LabelManager") not in LABEL_MANAGERS:
        raise ModelError(f"{where}: refused: label_manager {plans.get('label_manager')!r} is not LabelManager.")
    if plans.get("image_reader_writer", "SimpleITKIO") not in READERS:
        raise ModelError(f"{where}: refused: image_reader_writer {plans.get('image_reader_writer')!r} is not one of "
                         f"{', '.join(READERS)}.")


def _parameter_shapes(state: Mapping) -> dict[str, tuple[int, ...]]:
    return {str(k): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def build_network(plans: Mapping, configuration: str, input_channels: int, num_classes: int, where: str,
                  weights: Mapping | None = None, weights_where: str = "the checkpoint"):
    """The network of a checked plans configuration (no deep supervision), with nnU-Net's initialisation.

    With ``weights`` (a checkpoint's state dict) the network is first built on torch's ``meta`` device
    (shapes only, no memory) and its parameter names and shapes compared with the weights, so plans
    that do not fit the checkpoint are refused before the real network is allocated.
    """
    import torch

    network_class, kwargs = network_spec(plans, configuration, where)

    def construct():
        try:
            return network_class(input_channels=input_channels, num_classes=num_classes, **kwargs,
                                 deep_supervision=False)
        except (TypeError, ValueError, AssertionError, RuntimeError, IndexError) as exc:
            raise ModelError(f"{where}: the network of configuration {configuration!r} cannot be built "
                             f"({exc}).") from exc

    if weights is not None:
        with torch.device("meta"):
            expected = _parameter_shapes(construct().state_dict())
        found = _parameter_shapes(weights)
        if expected != found:
            differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            shown = "; ".join(f"{k}: plans {expected.get(k)}, checkpoint {found.get(k)}" for k in differ[:3])
            raise ModelError(f"{where}: the network of configuration {configuration!r} does not fit the "
                             f"weights of {weights_where} ({len(differ)} of {len(expected | found)} tensors differ: "
                             f"{shown}); refused before building it.")
    network = construct()
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network
