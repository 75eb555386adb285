"""Sliding-window prediction that holds class scores only for the slices tiles are still adding to.

nnU-Net's tiles (same positions, Gaussian weights and order as its predictor) are visited in order
of their first slice; once a tile starts at slice z, no later tile touches any slice before z, so
those slices are final: they are normalised, handed on and forgotten. Tiles that miss the region of
interest (the body's box) are skipped; inside the region every voxel gets the same tiles as stock.
Scores and weights accumulate in half precision with nnU-Net's operations in nnU-Net's order, so a
single fold's scores are bit-identical to stock's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

Slicer = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Region:
    """A box in network voxels: start inclusive, stop exclusive, per axis."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def overlaps(self, tile: Slicer) -> bool:
        return all(s.start < b and s.stop > a for s, a, b in zip(tile, self.start, self.stop))


def tile_slicers(shape, patch, step: float) -> list[Slicer]:
    """nnU-Net's sliding-window tiles for an image of ``shape`` (at least the patch size), in its order."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(tuple(shape), tuple(patch), step)
    return [(slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
            for z in steps[0] for y in steps[1] for x in steps[2]]


def stream_scores(evaluate: Callable, data, tiles: list[Slicer], region: Region, gaussian, num_classes: int,
                  store_device, progress: Callable[[int, int], None] | None = None,
                  stats: dict | None = None) -> Iterator[tuple[int, "object"]]:
    """Yield ``(z, scores)`` for every slice z of ``region`` in order; scores: (C, region y, region x) float16,
    valid until the next slice is asked for (its buffer is then reused: copy what is kept longer).

    ``evaluate(tile)`` returns the tile's class scores (1, C, *patch) on any device, a tensor of its own
    (it is weighted in place); ``data`` is the preprocessed image (channels, z, y, x) as a torch tensor.
    ``stats`` (optional) receives the most slices held at once (``held_slices``), which tests use to
    show that the whole volume never is.
    """
    import torch

    todo = sorted((t for t in tiles if region.overlaps(t)), key=lambda t: t[0].start)
    (z0, y0, x0), (z1, y1, x1) = region.start, region.stop
    plane = (y1 - y0, x1 - x0)
    pending: dict[int, tuple] = {}
    # a finished slice's buffers are reused for a later slice (zeroed), so the accumulators are made
    # once rather than freed and made again between tiles, which fragments the heap around them
    spare: list[tuple] = []
    gaussian_here = gaussian.to(store_device)
    following = z0

    def finish(z):
        scores, weights = pending.pop(z)
        torch.div(scores, weights, out=scores)
        yield z, scores
        spare.append((scores, weights))  # the caller is done with it: it asked for the next slice

    def start():
        if spare:
            scores, weights = spare.pop()
            return scores.zero_(), weights.zero_()
        return (torch.zeros((num_classes, *plane), dtype=torch.half, device=store_device),
                torch.zeros(plane, dtype=torch.half, device=store_device))

    for n, tile in enumerate(todo):
        while following < min(tile[0].start, z1):
            yield from finish(following)
            following += 1
        x = data[(slice(None), *tile)][None]
        prediction = evaluate(x)[0].to(store_device)  # C, pz, py, px
        lo = [max(s.start, a) for s, a in zip(tile, region.start)]
        hi = [min(s.stop, b) for s, b in zip(tile, region.stop)]
        inner = tuple(slice(a - s.start, b - s.start) for s, a, b in zip(tile, lo, hi))
        weights = gaussian_here[inner]
        # weighted in place (the prediction is this tile's own): the same float32 products as stock's
        # ``prediction *= gaussian`` without a second tile-sized buffer
        part = prediction[(slice(None), *inner)].mul_(weights)
        target = (slice(lo[1] - y0, hi[1] - y0), slice(lo[2] - x0, hi[2] - x0))
        for k, z in enumerate(range(lo[0], hi[0])):
            if z not in pending:
                pending[z] = start()
            scores, total = pending[z]
            scores[(slice(None), *target)] += part[:, k]
            total[target] += weights[k]
        del prediction, part  # before the next tile's forward pass, not after it (95 MB for Task 1 on the CPU)
        if stats is not None:
            stats["held_slices"] = max(stats.get("held_slices", 0), len(pending))
        if progress is not None:
            progress(n + 1, len(todo))
    while following < z1:
        yield from finish(following)
        following += 1
