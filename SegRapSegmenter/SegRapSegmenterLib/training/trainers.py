"""nnU-Net v2 trainers for the DKFZ fine-tuning recipe (see ``schedule`` and docs/training.md).

``SegRapStagedTrainer`` loads pre-trained weights (``SEGRAP_PRETRAINED_WEIGHTS``, matched by name
and shape), trains only the segmentation heads for 10 epochs, then the whole network, on the
staged schedule; 1000 epochs. Variants: ``_2000ep`` (2000 epochs, the poster's best runs) and
``_fg33`` (every patch drawn around foreground with probability 0.33, instead of nnU-Net's
default of forcing the last third of each batch, which is one patch in two at batch size 2).

Mirroring (``training_mirroring``, recorded per trainer instance and written into the bundle by
export): on Task 1's 54 classes the trainers mirror along nnU-Net's axes but laterality-aware
("laterality-aware": a left-right flip also swaps the paired labels, ``laterality.py``; stock
nnU-Net's flips keep "left" on a parotid that now lies on the right, which teaches the network to
ignore laterality). The left-right axis comes from the dataset's orientation (dataset.json's
``segrap_orientation``, "LPS" when missing) and the plans' ``transpose_forward``. Labels without
sides (Task 2's GTVs) get stock mirroring ("plain"; nothing to swap). Where laterality is learned,
rotations are capped at +-30 degrees: nnU-Net rotates anisotropic patches by up to 180
degrees, and a half turn moves a left parotid to the right as surely as a flip. The
``_noMirroring`` variants do not mirror at all ("none").

nnU-Net finds these classes by name through ``nnUNet_extTrainer`` (see ``registry``).
Settings for short runs and tests come from ``SEGRAP_TRAINER_OPTIONS``, a JSON object such as
``{"num_epochs": 3, "heads_epochs": 1, "warmup_epochs": 1, "num_iterations_per_epoch": 2}``;
``segrap train run`` sets both variables from its options.
"""

from __future__ import annotations

import json
import os
from os.path import isfile, join

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..anatomy import structures as S
from ..errors import InputError, ModelError
from .convert import ORIENTATION, dataset_orientation
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
MAX_ROTATION_LATERAL = 30.0 / 360 * 2 * np.pi  # radians; nnU-Net's own limit for isotropic 3D patches


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
    mirroring = True  # False: no mirroring in training (the _noMirroring variants)

    @classmethod
    def training_mirroring_for(cls, dataset_json: dict) -> str:
        """How this trainer mirrors on a dataset ("none", "plain" or "laterality-aware"; bundles record it).

        Task 1's 54 classes: "laterality-aware" (paired labels swapped on left-right flips). Labels
        without sides, such as Task 2's GTVs: "plain"; with no pairs there is nothing to swap, and
        inference (``plan_mirroring`` with ``has_pairs`` False) flips every allowed axis without a swap
        for "plain" and "laterality-aware" alike. Other labels naming a side (``_L``/``_R``): "none",
        since their pairs are not known here. The ``_noMirroring`` variants: "none".
        """
        if not cls.mirroring:
            return "none"
        labels = dataset_json.get("labels", {})
        if labels == S.class_labels():
            return "laterality-aware"
        if any(str(name).endswith(("_L", "_R")) for name in labels):
            return "none"
        return "plain"

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
        self.training_mirroring = self.training_mirroring_for(self.dataset_json)
        self.data_orientation = dataset_orientation(self.dataset_json) or ORIENTATION
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
        self.print_to_log_file(f"mirroring in training: {self.training_mirroring} (cases stored "
                               f"{self.data_orientation}, transpose_forward {self.plans_manager.transpose_forward})")
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
        """nnU-Net's augmentation; no mirroring for 'none'; rotations capped where laterality is learned."""
        base = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, dummy_2d, initial_patch, mirror_axes = base
        if self.training_mirroring == "none":
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        if self.training_mirroring != "plain" and max(abs(r) for r in rotation) > MAX_ROTATION_LATERAL:
            rotation = (-MAX_ROTATION_LATERAL, MAX_ROTATION_LATERAL)
            patch = self.configuration_manager.patch_size
            initial_patch = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
            if dummy_2d:
                initial_patch[0] = patch[0]
        return rotation, dummy_2d, initial_patch, mirror_axes

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, *args, **kwargs):
        """nnU-Net's training transforms; for 'laterality-aware' its MirrorTransform becomes the one whose
        left-right flips swap the paired labels (an instance method here: it needs the dataset's orientation)."""
        transforms = super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                     mirror_axes, do_dummy_2d_data_aug, *args, **kwargs)
        if self.training_mirroring == "laterality-aware":
            from .laterality import make_laterality_aware

            if not make_laterality_aware(transforms, self.data_orientation, self.plans_manager.transpose_forward,
                                         len(self.dataset_json["labels"])):
                self.print_to_log_file("laterality-aware mirroring: nnU-Net's transforms hold no mirroring here")
        return transforms


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


class SegRapStagedTrainer_noMirroring(SegRapStagedTrainer):
    """The staged trainer without mirroring in training (bundles record "none")."""

    mirroring = False


class SegRapStagedTrainer_2000ep_fg33_noMirroring(SegRapStagedTrainer_2000ep_fg33):
    """The poster's best runs' settings without mirroring in training."""

    mirroring = False


TRAINERS = {cls.__name__: cls for cls in (SegRapStagedTrainer, SegRapStagedTrainer_2000ep, SegRapStagedTrainer_fg33,
                                          SegRapStagedTrainer_2000ep_fg33, SegRapStagedTrainer_noMirroring,
                                          SegRapStagedTrainer_2000ep_fg33_noMirroring)}
