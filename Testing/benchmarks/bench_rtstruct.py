"""Time to write the RTSTRUCT of 47 structures on a full phantom case (126 x 512 x 512), vs a plain pydicom writer.

    python Testing/benchmarks/bench_rtstruct.py [--size full|small] [--repeat 3] [--no-baseline]

The phantom's CT is written as a DICOM series and read back (not timed); then ``write_rtstruct``
is timed end to end (contour tracing, dataset, file). The baseline builds the same structure set
the way straightforward pydicom code does (attributes set one by one, ContourData as a list of
floats that pydicom converts and formats value by value) from the same contours, so the ratio
isolates the encoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from SegRapSegmenterLib.formats import rtstruct
from SegRapSegmenterLib.formats.contours import trace
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.pydicom_compat import save_file
from SegRapSegmenterLib.phantom.cases import make_case
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom


def baseline_write(masks: dict, volume, path: Path) -> None:
    """A straightforward pydicom RTSTRUCT writer: the same content, ContourData converted by pydicom."""
    ds = rtstruct.build_rtstruct({k: np.zeros_like(v) for k, v in masks.items()}, volume, model_name="bench",
                                 model_version="0")
    placement = rtstruct._Placement(volume)
    rois = rtstruct._rois(masks, next(iter(masks.values())).shape, "tg263")
    for roi_item, roi in zip(ds.ROIContourSequence, rois):
        found = rtstruct._trace_roi(masks, roi.key)
        items = []
        for k in range(len(found)):
            z = int(found.slices[k])
            pts = placement.patient(found.contour(k), z)
            item = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID = volume.series.slices[z].sop_class_uid
            ref.ReferencedSOPInstanceUID = volume.series.slices[z].sop_instance_uid
            item.ContourImageSequence = [ref]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(pts)
            item.ContourData = [round(float(v), 4) for v in pts.ravel()]
            items.append(item)
        if items:
            roi_item.ContourSequence = items
    save_file(ds, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    case = make_case(0, size=args.size)
    masks = dict(case.oar_masks()) | case.gtv_masks()
    with tempfile.TemporaryDirectory() as tmp:
        written = write_phantom_dicom(case, Path(tmp) / "dicom")
        volume = read_ct_series(written.ct_dir)
        shape = volume.image.GetSize()[::-1]
        print(f"phantom {args.size} {shape[0]}x{shape[1]}x{shape[2]}, {len(masks)} structures "
              f"(setup {time.perf_counter() - t0:.1f} s)")
        times = []
        for r in range(args.repeat):
            t = time.perf_counter()
            path = rtstruct.write_rtstruct(masks, volume, Path(tmp) / f"rt{r}.dcm", model_name="bench",
                                           model_version="0")
            times.append(time.perf_counter() - t)
        ds = rtstruct.pydicom.dcmread(path)
        contours = sum(len(r.get("ContourSequence", [])) for r in ds.ROIContourSequence)
        points = sum(int(c.NumberOfContourPoints) for r in ds.ROIContourSequence for c in r.get("ContourSequence", []))
        t = time.perf_counter()
        for name in masks:
            trace(masks[name])
        tracing = time.perf_counter() - t
        best = min(times)
        print(f"write_rtstruct: best {best:.2f} s, median {statistics.median(times):.2f} s of {args.repeat} "
              f"({contours} contours, {points} points, {path.stat().st_size / 1e6:.1f} MB; "
              f"tracing alone {tracing:.2f} s)")
        if not args.no_baseline:
            t = time.perf_counter()
            baseline_write(masks, volume, Path(tmp) / "baseline.dcm")
            base = time.perf_counter() - t
            print(f"plain pydicom writer: {base:.2f} s  (ratio {base / best:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
