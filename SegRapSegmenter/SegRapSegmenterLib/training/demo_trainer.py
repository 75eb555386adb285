"""The nnU-Net trainer of the demo bundle: whole-volume batches held in memory, no left-right mirroring,
a per-iteration warm-up + cosine schedule and a wall-clock budget, bfloat16 autocast on CPUs that have it."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

WARMUP_FRACTION = 0.04
FINAL_LR_FRACTION = 0.01
# Cross-entropy weight of a class: sqrt(median foreground class frequency / its frequency), clipped to
# 1..CE_WEIGHT_CAP. A 7-voxel lens is 10^-4 of the brain's voxels; unweighted, the cross-entropy term
# is all large organs and the small classes wait for the Dice term alone (see docs/training.md).
CE_WEIGHT_CAP = 5.0
# Share of the windows cut from a case larger than the patch (a full-size field of view) that are centred
# on a class drawn among those the case holds (rarer ones more often, RARITY_EXPONENT), as nnU-Net's foreground
# oversampling does; the rest fall anywhere. With windows anywhere, the 0.3.0 candidate found the full-size chiasm, pituitary,
# hippocampi and optic nerves at the wrong places (DSC ~0 at the full size, 0.9 on the small phantom, where
# the whole head is the patch): a random window holds each of them in ~60% of draws, mostly at its edge.
CLASS_CENTRED_FRACTION = 0.6
CLASS_VOXELS_KEPT = 64  # voxels remembered per class and case to centre windows on
# A class-centred window picks its class with probability proportional to (its voxels in the case)^-RARITY_EXPONENT:
# with a uniform pick (0.0), 759 more iterations of the candidate left the full-size chiasm empty and the optic
# nerves at DSC 0.37 (a 47-voxel chiasm at 2 mm was the centre of ~4 windows), while large organs reached 0.9
# from random windows alone.
RARITY_EXPONENT = 0.5
# Share of the training windows drawn from cases larger than the patch (full fields of view) when the cases are
# of both kinds; a uniform draw over cases gave them 40 of 84 cases' share, and the full-size phantom lagged.
LARGER_CASE_SHARE = 0.65


def class_weights(label_maps, num_classes: int, cap: float = CE_WEIGHT_CAP) -> np.ndarray:
    """Per-class cross-entropy weights from training label maps (background and common classes 1)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for seg in label_maps:
        counts += np.bincount(np.asarray(seg, np.int64).ravel(), minlength=num_classes)[:num_classes]
    present = counts[1:] > 0
    if not present.any():
        return np.ones(num_classes, dtype=np.float32)
    median = float(np.median(counts[1:][present]))
    weights = np.sqrt(median / np.maximum(counts, 1.0))
    weights = np.clip(weights, 1.0, cap)
    weights[0] = 1.0
    return weights.astype(np.float32)


