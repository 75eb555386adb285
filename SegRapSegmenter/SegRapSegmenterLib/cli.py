"""The ``segrap`` command: one subcommand per job, each a thin layer over a core module.

Exit codes: 0 success, 1 a SegRapError (bad input, bad model, ...: the message says what to fix),
2 a usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import SegRapError

log = logging.getLogger("segrap")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------------------------
# segrap structures
# --------------------------------------------------------------------------------------------


def _add_structures(sub) -> None:
    p = sub.add_parser("structures", help="list the 47 structures with names, codes and colors")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_structures)


def _cmd_structures(args) -> int:
    from . import structures as S

    if args.json:
        rows = [{"name": s.name, "index": s.index, "task": s.task, "tg263": s.tg263, "display_name": s.display_name,
                 "color": list(s.color), "type": s.type.value, "laterality": s.laterality,
                 "rt_type": s.rt_type, "nsd_tolerance_mm": s.nsd_tolerance_mm} for s in S.STRUCTURES]
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    for s in S.STRUCTURES:
        print(f"{s.task:3} {s.index:2d}  {s.name:18} {s.tg263:20} {s.display_name:40} SCT {s.type.value}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap phantom
# --------------------------------------------------------------------------------------------


def _add_phantom(sub) -> None:
    from .phantom import CONTRAST_MODES, DIRECTIONS, SIZES

    p = sub.add_parser("phantom", help="write synthetic head-and-neck phantom cases in the SegRap release layout")
    p.add_argument("--out", required=True, type=Path, help="folder to write the cohort into")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--first", type=int, default=0, help="index of the first case (default 0)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed; the same seed gives the same cases")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: 48x96x96 at 3x2x2 mm (tests); full: 126x512x512 at 3x0.54x0.54 mm")
    p.add_argument("--direction", choices=sorted(DIRECTIONS), default="identity",
                   help="image direction matrix the files are stored with")
    p.add_argument("--contrast", choices=CONTRAST_MODES, default="same",
                   help="contrast CT on the CT grid (same), with patient motion (shifted) or on another grid")
    p.set_defaults(func=_cmd_phantom)


def _cmd_phantom(args) -> int:
    from .phantom import write_cohort

    written = write_cohort(args.out, args.cases, args.seed, args.size, args.direction, args.contrast, args.first)
    for paths in written:
        print(paths.folder)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap demo
# --------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="write a phantom case and run the demo job on it")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from . import demo

    report = demo.run_demo(args.out, size=args.size, seed=args.seed)
    print(report)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap terminology
# --------------------------------------------------------------------------------------------


def _add_terminology(sub) -> None:
    p = sub.add_parser("terminology", help="print, write or check the Slicer terminology file (.term.json)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", nargs="?", const="", metavar="PATH",
                   help="write the file (default: SegRapSegmenter/Resources/SegRapSegmenter.term.json)")
    g.add_argument("--check", nargs="?", const="", metavar="PATH",
                   help="exit 1 if the file differs from the catalogue (same default path)")
    p.set_defaults(func=_cmd_terminology)


def _cmd_terminology(args) -> int:
    from . import terminology as T

    if args.write is not None:
        print(T.write_terminology(args.write or None))
        return EXIT_OK
    if args.check is not None:
        path = Path(args.check) if args.check else T.default_path()
        if path is None or not path.is_file():
            raise SegRapError(f"No terminology file at {path}: write it with `segrap terminology --write`.")
        if path.read_text(encoding="utf-8") != T.terminology_json():
            print(f"{path} is out of date with the structure catalogue: run `segrap terminology --write`.",
                  file=sys.stderr)
            return EXIT_ERROR
        print(f"{path} is current")
        return EXIT_OK
    sys.stdout.write(T.terminology_json())
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap evaluate
# --------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score predictions against references with the SegRap DSC and NSD",
                       description="Score predicted structures against reference contours with the SegRap 2023 "
                                   "organizers' DSC and NSD. Both sides are folders of cases (or single cases) "
                                   "in any of: .seg.nrrd, case folders of <Structure>.nii.gz, the challenge's "
                                   "4D .mha, Task001/Task002 label maps, RTSTRUCT + CT; matched by case id.")
    p.add_argument("--pred", required=True, type=Path, help="predictions: a folder of cases or one case")
    p.add_argument("--ref", required=True, type=Path, help="references: a folder of cases or one case")
    p.add_argument("--task", choices=("oar", "gtv"),
                   help="evaluate only the 45 OARs (oar) or GTVp/GTVnd (gtv); also says what label maps hold")
    p.add_argument("--out", type=Path, default=Path("segrap-evaluation"),
                   help="folder for scores.csv, summary.json, report.md and the PNGs (default segrap-evaluation)")
    p.add_argument("--worst", type=int, default=4, help="structures per case montage (default 4)")
    p.add_argument("--no-plots", action="store_true", help="skip the box plot and the montages")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    from . import evaluate

    result = evaluate.run(args.pred, args.ref, args.out, args.task, plots=not args.no_plots, worst=args.worst)
    summary = result.summary()
    for task, g in summary["tasks"].items():
        print(f"{task}: {g['structures']} structures, {g['cases']} case(s): DSC {100 * g['dsc_mean']:.2f} % "
              f"(sd {100 * g['dsc_std']:.2f}), NSD {100 * g['nsd_mean']:.2f} % (sd {100 * g['nsd_std']:.2f})")
    if summary["class_dice_54"]:
        print(f"54-class Dice: {100 * summary['class_dice_54']['mean']:.2f} %")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {result.files['report']}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap export-rtstruct, segrap dicom-phantom
# --------------------------------------------------------------------------------------------


def _add_export_rtstruct(sub) -> None:
    p = sub.add_parser("export-rtstruct", help="write a segmentation as a DICOM-RT structure set on its CT series",
                       description="Write a .seg.nrrd (ours, or one edited in Slicer) as an RTSTRUCT that references "
                                   "the original CT series (its frame of reference, study, series and slices). A "
                                   "segmentation on another grid is resampled onto the CT grid (nearest neighbour) "
                                   "and the structure set says so; one reaching outside the CT is refused.")
    p.add_argument("segmentation", type=Path, help="the .seg.nrrd file")
    p.add_argument("--reference-ct", required=True, type=Path, help="folder of the CT series' DICOM files")
    p.add_argument("--ct-series", metavar="UID", help="SeriesInstanceUID of the CT when the folder holds several")
    p.add_argument("-o", "--out", required=True, type=Path, help="RTSTRUCT file to write")
    p.add_argument("--roi-names", choices=("tg263", "segrap"), default="tg263",
                   help="ROI names: TG-263 (default) or the SegRap names")
    p.set_defaults(func=_cmd_export_rtstruct)


def _cmd_export_rtstruct(args) -> int:
    from .rtstruct import export_rtstruct

    path, notes = export_rtstruct(args.segmentation, args.reference_ct, args.out, roi_names=args.roi_names,
                                  series_uid=args.ct_series)
    for note in notes:
        print(f"note: {note}")
    print(path)
    return EXIT_OK


def _add_dicom_phantom(sub) -> None:
    from .phantom_dicom import VARIANTS

    p = sub.add_parser("dicom-phantom", help="write a phantom case's CT and contrast CT as DICOM series")
    p.add_argument("--out", required=True, type=Path, help="folder to write CT/ and CT_contrast/ into")
    p.add_argument("--variant", choices=VARIANTS, default="standard",
                   help="grid: standard, anisotropic pixels, nonsquare images, reversed (numbered from the head), "
                        "oblique orientation or 1024 x 1024 slices")
    p.add_argument("--index", type=int, default=0, help="phantom case index (default 0)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--slices", type=int, help="keep only this many central slices")
    p.add_argument("--masks", action="store_true", help="also write the true structures as masks.seg.nrrd")
    p.set_defaults(func=_cmd_dicom_phantom)


def _cmd_dicom_phantom(args) -> int:
    from .phantom_dicom import write_variant

    written = write_variant(args.variant, args.out, index=args.index, seed=args.seed, size=args.size,
                            slices=args.slices)
    if args.masks:
        from .segfile import write_seg_nrrd

        masks = dict(written.case.oar_masks()) | written.case.gtv_masks()
        write_seg_nrrd(args.out / "masks.seg.nrrd", masks, written.case.ct)
        print(args.out / "masks.seg.nrrd")
    print(written.ct_dir)
    print(written.contrast_dir)
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="segrap", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segrap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_structures, _add_phantom, _add_demo, _add_terminology, _add_evaluate, _add_export_rtstruct,
                _add_dicom_phantom):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``segrap`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except SegRapError as exc:
        print(f"segrap {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"segrap {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
