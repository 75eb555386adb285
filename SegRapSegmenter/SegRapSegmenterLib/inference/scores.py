"""Class scores on the network's grid to labels on the input grid, one slice at a time, as stock nnU-Net labels them.

Stock nnU-Net resamples the scores of every class for the whole volume to the input grid (each class
interpolated in float64 and stored as float16) and then takes the arg-max: for Task 1 on a 512 x 512
CT that is 55 full-size volumes. Here the labels of one output slice come from the few network slices
it is interpolated from. Where every network voxel an output voxel is interpolated from has the same
arg-max class, that class wins (a weighted mean keeps the order of two classes that holds at each of
its corners), so only voxels near a label boundary are interpolated, for all classes, with nnU-Net's
sample positions, weights and float16 rounding; the labels equal stock's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS_PER_CHUNK = 1 << 16  # boundary voxels interpolated together (C x chunk float64 in memory)


@dataclass(frozen=True)
class AxisMap:
    """For each output index along one axis: the two input indices it is interpolated from, and hi's weight."""

    lo: np.ndarray
    hi: np.ndarray
    weight: np.ndarray

    @property
    def linear(self) -> bool:
        return bool(np.any(self.weight > 0))

    def part(self, start: int, stop: int) -> "AxisMap":
        return AxisMap(self.lo[start:stop], self.hi[start:stop], self.weight[start:stop])

    def shifted(self, offset: int) -> "AxisMap":
        return AxisMap(self.lo - offset, self.hi - offset, self.weight)


def axis_map(n_in: int, n_out: int, order: int) -> AxisMap:
    """Sample positions of scipy's ``zoom(grid_mode=True)``/``map_coordinates`` as nnU-Net calls them (edges clamped)."""
    out = np.arange(n_out)
    if n_in == n_out:
        return AxisMap(out, out, np.zeros(n_out))
    source = (out + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        # scipy rounds half away from zero; negative positions are clamped to the edge anyway
        nearest = np.clip(np.floor(source + 0.5), 0, n_in - 1).astype(np.int64)
        return AxisMap(nearest, nearest, np.zeros(n_out))
    source = np.clip(source, 0, n_in - 1)
    lo = np.floor(source).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return AxisMap(lo, hi, source - lo)


def axis_orders(configuration, network_spacing, input_spacing) -> tuple[int, int, int] | None:
    """Interpolation order per axis that nnU-Net's default score resampling uses, or None for other functions.

    ``configuration`` is nnU-Net's ConfigurationManager; spacings are in its (transposed) axis order.
    """
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

    if configuration.configuration.get("resampling_fn_probabilities") != "resample_data_or_seg_to_shape":
        return None
    kwargs = dict(configuration.configuration.get("resampling_fn_probabilities_kwargs") or {})
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    if kwargs.get("is_seg") or order > 1 or order_z > 1:
        return None
    separate, axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), network_spacing,
                                                 input_spacing,
                                                 kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD))
    orders = [order] * 3
    if separate:
        orders[axis] = order_z
    return tuple(orders)


def _corners(m: AxisMap) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices, weights) of the one or two input samples along an axis."""
    if not m.linear:
        return [(m.lo, np.ones(len(m.lo)))]
    return [(m.lo, 1.0 - m.weight), (m.hi, m.weight)]


class SliceLabeler:
    """Labels of output slices (along axis 0) from network score slices that arrive in order along axis 0.

    ``maps`` give, per axis, the output box's sample positions in network coordinates relative to the
    first network voxel the caller holds (the region's start). Each network slice comes with its
    scores (C, y, x; float16) and their arg-max labels (y, x); a slice is dropped once no later output
    slice needs it.
    """

    def __init__(self, maps: tuple[AxisMap, AxisMap, AxisMap]):
        self.maps = maps
        self._window: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._next = 0
        self._y, self._x = _corners(maps[1]), _corners(maps[2])
        self.interpolated = 0  # voxels that needed every class interpolated (near label boundaries)

    def add(self, z: int, scores: np.ndarray, labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Take network slice ``z``; return the output slices (index, labels) it completes."""
        self._window[z] = (scores, labels)
        done = []
        mz = self.maps[0]
        while self._next < len(mz.lo) and mz.hi[self._next] <= z:
            done.append((self._next, self._labels(self._next)))
            self._next += 1
        if self._next < len(mz.lo):
            for old in [k for k in self._window if k < mz.lo[self._next]]:
                del self._window[old]
        return done

    @property
    def complete(self) -> bool:
        return self._next == len(self.maps[0].lo)

    def _labels(self, j: int) -> np.ndarray:
        mz = self.maps[0]
        zs = [(int(mz.lo[j]), 1.0 - float(mz.weight[j]))]
        if mz.weight[j] > 0 and mz.hi[j] != mz.lo[j]:
            zs.append((int(mz.hi[j]), float(mz.weight[j])))
        corners = []  # rows first, then columns: the same gathers as np.ix_, a quarter of its time
        for z, _ in zs:
            labels = self._window[z][1]
            for ya, _ in self._y:
                rows = labels.take(ya, axis=0)
                corners.extend(rows.take(xa, axis=1) for xa, _ in self._x)
        out = corners[0].copy()
        mixed = np.zeros(out.shape, bool)
        for other in corners[1:]:
            mixed |= other != out
        if mixed.any():
            yy, xx = np.nonzero(mixed)
            self.interpolated += len(yy)
            for a in range(0, len(yy), POINTS_PER_CHUNK):
                y, x = yy[a:a + POINTS_PER_CHUNK], xx[a:a + POINTS_PER_CHUNK]
                out[y, x] = self._interpolated_argmax(zs, y, x)
        return out

    def _interpolated_argmax(self, zs, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        total = None
        for z, wz in zs:
            scores = self._window[z][0]
            for ya, wy in self._y:
                for xa, wx in self._x:
                    weight = wz * wy[y] * wx[x]
                    term = scores[:, ya[y], xa[x]].astype(np.float64)
                    term *= weight  # in place: the same products and sums, without a temporary each
                    if total is None:
                        total = term
                    else:
                        total += term
        # nnU-Net stores the resampled scores as float16 before its arg-max; ties go to the lower class
        return np.argmax(total.astype(np.float16), axis=0).astype(np.uint8)