def cpu_bfloat16_is_fast() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it: on
    a 2-core AMD EPYC without either (2026-12-06) one 16-feature 3x3x3 convolution of a 48 x 96 x 96 patch
    took 39-68 s in bfloat16 against 0.13 s in float32, so training there runs in float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def lr_at(progress: float, peak: float) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of training, then cosine decay to 1% of ``peak``."""
    if progress < WARMUP_FRACTION:
        return peak * max(progress / WARMUP_FRACTION, 0.02)
    t = min((progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION), 1.0)
    return peak * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * t)))


class WholeVolumeLoader:
    """Endless batches of preprocessed cases held in memory: a case the size of the patch whole (every
    class in every batch), a larger one (a full-size field of view) as a patch cut at a random place.

    The phantom cases already differ in scale, rotation, position, tumours, scanner and noise, so the
    only augmentations are cheap ones that keep laterality: an in-plane shift of a few voxels (edges
    padded with the border value) and a random intensity scale and offset. Without augmentation (the
    validation loader) a larger case gives its central patch; in training, CLASS_CENTRED_FRACTION of its
    windows are centred (within a quarter patch) on a voxel of a class drawn among those it holds, rarer classes
    more often (RARITY_EXPONENT), and LARGER_CASE_SHARE of the samples come from larger cases.
    """

    def __init__(self, dataset, identifiers, batch_size: int, ds_scales, augment: bool, seed: int,
                 patch_size=None):
        self.cases = []
        self.rng = np.random.default_rng(seed)
        self.class_voxels: list[list[np.ndarray]] = []  # per case: voxel indices (n, 3) of each class it holds
        self.class_odds: list[np.ndarray] = []  # per case: probability of drawing each of those classes
        for key in identifiers:
            data, seg, _, _ = dataset.load_case(key)
            data, seg = np.asarray(data, np.float32), np.asarray(seg).astype(np.int16)
            if patch_size is not None:  # pad what is smaller than the patch; larger cases are cut per sample
                data, seg = _pad_to(data, patch_size, edge=True), _pad_to(seg, patch_size, edge=False)
            self.cases.append((data, np.maximum(seg, 0)))
            larger = patch_size is not None and any(h > n for h, n in zip(seg.shape[1:], patch_size))
            voxels, odds = self._class_voxels(seg[0]) if larger else ([], np.zeros(0))
            self.class_voxels.append(voxels)
            self.class_odds.append(odds)
        self.larger = [i for i, v in enumerate(self.class_voxels) if len(v)]
        self.patch_sized = [i for i, v in enumerate(self.class_voxels) if not len(v)]
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.batch_size, self.ds_scales, self.augment = batch_size, ds_scales, augment

    def _class_voxels(self, seg: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Up to CLASS_VOXELS_KEPT voxel indices of every foreground class of a (z, y, x) label map, and the
        probability of drawing each class (rarer classes more often: RARITY_EXPONENT)."""
        flat = seg.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, int(flat.max(initial=0)) + 2))
        kept, sizes = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                pick = order[lo:hi][self.rng.choice(hi - lo, size=min(CLASS_VOXELS_KEPT, hi - lo), replace=False)]
                kept.append(np.stack(np.unravel_index(pick, seg.shape), axis=1))
                sizes.append(hi - lo)
        odds = np.asarray(sizes, np.float64) ** -RARITY_EXPONENT
        return kept, odds / odds.sum() if len(odds) else odds

    def __iter__(self):
        return self

    def _window(self, data, seg, class_voxels=(), class_odds=None):
        """The patch of a case: where the case is larger than the patch, in training random or centred on a
        voxel of a drawn class (``class_voxels`` drawn with ``class_odds``, CLASS_CENTRED_FRACTION of the
        time), else central."""
        if self.patch_size is None or tuple(data.shape[1:]) == self.patch_size:
            return data, seg
        centre = None
        if self.augment and len(class_voxels) and self.rng.random() < CLASS_CENTRED_FRACTION:
            voxels = class_voxels[int(self.rng.choice(len(class_voxels), p=class_odds))]
            centre = voxels[int(self.rng.integers(len(voxels)))]
        starts = []
        for axis, (have, n) in enumerate(zip(data.shape[1:], self.patch_size)):
            slack = have - n
            if not self.augment:
                starts.append(slack // 2)
            elif centre is None:
                starts.append(int(self.rng.integers(slack + 1)))
            else:
                jitter = int(self.rng.integers(-(n // 4), n // 4 + 1))
                starts.append(int(np.clip(int(centre[axis]) - n // 2 + jitter, 0, slack)))
        box = (slice(None), *(slice(a, a + n) for a, n in zip(starts, self.patch_size)))
        return data[box], seg[box]

    def _sample(self):
        if self.augment and self.larger and self.patch_sized:
            kind = self.larger if self.rng.random() < LARGER_CASE_SHARE else self.patch_sized
            index = kind[int(self.rng.integers(len(kind)))]
        else:
            index = int(self.rng.integers(len(self.cases)))
        data, seg = self._window(*self.cases[index], self.class_voxels[index], self.class_odds[index])
        if not self.augment:
            return data, seg
        dy, dx = (int(v) for v in self.rng.integers(-4, 5, size=2))
        data, seg = _shift(data, dy, dx, edge=True), _shift(seg, dy, dx, edge=False)
        data = data * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-0.1, 0.1)
        return data.astype(np.float32), seg

    def __next__(self) -> dict:
        pairs = [self._sample() for _ in range(self.batch_size)]
        data = torch.from_numpy(np.stack([p[0] for p in pairs]))
        seg = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))
        targets = []
        for scale in self.ds_scales:
            if all(s == 1 for s in scale):
                targets.append(seg)
            else:
                size = [int(round(n * s)) for n, s in zip(seg.shape[2:], scale)]
                targets.append(F.interpolate(seg, size=size, mode="nearest"))
        return {"data": data, "target": targets}


def _shift(a: np.ndarray, dy: int, dx: int, edge: bool) -> np.ndarray:
    """Shift a (c, z, y, x) array in-plane by whole voxels, filling with the edge value or 0."""
    if dy == 0 and dx == 0:
        return a
    pad = ((0, 0), (0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)))
    padded = np.pad(a, pad, mode="edge" if edge else "constant")
    ny, nx = a.shape[2:]
    y0, x0 = max(-dy, 0), max(-dx, 0)
    return padded[:, :, y0:y0 + ny, x0:x0 + nx]


def _pad_to(a: np.ndarray, shape, edge: bool) -> np.ndarray:
    """Pad a (c, z, y, x) array, centred, to at least ``shape`` (z, y, x); larger axes stay as they are."""
    out = a
    for axis, n in enumerate(shape, start=1):
        have = out.shape[axis]
        if have < n:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((n - have) // 2, n - have - (n - have) // 2)
            out = np.pad(out, pad, mode="edge" if edge else "constant")
    return out


class SegRapDemoTrainer(nnUNetTrainer):
    """nnUNetTrainer for the CPU-trained demo: laterality kept (no mirroring, no rotation), whole
    volumes from memory instead of nnU-Net's augmentation workers, AdamW with warm-up + cosine per
    iteration, bfloat16 autocast with channels-last tensors on the CPU (oneDNN), and a stop after
    ``iteration_budget`` iterations or ``time_budget_s`` seconds, whichever comes first."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # explicit parameters: nnU-Net records them by name for its checkpoints
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_val_iterations_per_epoch = 2
        self.save_every = 4
        self.initial_lr = 3e-3
        self.weight_decay = 3e-5
        self.iteration_budget = 1000
        self.time_budget_s = float("inf")
        self.initial_weights: str | None = None  # a checkpoint of the same network to start from (warm start)
        self._iteration = 0
        self._t_start = None

    # ---- schedule -------------------------------------------------------------------------
    def progress(self) -> float:
        """Fraction of the budget used: the larger of iterations and wall time."""
        by_time = (time.time() - self._t_start) / self.time_budget_s if self._t_start else 0.0
        return max(self._iteration / self.iteration_budget, by_time)

    def configure_optimizers(self):
        """AdamW instead of nnU-Net's SGD: a small network trained for a few hundred CPU iterations."""
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No mirroring (it would swap left and right labels) and no rotation; the whole volume is the patch."""
        self.inference_allowed_mirroring_axes = None
        return (0.0, 0.0), False, self.configuration_manager.patch_size, None

    # ---- data -----------------------------------------------------------------------------
    def get_dataloaders(self):
        """Whole-volume in-memory loaders (training: augmented; validation: as is)."""
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        scales = self._get_deep_supervision_scales() or [[1, 1, 1]]
        patch = self.configuration_manager.patch_size
        train = WholeVolumeLoader(dataset_tr, dataset_tr.identifiers, self.batch_size, scales, True, 1, patch)
        val = WholeVolumeLoader(dataset_val, dataset_val.identifiers, 1, scales, False, 2, patch)
        return train, val

    def _weight_cross_entropy(self) -> None:
        """Give rare classes more cross-entropy weight (``class_weights``), from the training cases."""
        n = self.label_manager.num_segmentation_heads
        weights = class_weights((seg for _, seg in self.dataloader_train.cases), n)
        loss = getattr(self.loss, "loss", self.loss)  # under nnU-Net's DeepSupervisionWrapper
        loss.ce.weight = torch.from_numpy(weights).to(self.device)
        self.print_to_log_file(f"cross-entropy class weights: {np.round(weights, 2).tolist()}")

    # ---- steps ----------------------------------------------------------------------------
    def on_train_start(self):
        super().on_train_start()
        if self.initial_weights:
            from .pretrained import load_pretrained

            self.print_to_log_file(load_pretrained(self.network, self.initial_weights).summary())
        self.network.to(memory_format=torch.channels_last_3d)
        self._weight_cross_entropy()
        self._t_start = time.time()

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.progress(), self.initial_lr)

    def _forward(self, batch: dict):
        data = batch["data"].to(self.device).contiguous(memory_format=torch.channels_last_3d)
        target = [t.to(self.device) for t in batch["target"]]
        cpu = self.device.type == "cpu"
        with torch.autocast(self.device.type, dtype=torch.bfloat16 if cpu else torch.float16,
                            enabled=not cpu or cpu_bfloat16_is_fast()):
            output = self.network(data)
        output = [o.float() for o in output] if isinstance(output, (list, tuple)) else output.float()
        return output, target

    def train_step(self, batch: dict) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.progress(), self.initial_lr)
        self.optimizer.zero_grad(set_to_none=True)
        output, target = self._forward(batch)
        loss = self.loss(output, target if self.enable_deep_supervision else target[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        self._iteration += 1
        return {"loss": loss.detach().cpu().numpy()}

    def run_training(self):
        """nnU-Net's epoch loop, ended when the iteration or time budget is spent."""
        self.on_train_start()
        while self.progress() < 1.0 and self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                outputs.append(self.train_step(next(self.dataloader_train)))
                if self.progress() >= 1.0:
                    break
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.print_to_log_file(f"iterations {self._iteration}, progress {self.progress():.3f}, "
                                   f"elapsed {time.time() - self._t_start:.0f} s")
            self.on_epoch_end()
        self.num_epochs = self.current_epoch  # so on_train_end's final checkpoint is the last epoch's
        self.on_train_end()
