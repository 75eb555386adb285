"""The nnU-Net trainer of the demo bundle: stock training without left-right mirroring or half-turn rotations."""

from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class SegRapDemoTrainer(nnUNetTrainer):
    """nnUNetTrainer for the CPU-trained demo: laterality kept (no mirroring, in-plane rotation within
    15 degrees) and Adam, so a few hundred iterations suffice for a usable phantom model."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit parameters: nnU-Net records them by name for its checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_val_iterations_per_epoch = 5
        self.save_every = 10
        self.initial_lr = 3e-3

    def configure_optimizers(self):
        """Adam instead of nnU-Net's SGD (momentum 0.99): a tiny network trained for a few hundred
        CPU iterations only gets off the all-background start with an adaptive optimiser."""
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=3e-5)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Stock nnU-Net mirrors every axis and, for flat patches, rotates up to 180 degrees in-plane:
        both turn a left parotid into a right one still labelled left. Keep small rotations only."""
        patch_size = self.configuration_manager.patch_size
        rotation = (-15.0 / 360 * 2 * np.pi, 15.0 / 360 * 2 * np.pi)
        do_dummy_2d = (max(patch_size) / patch_size[0]) > 3
        initial = get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))
        if do_dummy_2d:
            initial[0] = patch_size[0]
        self.inference_allowed_mirroring_axes = None
        return rotation, do_dummy_2d, initial, None
