"""Masks <-> closed planar contours on a voxel grid, vectorised with NumPy (no DICOM here).

``trace`` draws, on every slice, the 0.5 iso-line of the binary mask with marching squares: each
vertex lies on the midpoint of a voxel edge between an inside and an outside voxel centre, so
every voxel centre is at least 0.35 voxel away from the line and a reader that fills the voxels
whose centre lies inside (even-odd) gets the mask back exactly, down to a single voxel. Saddle
cells are cut around the inside corners (the foreground is 4-connected), so diagonal neighbours
become separate contours and no contour touches or crosses another one or itself. Each
4-connected region of a slice gives one outer contour, each hole one more contour inside it: a
reader must combine the contours of a slice with the even-odd rule (``fill`` does).
Collinear vertices are dropped. ``keyhole`` joins each hole to its outline by a zero-width channel
(DICOM PS3.3 C.8.8.6.3), so that readers which union a slice's contours read the same voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Corner bits of a marching-squares cell at (y, x): a = (y, x), b = (y, x+1), c = (y+1, x+1), d = (y+1, x).
_A, _B, _C, _D = 1, 2, 4, 8
# Cell edges: T between a-b, R between b-c, B between d-c, L between a-d.
_T, _R, _BOT, _L = 0, 1, 2, 3
# Edge midpoints relative to the cell's corner a, (dy, dx).
_EDGE_POINT = np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 0.5], [0.5, 0.0]])
_CORNER_POINT = {_A: (0.0, 0.0), _B: (0.0, 1.0), _C: (1.0, 1.0), _D: (1.0, 0.0)}
_EDGE_CORNERS = {_T: (_A, _B), _R: (_B, _C), _BOT: (_D, _C), _L: (_A, _D)}


def _segment_table() -> np.ndarray:
    """(16, 2, 2) from-edge/to-edge of up to two segments per cell case, -1 where absent.

    Segments keep the inside on their left (image rows downwards), so every edge midpoint starts
    exactly one segment and ends exactly one: the segments link into closed loops.
    """
    table = np.full((16, 2, 2), -1, dtype=np.int64)
    for case in range(1, 15):
        inside = [bit for bit in (_A, _B, _C, _D) if case & bit]
        if case in (_A | _C, _B | _D):  # saddle: cut off each inside corner on its own
            pairs = [[e for e, corners in _EDGE_CORNERS.items() if bit in corners] for bit in inside]
            groups = [(pair, [bit]) for pair, bit in zip(pairs, inside)]
        else:
            crossing = [e for e, (p, q) in _EDGE_CORNERS.items() if bool(case & p) != bool(case & q)]
            groups = [(crossing, inside)]
        for k, (edges, corners) in enumerate(groups):
            e1, e2 = edges
            start, end = _EDGE_POINT[e1], _EDGE_POINT[e2]
            centre = np.mean([_CORNER_POINT[c] for c in corners], axis=0)
            v, w = end - start, centre - start  # (dy, dx)
            cross = v[1] * w[0] - v[0] * w[1]  # < 0: the inside lies on the left with y pointing down
            table[case, k] = (e1, e2) if cross < 0 else (e2, e1)
    return table


_TABLE = _segment_table()


@dataclass(frozen=True)
class Contours:
    """Closed contours in voxel index coordinates: contour k is ``points[offsets[k]:offsets[k+1]]``.

    ``points`` holds (y, x) per vertex (not repeated at the end); ``slices[k]`` is the z index.
    """

    slices: np.ndarray  # (n,) int
    offsets: np.ndarray  # (n + 1,) int
    points: np.ndarray  # (m, 2) float64, y, x

    def __len__(self) -> int:
        return len(self.slices)

    def contour(self, k: int) -> np.ndarray:
        """Vertices (y, x) of contour ``k``."""
        return self.points[self.offsets[k]:self.offsets[k + 1]]

    @classmethod
    def empty(cls) -> "Contours":
        return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 2)))

    def shifted(self, z: int, y: float, x: float) -> "Contours":
        """The same contours with the index origin moved by (z, y, x), e.g. from a crop to the full grid."""
        return Contours(self.slices + int(z), self.offsets, self.points + np.array([y, x], dtype=float))


def _edge_ids(z: np.ndarray, y: np.ndarray, x: np.ndarray, edge: np.ndarray, h: int, w: int) -> np.ndarray:
    """A unique id per voxel edge: horizontal edges (T/B) and vertical edges (L/R) of the padded grid."""
    yy = y + (edge == _BOT)
    xx = x + (edge == _R)
    vertical = (edge == _L) | (edge == _R)
    return ((z * h + yy) * w + xx) * 2 + vertical


def _cycle_order(nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leader (smallest member) of each element's cycle and the order that walks every cycle from its leader."""
    n = len(nxt)
    leader = np.arange(n)
    jump = nxt.copy()
    while True:  # pointer jumping: after k rounds leader = min over the next 2**k elements
        new = np.minimum(leader, leader[jump])
        jump = jump[jump]
        if np.array_equal(new, leader):
            break
        leader = new
    # list ranking on the cycles cut before their leader: distance to the cycle's last element
    succ = np.where(leader[nxt] == nxt, -1, nxt)  # the element whose successor is the leader ends the walk
    dist = (succ >= 0).astype(np.int64)
    ptr = succ
    while True:
        active = np.flatnonzero(ptr >= 0)
        if active.size == 0:
            break
        target = ptr[active]
        new_dist = dist.copy()
        new_dist[active] += dist[target]
        new_ptr = ptr.copy()
        new_ptr[active] = ptr[target]
        dist, ptr = new_dist, new_ptr
    order = np.lexsort((-dist, leader))
    return leader, order


