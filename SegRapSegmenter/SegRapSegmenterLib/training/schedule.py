"""The DKFZ fine-tuning schedule: heads-only warm-up, whole-network warm-up, then nnU-Net's poly decay.

Epochs are counted from 0 as nnU-Net does (``trainer.current_epoch``). With the defaults and
1000 epochs: epochs 0-9 train only the segmentation heads, the learning rate rising linearly to
1e-3 (1e-4 at epoch 0, 1e-3 at epoch 9); epochs 10-59 train the whole network, rising linearly
to 1e-2 (2e-4 at epoch 10, 1e-2 at epoch 59); epochs 60-999 follow nnU-Net's poly decay
``1e-2 * (1 - (e - 60) / 940) ** 0.9`` (1e-2 at epoch 60). The rises follow nnU-Net's own linear
warm-up (``peak * (k + 1) / n`` at the k-th epoch of a stage), so no epoch runs at a rate of 0.
The learning rate is a pure function of the epoch, so a resumed run continues the schedule exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

STAGES = ("heads", "warmup", "poly")


@dataclass(frozen=True)
class StagedSchedule:
    """Stage lengths and peak rates of the staged fine-tuning."""

    num_epochs: int = 1000
    heads_epochs: int = 10
    heads_peak_lr: float = 1e-3
    warmup_epochs: int = 50
    peak_lr: float = 1e-2
    exponent: float = 0.9

    def __post_init__(self):
        if self.heads_epochs < 0 or self.warmup_epochs < 0:
            raise InputError(f"Stage lengths must be >= 0, got heads {self.heads_epochs}, "
                             f"warm-up {self.warmup_epochs}.")
        if self.num_epochs <= self.poly_start:
            raise InputError(f"{self.num_epochs} epochs leave none for the poly stage after {self.heads_epochs} "
                             f"heads-only and {self.warmup_epochs} warm-up epochs; train for more epochs.")

    @property
    def poly_start(self) -> int:
        """First epoch of the poly decay."""
        return self.heads_epochs + self.warmup_epochs

    def stage(self, epoch: int) -> str:
        """'heads', 'warmup' or 'poly' for an epoch (0-based)."""
        self._check(epoch)
        if epoch < self.heads_epochs:
            return "heads"
        return "warmup" if epoch < self.poly_start else "poly"

    def lr(self, epoch: int) -> float:
        """Learning rate of an epoch (0-based)."""
        stage = self.stage(epoch)
        if stage == "heads":
            return self.heads_peak_lr * (epoch + 1) / self.heads_epochs
        if stage == "warmup":
            return self.peak_lr * (epoch - self.heads_epochs + 1) / self.warmup_epochs
        done = (epoch - self.poly_start) / (self.num_epochs - self.poly_start)
        return self.peak_lr * (1 - done) ** self.exponent

    def _check(self, epoch: int) -> None:
        if not 0 <= epoch < self.num_epochs:
            raise InputError(f"Epoch {epoch} is outside the schedule's 0..{self.num_epochs - 1}.")


class StagedLRScheduler:
    """Sets an optimizer's rates from a schedule: group 0 (the heads) always, the others from the warm-up on.

    nnU-Net calls ``step(current_epoch)`` at the start of each epoch. ``schedule`` is a callable
    returning the current ``StagedSchedule``, so changes to the trainer's epoch counts apply.
    """

    def __init__(self, optimizer, schedule):
        self.optimizer = optimizer
        self.schedule = schedule
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def step(self, current_step: int | None = None) -> None:
        schedule = self.schedule()
        epoch = 0 if current_step is None or current_step < 0 else int(current_step)
        lr = schedule.lr(epoch)
        body_lr = 0.0 if schedule.stage(epoch) == "heads" else lr
        for k, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr if k == 0 else body_lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr
