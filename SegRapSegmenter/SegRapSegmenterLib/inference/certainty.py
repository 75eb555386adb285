"""How sure the network was of each structure, tallied from the class scores while they are in memory.

For every network slice the sliding window finishes, the class probabilities (softmax of the mean
scores) of the voxels that any foreground class could claim are summed per winning class into a
C x C table: ``table[w, c]`` = the probability mass of class ``c`` over the voxels won by ``w``. From
it, per structure (a set of classes: an OAR is covered by several of the 54 classes), the expected
Dice between the drawn contour and the network's own probabilities:
``2 * mass inside the contour / (voxels of the contour + mass anywhere)``. It is 1 when every voxel
is certain, and falls with uncertain voxels inside the contour and probability mass outside it (a
blurred border, a second candidate region). Voxels whose every foreground class is below
``1e-4`` of the background's odds are skipped (far background: their mass is negligible and they
are most of the volume).
"""

from __future__ import annotations

import numpy as np

from ..anatomy import structures as S

FAR_BACKGROUND_LOGIT_GAP = 9.0  # exp(-9) ~ 1e-4: a foreground class that far below background is ignored


class ClassTally:
    """The C x C probability table of one task's sliding window (see the module docstring)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._table = None

    @staticmethod
    def labels(scores):
        """The arg-max labels of a slice's scores (C, y, x), and each voxel's best foreground score, in one pass.

        The same labels as ``scores.argmax(0)``: background wins a tie with a foreground class, and among
        tied foreground classes the first (torch.max over a dimension returns the first maximal index).
        """
        import torch

        best = scores[1:].max(0)
        won = torch.where(scores[0] >= best.values, 0, best.indices + 1)
        return won, best.values

    def add(self, scores, won, foreground_best) -> None:
        """Add one network slice: its mean class scores (C, y, x), arg-max labels and best foreground scores."""
        import torch

        c = self.num_classes
        flat = scores.reshape(c, -1)
        won = won.reshape(-1)
        keep = (won != 0) | (foreground_best.reshape(-1) - flat[0] > -FAR_BACKGROUND_LOGIT_GAP)
        index = keep.nonzero().squeeze(1)
        if self._table is None:
            self._table = torch.zeros((c, c), dtype=torch.float64, device=flat.device)
        if index.numel() == 0:
            return
        probabilities = torch.softmax(flat[:, index].float(), dim=0)  # C x n
        part = torch.zeros((c, c), dtype=torch.float32, device=flat.device)
        part.index_add_(0, won[index], probabilities.T)
        self._table += part  # per slice in float32, over the volume in float64

    def table(self) -> np.ndarray | None:
        """The table as a NumPy array (None when no slice was added)."""
        return None if self._table is None else self._table.cpu().numpy()


def _classes_of(task: str) -> dict[str, list[int]]:
    if task == "oar":
        return {name: list(labels) for name, labels in S.OAR_CLASSES.items()}
    return {s.name: [s.label] for s in S.GTVS}


def expected_dice(task: str, table: np.ndarray) -> dict[str, float]:
    """Per structure of ``task``: the expected Dice of its contour against the network's probabilities."""
    out = {}
    for name, classes in _classes_of(task).items():
        inside = float(table[np.ix_(classes, classes)].sum())
        drawn = float(table[classes, :].sum())
        mass = float(table[:, classes].sum())
        out[name] = round(2.0 * inside / (drawn + mass), 4) if drawn + mass > 0 else 0.0
    return out