def trace(mask: np.ndarray) -> Contours:
    """The closed contours of every slice of a (z, y, x) mask, slices in increasing z.

    Vertices are in index coordinates of ``mask``; a vertex lies on a voxel edge midpoint, so it
    has one integer and one half-integer coordinate (before collinear vertices are merged away).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"trace needs a (z, y, x) mask, got shape {mask.shape}")
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return Contours.empty()
    slab = mask[zs[0]:zs[-1] + 1]
    rows = slab.any(axis=2)  # (z, y)
    ys = np.flatnonzero(rows.any(axis=0))
    xs = np.flatnonzero(slab[:, ys[0]:ys[-1] + 1].any(axis=1).any(axis=0))
    z0, y0, x0 = int(zs[0]), int(ys[0]), int(xs[0])
    crop = slab[:, y0:ys[-1] + 1, x0:xs[-1] + 1]
    nz, ny, nx = crop.shape
    padded = np.zeros((nz, ny + 2, nx + 2), dtype=np.uint8)
    padded[:, 1:-1, 1:-1] = crop
    h, w = ny + 2, nx + 2
    case = (padded[:, :-1, :-1] | padded[:, :-1, 1:] << 1 | padded[:, 1:, 1:] << 2 | padded[:, 1:, :-1] << 3)
    cz, cy, cx = np.nonzero((case != 0) & (case != 15))
    cell_case = case[cz, cy, cx]
    saddle = (cell_case == (_A | _C)) | (cell_case == (_B | _D))
    # first segment of every boundary cell, then the second segment of the saddle cells
    sz = np.concatenate([cz, cz[saddle]])
    sy = np.concatenate([cy, cy[saddle]])
    sx = np.concatenate([cx, cx[saddle]])
    seg = np.concatenate([_TABLE[cell_case, 0], _TABLE[cell_case[saddle], 1]])
    start_edge, end_edge = seg[:, 0], seg[:, 1]
    start_id = _edge_ids(sz, sy, sx, start_edge, h, w)
    end_id = _edge_ids(sz, sy, sx, end_edge, h, w)
    by_start = np.argsort(start_id, kind="stable")
    pos = np.searchsorted(start_id[by_start], end_id)
    nxt = by_start[np.minimum(pos, len(pos) - 1)]
    if not np.array_equal(start_id[nxt], end_id):  # cannot happen for a padded binary mask
        raise AssertionError("marching-squares segments do not close into loops")

    leader, order = _cycle_order(nxt)
    start = _EDGE_POINT[start_edge] + np.stack([sy, sx], axis=1)  # padded (y, x)
    step = _EDGE_POINT[end_edge] - _EDGE_POINT[start_edge]
    direction = np.rint(step[:, 0] * 2).astype(np.int64) * 5 + np.rint(step[:, 1] * 2).astype(np.int64)
    prev = np.empty_like(nxt)
    prev[nxt] = np.arange(len(nxt))
    keep = direction[prev] != direction  # a vertex where the walk turns

    walk = order[keep[order]]
    walk_leader = leader[walk]
    first = np.flatnonzero(np.r_[True, walk_leader[1:] != walk_leader[:-1]])
    offsets = np.r_[first, len(walk)].astype(np.int64)
    points = start[walk] + np.array([y0 - 1.0, x0 - 1.0])
    slices = sz[walk[first]].astype(np.int64) + z0
    return Contours(slices, offsets, points)


def fill(contours: Contours, shape: tuple[int, int, int]) -> np.ndarray:
    """The (z, y, x) mask of the voxels whose centre lies inside the contours (even-odd rule per slice)."""
    out = np.zeros(shape, dtype=bool)
    nz, ny, nx = shape
    if len(contours) == 0:
        return out
    pts = contours.points
    counts = np.diff(contours.offsets)
    nxt = np.arange(len(pts)) + 1
    nxt[contours.offsets[1:] - 1] = contours.offsets[:-1]  # close each contour
    zc = np.repeat(contours.slices, counts)
    ya, xa = pts[:, 0], pts[:, 1]
    yb, xb = pts[nxt, 0], pts[nxt, 1]
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    first_row = np.ceil(lo).astype(np.int64)
    rows = np.ceil(hi).astype(np.int64) - first_row  # rows j with lo <= j < hi (half-open: vertices count once)
    rows = np.maximum(rows, 0)
    edge = np.repeat(np.arange(len(pts)), rows)
    if edge.size == 0:
        return out
    j = first_row[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(rows) - rows, rows))
    t = (j - ya[edge]) / (yb[edge] - ya[edge])
    xcross = xa[edge] + t * (xb[edge] - xa[edge])
    z = zc[edge]
    order = np.lexsort((xcross, j, z))
    z, j, xcross = z[order], j[order], xcross[order]
    z, j = z[0::2], j[0::2]
    left, right = xcross[0::2], xcross[1::2]
    c0 = np.floor(left).astype(np.int64) + 1  # first centre strictly right of the left crossing
    c1 = np.ceil(right).astype(np.int64) - 1  # last centre strictly left of the right crossing
    c0 = np.maximum(c0, 0)
    c1 = np.minimum(c1, nx - 1)
    ok = (c0 <= c1) & (z >= 0) & (z < nz) & (j >= 0) & (j < ny)
    z, j, c0, c1 = z[ok], j[ok], c0[ok], c1[ok]
    if z.size == 0:
        return out
    # spans of one row never overlap (even-odd pairs of sorted crossings): +1 at c0, -1 after c1
    rows_used, row = np.unique(z * ny + j, return_inverse=True)
    width = nx + 1
    size = len(rows_used) * width
    diff = np.bincount(row * width + c0, minlength=size) - np.bincount(row * width + c1 + 1, minlength=size)
    inside = np.cumsum(diff.reshape(len(rows_used), width), axis=1)[:, :nx] > 0
    out.reshape(nz * ny, nx)[rows_used] = inside
    return out


# --------------------------------------------------------------------------------------------
# Keyhole: holes joined to their outline
# --------------------------------------------------------------------------------------------

_EPS = 1e-9
_CENTRE_CLEARANCE = 0.05  # voxel: a channel keeps this far from every voxel centre


def _inside(point: np.ndarray, poly: np.ndarray) -> bool:
    """Even-odd test of one (y, x) point against a closed polygon."""
    a, b = poly, np.roll(poly, -1, axis=0)
    y, x = point
    crosses = (a[:, 0] > y) != (b[:, 0] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = a[:, 1] + (y - a[:, 0]) * (b[:, 1] - a[:, 1]) / (b[:, 0] - a[:, 0])
    return bool(np.count_nonzero(crosses & (xc > x)) % 2)


def signed_areas(contours: Contours) -> np.ndarray:
    """Signed area (voxels) of each contour: positive for an outline, negative for a hole (``trace``'s winding)."""
    if len(contours) == 0:
        return np.zeros(0)
    pts = contours.points
    nxt = np.arange(len(pts)) + 1
    nxt[contours.offsets[1:] - 1] = contours.offsets[:-1]
    cross = pts[:, 0] * pts[nxt, 1] - pts[nxt, 0] * pts[:, 1]
    return np.add.reduceat(cross, contours.offsets[:-1]) / 2.0


def _clear_of_centres(p: np.ndarray, q: np.ndarray) -> bool:
    """True when the segment p-q passes no voxel centre (integer y, x) closer than the clearance."""
    d = q - p
    for axis in (0, 1):
        other = 1 - axis
        if abs(d[axis]) < _EPS:
            if abs(p[axis] - round(p[axis])) < _CENTRE_CLEARANCE:  # runs along a line of centres
                lo, hi = sorted((p[other], q[other]))
                if np.floor(hi + _CENTRE_CLEARANCE) >= np.ceil(lo - _CENTRE_CLEARANCE):
                    return False
            continue
        lo, hi = sorted((p[axis], q[axis]))
        grid = np.arange(np.ceil(lo), np.floor(hi) + 1)
        if grid.size:
            t = (grid - p[axis]) / d[axis]
            at = p[other] + t * d[other]
            if np.any(np.abs(at - np.round(at)) < _CENTRE_CLEARANCE):
                return False
    return True


def _orient(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Twice the signed area of the triangles u, v, w ((y, x) points, broadcast)."""
    return (v[..., 0] - u[..., 0]) * (w[..., 1] - u[..., 1]) - (v[..., 1] - u[..., 1]) * (w[..., 0] - u[..., 0])


def _on_segment(u: np.ndarray, v: np.ndarray, w: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """Whether w lies on the segment u-v, given the orientation of u, v, w."""
    tol = 1e-7
    return ((np.abs(orient) < tol) & (np.minimum(u[..., 0], v[..., 0]) - tol <= w[..., 0])
            & (w[..., 0] <= np.maximum(u[..., 0], v[..., 0]) + tol)
            & (np.minimum(u[..., 1], v[..., 1]) - tol <= w[..., 1])
            & (w[..., 1] <= np.maximum(u[..., 1], v[..., 1]) + tol))


def _touches(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the segment p-q crosses or touches any edge a-b, leaving out the edges that end at p or q."""
    ends = (np.all(np.abs(a - p) < _EPS, axis=1) | np.all(np.abs(b - p) < _EPS, axis=1)
            | np.all(np.abs(a - q) < _EPS, axis=1) | np.all(np.abs(b - q) < _EPS, axis=1))
    a, b = a[~ends], b[~ends]
    o1, o2, o3, o4 = _orient(p, q, a), _orient(p, q, b), _orient(a, b, p), _orient(a, b, q)
    proper = (o1 * o2 < -_EPS) & (o3 * o4 < -_EPS)
    touch = (_on_segment(p, q, a, o1) | _on_segment(p, q, b, o2) | _on_segment(a, b, p, o3)
             | _on_segment(a, b, q, o4))
    return bool(np.any(proper | touch))


def _edges(polys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a = np.concatenate(polys)
    b = np.concatenate([np.roll(p, -1, axis=0) for p in polys])
    return a, b


def _splice(outer: np.ndarray, o: int, hole: np.ndarray, h: int) -> np.ndarray:
    """outer[..o], hole from h all the way round back to h, then back to outer[o] and on."""
    return np.concatenate([outer[:o + 1], hole[h:], hole[:h + 1], outer[o:]])


def _channel(outline: np.ndarray, used: np.ndarray, hole: np.ndarray, others: list[np.ndarray]
             ) -> tuple[int, int] | None:
    """A hole vertex and an outline vertex whose straight join crosses no edge and passes no voxel centre."""
    a, b = _edges([outline, hole, *others])
    free = np.flatnonzero(~used)
    dist = np.linalg.norm(hole[:, None, :] - outline[None, free, :], axis=2)
    order = np.argsort(dist, axis=None, kind="stable")
    for start in range(0, order.size, 64):
        chunk = order[start:start + 64]
        hs, os_ = np.unravel_index(chunk, dist.shape)
        for h, o in zip(hs, os_):
            p, q = hole[h], outline[free[o]]
            if not _clear_of_centres(p, q):
                continue
            if not _touches(p, q, a, b):
                return int(h), int(free[o])
    return None  # not seen on any mask: some hole vertex always sees its outline


def keyhole(contours: Contours) -> Contours:
    """The same regions with every hole joined to its enclosing outline by a zero-width channel (PS3.3 C.8.8.6.3).

    Each outline and the holes directly inside it become one contour; the channel runs straight
    from a hole vertex to an outline vertex, crosses no other contour and passes no voxel centre,
    so any reader, whatever its fill rule (even-odd, union, nonzero winding), fills the same voxels.
    """
    area = signed_areas(contours)
    if not np.any(area < 0):
        return contours
    out_slices, out_polys = [], []
    for z in np.unique(contours.slices):
        ks = np.flatnonzero(contours.slices == z)
        polys = {k: contours.contour(k) for k in ks}
        holes = [k for k in ks if area[k] < 0]
        outlines = [k for k in ks if area[k] > 0]
        parent = {}
        for h in holes:  # the smallest outline around the hole is the one it is cut from
            around = [k for k in outlines if _inside(polys[h][0], polys[k])]
            parent[h] = min(around, key=lambda k: area[k])
        for k in outlines:
            mine = sorted((h for h in holes if parent[h] == k), key=lambda h: area[h])  # largest hole first
            outline = polys[k]
            used = np.zeros(len(outline), dtype=bool)
            spliced, kept = [], []  # kept: holes no channel reached, left as contours of their own (read by even-odd)
            for h in mine:
                rest = [polys[j] for j in ks if j != k and j != h and j not in spliced]
                found = _channel(outline, used, polys[h], rest)
                if found is None:
                    log.warning("slice %d: no keyhole channel for a hole of %d vertices; written as its own contour",
                                z, len(polys[h]))
                    kept.append(polys[h])
                    continue
                hv, ov = found
                outline = _splice(outline, ov, polys[h], hv)
                spliced.append(h)
                n = len(polys[h])
                used = np.concatenate([used[:ov + 1], np.zeros(n + 1, bool), used[ov:]])
                used[[ov, ov + 1, ov + 1 + n, ov + 2 + n]] = True  # the channel's ends, each now twice
            out_slices += [z] * (1 + len(kept))
            out_polys += [outline, *kept]
    counts = [len(p) for p in out_polys]
    return Contours(np.array(out_slices, dtype=np.int64), np.r_[0, np.cumsum(counts)].astype(np.int64),
                    np.concatenate(out_polys))
