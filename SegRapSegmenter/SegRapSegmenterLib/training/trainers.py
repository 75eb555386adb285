"""nnU-Net v2 trainers for the DKFZ fine-tuning recipe (see ``schedule`` and docs/training.md).

``SegRapStagedTrainer`` loads pre-trained weights (``SEGRAP_PRETRAINED_WEIGHTS``, matched by name
and shape), trains only the segmentation heads for 10 epochs, then the whole network, on the
staged schedule; 1000 epochs. Variants: ``_2000ep`` (2000 epochs, the poster's best runs) and
``_fg33`` (every patch drawn around foreground with probability 0.33, instead of nnU-Net's
default of forcing the last third of each batch, which is one patch in two at batch size 2).

Left-right mirroring is off in training (``training_mirroring = "none"``): stock nnU-Net mirrors
without swapping the paired left/right labels, which teaches the network to ignore laterality.

nnU-Net finds these classes by name through ``nnUNet_extTrainer`` (see ``registry``).
Settings for short runs and tests come from ``SEGRAP_TRAINER_OPTIONS``, a JSON object such as
``{"num_epochs": 3, "heads_epochs": 1, "warmup_epochs": 1, "num_iterations_per_epoch": 2}``;
``segrap train run`` sets both variables from its options.
"""

from __future__ import annotations

import json
import os
from os.path import isfile, join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..errors import InputError, ModelError
from .pretrained import bare_module, is_head, load_pretrained
from .schedule import StagedLRScheduler, StagedSchedule

PRETRAINED_ENV = "SEGRAP_PRETRAINED_WEIGHTS"
OPTIONS_ENV = "SEGRAP_TRAINER_OPTIONS"
OPTION_TYPES = {
    "num_epochs": int, "num_iterations_per_epoch": int, "num_val_iterations_per_epoch": int,
    "heads_epochs": int, "warmup_epochs": int, "heads_peak_lr": float, "initial_lr": float, "save_every": int,
}
PRETRAINED_REPORT_NAME = "pretrained_weights.json"
RESUME_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # what --c looks for


