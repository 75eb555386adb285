"""Dice of the phantom's 47 structures read back from our RTSTRUCT by three readers, on four grid variants.

    python Testing/benchmarks/bench_rtstruct_readers.py [--holes keyhole|xor] [--dicompyler DIR]

Readers: ours (``read_rtstruct``), plastimatch ``convert`` with its default options (Debian package
plastimatch), and dicompyler-core run in its own environment (``DIR`` made with ``pip install
--target DIR --no-deps pydicom==2.4.4 dicompyler-core==0.5.6 six``; see Testing/dicom/dicompyler_read.py).
Prints one row per variant and reader: the worst structure's Dice, its name, how many are below 0.99.
The README's "before" row was measured with this script's reading code on main at 21744f8, whose
writer put each hole in a separate CLOSED_PLANAR contour.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.rtstruct import RoiMasks, read_rtstruct, write_rtstruct
from SegRapSegmenterLib.phantom.dicom_series import write_variant

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("standard", "anisotropic", "oblique", "reversed")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _names(rs: Path) -> dict[str, str]:
    return {str(r.ROIName): S.get(str(r.ROIName)).name for r in pydicom.dcmread(rs).StructureSetROISequence}


def plastimatch(rs: Path, ct_dir: Path, work: Path, image: sitk.Image) -> dict[str, np.ndarray]:
    out = work / "plastimatch"
    subprocess.run(["plastimatch", "convert", "--input", str(rs), "--referenced-ct", str(ct_dir), "--output-prefix",
                    str(out)], check=True, capture_output=True)
    names = _names(rs)
    return {names.get(f.stem, f.stem): sitk.GetArrayFromImage(
        sitk.Resample(sitk.ReadImage(str(f)), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
        for f in out.glob("*.mha")}


def dicompyler(rs: Path, work: Path, image: sitk.Image, env_dir: Path) -> dict[str, np.ndarray]:
    nx, ny, nz = image.GetSize()
    idx = np.stack(np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij"), -1)[..., ::-1]
    matrix = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    np.save(work / "centres.npy", np.array(image.GetOrigin()) + idx.astype(float) @ matrix.T)
    subprocess.run([sys.executable, str(ROOT / "Testing" / "dicom" / "dicompyler_read.py"), str(rs),
                    str(work / "centres.npy"), str(work / "dicompyler.npz")], check=True,
                   env=dict(os.environ, PYTHONPATH=str(env_dir)))
    names = _names(rs)
    data = np.load(work / "dicompyler.npz")
    return {names.get(k, k): data[k] for k in data.files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holes", choices=("keyhole", "xor"), default="keyhole")
    parser.add_argument("--dicompyler", type=Path, default=ROOT / ".peers" / "dicompyler")
    args = parser.parse_args(argv)
    print("| variant | reader | worst Dice | worst structure | structures < 0.99 |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            written = write_variant(variant, work / "dicom")
            volume = read_ct_series(written.ct_dir)
            truth = RoiMasks.of(written.case.oar_masks(), written.case.gtv_masks())
            names = [n for n in truth if truth[n].any()]
            rs = write_rtstruct({n: truth[n] for n in names}, volume, work / "rs.dcm", model_name="bench",
                                model_version="0", contour_holes=args.holes)
            readers = {"ours": lambda: read_rtstruct(rs, volume),
                       "plastimatch": lambda: plastimatch(rs, written.ct_dir, work, volume.image),
                       "dicompyler-core": lambda: dicompyler(rs, work, volume.image, args.dicompyler)}
            for reader, read in readers.items():
                got = read()
                scores = {n: dice(truth[n], got[n]) if n in got else 0.0 for n in names}
                worst = min(scores, key=scores.get)
                low = sum(v < 0.99 for v in scores.values())
                print(f"| {variant} | {reader} | {scores[worst]:.4f} | {worst} | {low}/{len(names)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
