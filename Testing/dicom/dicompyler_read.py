"""Run by the peer tests in dicompyler-core's own environment (it needs pydicom 2): an RTSTRUCT read as masks.

usage: python dicompyler_read.py RTSTRUCT CENTRES.npy OUT.npz
CENTRES.npy holds the patient coordinates (z, y, x, 3) of every CT voxel centre. Per ROI,
dicompylercore.dicomparser.DicomParser.GetStructureCoordinates groups the contours into planes
keyed by their first point's z; within a plane the contours' matplotlib Path.contains_points masks
are XOR-ed, as dicompylercore.dvhcalc.calculate_plane_histogram does (whatever the contour type).
Each plane goes to the CT slice nearest its first point along the slice normal; planes that land
on the same slice are OR-ed.
"""
import sys

import matplotlib.path
import numpy as np
from dicompylercore import dicomparser

rs, centres_path, out = sys.argv[1:4]
centres = np.load(centres_path)
nz = centres.shape[0]
normal = np.cross(centres[0, 0, 1] - centres[0, 0, 0], centres[0, 1, 0] - centres[0, 0, 0])
normal /= np.linalg.norm(normal)
plane_d = np.array([centres[k, 0, 0] @ normal for k in range(nz)])
parser = dicomparser.DicomParser(rs)
structures = parser.GetStructures()
result = {}
for number, s in structures.items():
    planes = parser.GetStructureCoordinates(number)
    mask = np.zeros(centres.shape[:3], dtype=bool)
    for _, plane in planes.items():
        if not plane:
            continue
        first = np.array(plane[0]["data"][0], dtype=float)
        k = int(np.argmin(np.abs(plane_d - first @ normal)))
        pts = centres[k].reshape(-1, 3)[:, :2]
        grid = np.zeros(len(pts), dtype=bool)
        for c in plane:
            xy = [p[0:2] for p in c["data"]]
            m = matplotlib.path.Path(xy).contains_points(pts)
            grid = np.logical_xor(m, grid)
        mask[k] |= grid.reshape(centres.shape[1:3])
    result[str(s["name"])] = mask
np.savez_compressed(out, **result)