def parse_options(text: str | None) -> dict:
    """The trainer settings of a ``SEGRAP_TRAINER_OPTIONS`` value, checked by name and type."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{OPTIONS_ENV} is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(options, dict):
        raise InputError(f"{OPTIONS_ENV} must be a JSON object, got {text!r}")
    unknown = sorted(set(options) - set(OPTION_TYPES))
    if unknown:
        raise InputError(f"{OPTIONS_ENV}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(OPTION_TYPES)}.")
    return {k: OPTION_TYPES[k](v) for k, v in options.items()}


class SegRapStagedTrainer(nnUNetTrainer):
    """Staged fine-tuning from pre-trained weights: heads only, whole-network warm-up, poly decay; 1000 epochs."""

    total_epochs = 1000
    probabilistic_fg: float | None = None  # None: nnU-Net's default oversampling
    training_mirroring = "none"  # recorded in bundles: "none", "plain" or "laterality-aware"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit parameters: nnU-Net records them by name in its checkpoints
        self._continuing = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.total_epochs
        self.heads_epochs, self.warmup_epochs = 10, 50
        self.heads_peak_lr, self.initial_lr = 1e-3, 1e-2
        if self.probabilistic_fg is not None:
            self.probabilistic_oversampling = True
            self.oversample_foreground_percent = self.probabilistic_fg
        options = parse_options(os.environ.get(OPTIONS_ENV))
        for key, value in options.items():
            setattr(self, key, value)
        self.pretrained_weights = os.environ.get(PRETRAINED_ENV) or None
        self.pretrained_report = None
        self._stage = None
        if options:
            self.print_to_log_file(f"{OPTIONS_ENV}: {options}")

    def schedule(self) -> StagedSchedule:
        """The learning-rate schedule of the current settings."""
        return StagedSchedule(self.num_epochs, self.heads_epochs, self.heads_peak_lr, self.warmup_epochs,
                              self.initial_lr)

    def _resuming(self) -> bool:
        """True when nnU-Net will load a checkpoint of this fold (``--continue`` with one present)."""
        return self._continuing and any(isfile(join(self.output_folder, name)) for name in RESUME_CHECKPOINTS)

    def initialize(self):
        """nnU-Net's set-up, then the schedule checked and the pre-trained weights loaded (not when resuming)."""
        self.schedule()  # fails now, not after data loading, when the epochs cannot hold the stages
        super().initialize()
        resuming = self._resuming()
        if self.pretrained_weights and not resuming:
            self.pretrained_report = load_pretrained(self.network, self.pretrained_weights)
            self.print_to_log_file(self.pretrained_report.summary())
            if self.local_rank == 0:
                self.pretrained_report.write(join(self.output_folder, PRETRAINED_REPORT_NAME))
        elif not resuming:
            self.print_to_log_file(f"WARNING: no pre-trained weights ({PRETRAINED_ENV} is not set): the heads-only "
                                   f"stage trains the heads on a randomly initialised network.")

    def configure_optimizers(self):
        """SGD as nnU-Net's, with two parameter groups (heads, rest) so the rest can wait for stage 2."""
        heads, body = [], []
        for name, param in bare_module(self.network).named_parameters():
            (heads if is_head(name) else body).append(param)
        if not heads:
            raise ModelError(f"{self.configuration_manager.network_arch_class_name} has no segmentation heads "
                             f"(parameters named *.seg_layers.*); the staged trainer cannot tell what to train first.")
        optimizer = torch.optim.SGD([{"params": heads}, {"params": body}], self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        optimizer.register_step_pre_hook(self._drop_frozen_gradients)
        return optimizer, StagedLRScheduler(optimizer, self.schedule)

    def _drop_frozen_gradients(self, optimizer, args, kwargs) -> None:
        """In the heads-only stage the rest of the network must not move, even where gradients reach it (DDP)."""
        if self._stage == "heads":
            for param in optimizer.param_groups[1]["params"]:
                param.grad = None

    def _enter_stage(self, stage: str) -> None:
        """Freeze (heads stage) or unfreeze everything but the heads; under DDP only the optimizer holds them."""
        if stage == self._stage:
            return
        if not self.is_ddp:  # DDP keeps the parameter set it was built with, so there requires_grad stays
            for name, param in bare_module(self.network).named_parameters():
                if not is_head(name):
                    param.requires_grad_(stage != "heads")
        self._stage = stage
        what = "segmentation heads only" if stage == "heads" else "whole network"
        self.print_to_log_file(f"stage {stage} from epoch {self.current_epoch}: training the {what}")

    def on_train_epoch_start(self):
        self._enter_stage(self.schedule().stage(self.current_epoch))
        super().on_train_epoch_start()

    def _set_batch_size_and_oversample(self):
        """nnU-Net's per-GPU batch split; probabilistic oversampling keeps its rate on every GPU."""
        rate = self.oversample_foreground_percent
        super()._set_batch_size_and_oversample()
        if self.probabilistic_oversampling:
            self.oversample_foreground_percent = rate

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's augmentation, without mirroring when ``training_mirroring`` is 'none'."""
        base = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, dummy_2d, initial_patch, mirror_axes = base
        if self.training_mirroring == "none":
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch, mirror_axes


class SegRapStagedTrainer_2000ep(SegRapStagedTrainer):
    """The staged schedule over 2000 epochs (the poster's best runs)."""

    total_epochs = 2000


class SegRapStagedTrainer_fg33(SegRapStagedTrainer):
    """Foreground oversampling at 33% per patch (probabilistic), instead of nnU-Net's last-third-of-the-batch rule."""

    probabilistic_fg = 0.33


class SegRapStagedTrainer_2000ep_fg33(SegRapStagedTrainer):
    """2000 epochs and 33% probabilistic foreground oversampling."""

    total_epochs = 2000
    probabilistic_fg = 0.33


TRAINERS = {cls.__name__: cls for cls in (SegRapStagedTrainer, SegRapStagedTrainer_2000ep, SegRapStagedTrainer_fg33,
                                          SegRapStagedTrainer_2000ep_fg33)}
