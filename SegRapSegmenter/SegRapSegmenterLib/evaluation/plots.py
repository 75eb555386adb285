"""The evaluation's figures: a box plot of DSC and NSD per structure, and per case a montage of its worst structures.

Drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no display), returned
as PNG bytes for the caller to write atomically. Slices are shown in index order (row = y,
column = x) with physical aspect; for the usual LPS-stored CT that is the radiological view.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..anatomy import structures as S
from ..arrays import Crop

REFERENCE_COLOR, PREDICTION_COLOR = "#39e639", "#ff33cc"
_CT_WINDOW = (-160.0, 240.0)  # soft-tissue window (level 40, width 400 HU)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


@dataclass(frozen=True)
class MontageRow:
    """One structure of a case's montage: its masks (cropped, made full-size only while drawn) and scores."""

    structure: str
    reference: Crop
    prediction: Crop
    dsc: float
    nsd: float


def boxplot_png(values: Mapping[str, Mapping[str, Sequence[float]]], case_count: int) -> bytes:
    """Two panels, DSC above NSD, one box per structure over the cases (``values[name]["dsc"|"nsd"]``)."""
    names = list(values)
    fig = Figure(figsize=(max(8.0, 0.26 * len(names) + 2.5), 7.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, metric, label in ((axes[0], "dsc", "DSC"), (axes[1], "nsd", "NSD (structure's tolerance)")):
        data = [list(values[n][metric]) for n in names]
        parts = ax.boxplot(data, patch_artist=True, widths=0.6, flierprops={"markersize": 3})
        for patch, name in zip(parts["boxes"], names):
            patch.set_facecolor(np.array(S.get(name).color) / 255.0)
            patch.set_alpha(0.85)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=7)
    fig.suptitle(f"SegRap metrics per structure ({case_count} case(s))")
    return _png(fig)


def _slices_to_show(ref: np.ndarray, pred: np.ndarray, count: int = 3) -> list[int]:
    """The axial slice with the largest disagreement, then slices spread over the structure's extent."""
    union = ref | pred
    zs = np.flatnonzero(union.any(axis=(1, 2)))
    if zs.size == 0:
        return []
    disagreement = (ref ^ pred).sum(axis=(1, 2))
    first = int(np.argmax(disagreement)) if disagreement.any() else int(zs[len(zs) // 2])
    chosen = [first]
    for q in (0.2, 0.8, 0.5):
        z = int(zs[min(len(zs) - 1, int(round(q * (len(zs) - 1))))])
        if z not in chosen:
            chosen.append(z)
        if len(chosen) == count:
            break
    return sorted(chosen)


def _window(box_lo: int, box_hi: int, size: int, margin: int, minimum: int) -> slice:
    lo, hi = box_lo - margin, box_hi + margin
    if hi - lo < minimum:
        grow = minimum - (hi - lo)
        lo, hi = lo - grow // 2, hi + grow - grow // 2
    return slice(max(0, lo), min(size, hi))


def _draw_slice(ax, background: np.ndarray | None, ref: np.ndarray, pred: np.ndarray, z: int,
                rows: slice, cols: slice, spacing: tuple[float, float, float]) -> None:
    sy, sx = spacing[1], spacing[2]
    r, p = ref[z, rows, cols], pred[z, rows, cols]
    h, w = r.shape
    extent = (-0.5 * sx, (w - 0.5) * sx, (h - 0.5) * sy, -0.5 * sy)
    if background is not None:
        ax.imshow(background[z, rows, cols], cmap="gray", vmin=_CT_WINDOW[0], vmax=_CT_WINDOW[1],
                  extent=extent, interpolation="nearest")
    else:
        ax.imshow((r | p).astype(float) * 0.25, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    xs, ys = np.arange(w) * sx, np.arange(h) * sy
    for mask, color, style in ((r, REFERENCE_COLOR, "solid"), (p, PREDICTION_COLOR, "dashed")):
        if mask.any() and not mask.all():
            ax.contour(xs, ys, mask.astype(float), levels=[0.5], colors=[color], linewidths=1.4, linestyles=style)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"z = {z}", fontsize=8)


def montage_png(case_id: str, rows: Sequence[MontageRow], background: np.ndarray | None,
                spacing: tuple[float, float, float]) -> bytes:
    """Axial slices of the given structures of one case, reference and prediction contoured."""
    columns = 3
    fig = Figure(figsize=(3.0 * columns + 0.4, 3.1 * max(1, len(rows)) + 0.6), layout="constrained")
    if not rows:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "Every structure is empty in both reference and prediction.", ha="center")
        ax.set_axis_off()
        return _png(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for row_axes, row in zip(axes, rows):
        ref_mask = row.reference.full()
        pred_mask = row.prediction.full()
        union = ref_mask | pred_mask
        ys = np.flatnonzero(union.any(axis=(0, 2)))
        xs = np.flatnonzero(union.any(axis=(0, 1)))
        rows_sl = _window(int(ys[0]), int(ys[-1]) + 1, union.shape[1], 10, 40)
        cols_sl = _window(int(xs[0]), int(xs[-1]) + 1, union.shape[2], 10, 40)
        slices = _slices_to_show(ref_mask, pred_mask, columns)
        for k, ax in enumerate(row_axes):
            if k < len(slices):
                _draw_slice(ax, background, ref_mask, pred_mask, slices[k], rows_sl, cols_sl, spacing)
            else:
                ax.set_axis_off()
        row_axes[0].set_ylabel(f"{row.structure}\nDSC {row.dsc:.3f}  NSD {row.nsd:.3f}", fontsize=9)
        del ref_mask, pred_mask, union
    fig.suptitle(f"{case_id}: worst structures (reference green, prediction magenta dashed)", fontsize=10)
    return _png(fig)
