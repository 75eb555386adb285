"""The ``segrap`` command: one subcommand per job, each a thin layer over a core module.

Exit codes: 0 success; 2 a usage error (argparse); 3 bad input (image, DICOM, geometry, names);
4 a missing or bad model bundle; 5 an output folder that cannot be written; 6 the worker process
died; 7 a DICOM peer that cannot be reached, rejects the association or refuses a store; 1 any
other error; 130 interrupted or cancelled. Every error message says what to fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .console import ProgressPrinter
from .errors import (  # noqa: F401
    EXIT_ERROR,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    EXIT_WORKER,
    SegRapError,
    exit_code,
    exit_code_of_kind,
)

log = logging.getLogger("segrap")

# --------------------------------------------------------------------------------------------
# segrap structures
# --------------------------------------------------------------------------------------------


def _add_structures(sub) -> None:
    p = sub.add_parser("structures", help="list the 47 structures with names, codes and colors")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_structures)


def _cmd_structures(args) -> int:
    from .anatomy import structures as S

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
    from .phantom.cases import CONTRAST_MODES, DIRECTIONS, SIZES

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
    from .phantom.cases import write_cohort

    written = write_cohort(args.out, args.cases, args.seed, args.size, args.direction, args.contrast, args.first)
    for paths in written:
        print(paths.folder)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap segment
# --------------------------------------------------------------------------------------------


def _add_contour_holes(p) -> None:
    p.add_argument("--contour-holes", choices=("keyhole", "xor"), default="keyhole",
                   help="how a hole in a slice is written (DICOM PS3.3 C.8.8.6.3): keyhole (default; every reader reads it the same) or xor (CLOSEDPLANAR_XOR contours, for planning systems that read them)")


def _add_segment(sub) -> None:
    from .inference.devices import DEVICES

    p = sub.add_parser("segment", help="contour the OARs on a CT and the GTVs on a contrast CT")
    src = p.add_argument_group("inputs (one case, or a cohort with --input-dir)")
    src.add_argument("--ct", help="plain CT: NIfTI, NRRD or MHA file, or a DICOM series folder")
    src.add_argument("--contrast-ct", help="contrast-enhanced CT (same formats); needed for the GTVs")
    src.add_argument("--input-dir", type=Path, help="a cohort: one case per subfolder (SegRap layout: "
                     "image.nii.gz and image_contrast.nii.gz); finished cases are skipped")
    src.add_argument("--part", default="1/1", help="K/N: process every N-th case starting with the K-th "
                     "(for cluster array jobs; default 1/1)")
    src.add_argument("--ct-series", help="SeriesInstanceUID of the CT when a DICOM folder holds several")
    src.add_argument("--contrast-series", help="SeriesInstanceUID of the contrast CT in its DICOM folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--case-id", help="name of the outputs (default: from the input file or folder name)")
    p.add_argument("--bundle", help="installed bundle name, bundle folder, or 'demo' (default: the only "
                   "installed bundle)")
    p.add_argument("--tasks", default="oar,gtv", help="oar, gtv or oar,gtv (default both)")
    p.add_argument("--structures", help="comma-separated subset of structures, any known spelling")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda, then mps, then cpu")
    p.add_argument("--folds", help="comma-separated folds to ensemble (default: all in the bundle)")
    mirror = p.add_mutually_exclusive_group()
    mirror.add_argument("--mirror", dest="mirror", action="store_true", default=None,
                        help="test-time mirroring on (default: as the bundle says)")
    mirror.add_argument("--no-mirror", dest="mirror", action="store_false", help="test-time mirroring off")
    p.add_argument("--step", type=float, default=0.5, help="sliding-window tile step, fraction of a tile")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--low-memory", action="store_true", help="for GPUs with little memory: class scores and the "
                   "image stay in CPU memory, only tiles go to the GPU (slower); out-of-memory errors switch "
                   "to this by themselves, with a warning")
    align = p.add_mutually_exclusive_group()
    align.add_argument("--assume-aligned", dest="register", action="store_false", default=False,
                       help="the contrast CT is in the CT's patient space: resample only (default)")
    align.add_argument("--register", dest="register", action="store_true",
                       help="rigidly register the contrast CT to the CT first (mutual information)")
    p.add_argument("--nifti", action="store_true", help="also write one NIfTI per structure and the "
                   "challenge's 4D .mha files")
    p.add_argument("--rtstruct", action="store_true", help="also write a DICOM-RT structure set (DICOM CT only)")
    p.add_argument("--roi-names", choices=("tg263", "segrap"), default="tg263", help="RTSTRUCT ROI names")
    _add_contour_holes(p)
    p.add_argument("--no-largest-component", dest="largest", action="store_false",
                   help="keep every component of single-component organs")
    p.add_argument("--fill-holes", action="store_true", help="fill holes in every structure")
    p.add_argument("--json", action="store_true", help="print the worker's JSON lines instead of a progress bar")
    p.add_argument("--python", help="Python executable for the worker (default: this one)")
    p.set_defaults(func=_cmd_segment)


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _request_from_args(args, ct, contrast, case_id, out_dir):
    from .runner import SegmentRequest

    return SegmentRequest(
        ct=str(ct) if ct else None, contrast_ct=str(contrast) if contrast else None, out_dir=str(out_dir),
        case_id=case_id, bundle=args.bundle, tasks=_split(args.tasks) or (), structures=_split(args.structures),
        device=args.device, folds=_split(args.folds), mirror=args.mirror, tile_step_size=args.step,
        threads=args.threads, low_memory=args.low_memory, register=args.register, ct_series=args.ct_series,
        contrast_series=args.contrast_series, nifti=args.nifti, rtstruct=args.rtstruct, roi_names=args.roi_names,
        keep_largest_component=args.largest, fill_holes=args.fill_holes, contour_holes=args.contour_holes)


def _run_worker(request, args, label: str) -> int:
    from .errors import Cancelled
    from .runner import WorkerRun, cancel_on_termination

    on_event = (lambda e: print(json.dumps(e), flush=True)) if args.json else ProgressPrinter(label)
    run = WorkerRun(request, python=args.python)
    try:
        with cancel_on_termination():  # SIGTERM/SIGHUP: stop the worker's tree and remove its temp folders first
            outcome = run.start().wait(on_event)
    except (KeyboardInterrupt, Cancelled) as exc:
        run.cancel()  # wait() did it already, unless the signal came before
        print(f"{label}: {exc or 'interrupted'}; cancelled, no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    final = outcome.final
    if final["event"] == "done":
        if not args.json:
            for key, path in final["outputs"].items():
                print(f"{key}: {path}")
        return EXIT_OK
    if final["event"] == "cancelled":
        print(f"{label}: cancelled; no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.json:
        print(f"{label}: error: {final.get('message')}", file=sys.stderr)
        if final.get("kind") == "InternalError":
            print(final.get("traceback", ""), file=sys.stderr)
    return exit_code_of_kind(final.get("kind"))


def _cohort_cases(input_dir: Path, part: str) -> list[tuple[str, Path | None, Path | None]]:
    """(case id, CT, contrast CT) for each case folder of a cohort, the K-th of every N."""
    from .errors import InputError
    from .formats.imaging import IMAGE_SUFFIXES

    try:
        k, n = (int(v) for v in part.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise InputError(f"--part must be K/N with 1 <= K <= N, got {part!r}.") from None
    if not input_dir.is_dir():
        raise InputError(f"--input-dir {input_dir}: not a folder.")
    cases = []
    for folder in sorted(p for p in input_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        def find(*stems):
            for stem in stems:
                for suffix in IMAGE_SUFFIXES:
                    if (folder / f"{stem}{suffix}").is_file():
                        return folder / f"{stem}{suffix}"
            return None
        ct, contrast = find("image", "ct", "CT"), find("image_contrast", "contrast_ct", "contrast")
        if ct is None and contrast is None:
            continue
        cases.append((folder.name, ct, contrast))
    if not cases:
        raise InputError(f"--input-dir {input_dir}: no case folders with image.nii.gz / image_contrast.nii.gz.")
    return cases[k - 1::n]


def _cmd_segment(args) -> int:
    from .errors import InputError

    from .runner import check_case_id

    if args.input_dir is None:
        if not args.ct and not args.contrast_ct:
            raise InputError("Give --ct (and --contrast-ct), or --input-dir for a cohort.")
        if args.case_id is not None:
            check_case_id(args.case_id, "--case-id")
        request = _request_from_args(args, args.ct, args.contrast_ct, args.case_id, args.out)
        return _run_worker(request, args, "segrap segment")
    if args.ct or args.contrast_ct or args.case_id:
        raise InputError("--input-dir processes a cohort: leave out --ct, --contrast-ct and --case-id.")
    failures = []
    cases = _cohort_cases(args.input_dir, args.part)
    for number, (case_id, ct, contrast) in enumerate(cases, start=1):
        try:
            check_case_id(case_id, f"--input-dir case folder {args.input_dir / case_id}:")
        except InputError as exc:
            print(f"[{number}/{len(cases)}] error: {exc}", file=sys.stderr)
            failures.append((case_id, EXIT_INPUT))
            continue
        out = args.out / case_id
        if (out / f"{case_id}.provenance.json").is_file():
            print(f"[{number}/{len(cases)}] {case_id}: already done, skipped", file=sys.stderr)
            continue
        request = _request_from_args(args, ct, contrast, case_id, out)
        if contrast is None:
            request.tasks = tuple(t for t in request.tasks if t != "gtv")
        if ct is None:
            request.tasks = tuple(t for t in request.tasks if t != "oar")
        rc = _run_worker(request, args, f"[{number}/{len(cases)}] {case_id}")
        if rc == EXIT_INTERRUPTED:
            return rc
        if rc != EXIT_OK:
            failures.append((case_id, rc))
    if failures:
        print("failed cases: " + ", ".join(f"{c} (exit {rc})" for c, rc in failures), file=sys.stderr)
        return failures[0][1]
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap models
# --------------------------------------------------------------------------------------------


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="install, list, verify or remove model bundles")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    inst = msub.add_parser("install", help="install a bundle from a folder, a zip or an http(s)/file URL")
    inst.add_argument("source")
    inst.add_argument("--force", action="store_true", help="replace an installed bundle of the same name")
    inst.add_argument("--allow-http", action="store_true", help="allow a plain http URL (it can be altered on the "
                      "way, checksums included; https is the default)")
    imp = msub.add_parser("import", help="install nnU-Net v2 result folders (one per task) as a checksummed bundle")
    imp.add_argument("results", nargs="+", type=Path, metavar="RESULTS_FOLDER",
                     help="$nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration> with dataset.json, "
                          "plans.json and fold_N/checkpoint_final.pth; the task (OARs or GTVs) is read from its labels")
    imp.add_argument("--name", required=True, help="the bundle's name, e.g. segrap-oar-clinic (letters, digits, . _ -)")
    imp.add_argument("--version", default="1.0.0", help="the bundle's version (default 1.0.0)")
    imp.add_argument("--license", required=True, help="license of the weights (the training data's terms decide it)")
    imp.add_argument("--folds", help="comma-separated folds (default: every fold with checkpoint_final.pth)")
    imp.add_argument("--description", default="")
    imp.add_argument("--training-mirroring", choices=("none", "plain", "laterality-aware"),
                     help="how the models mirrored in training (default: from the trainer or the checkpoint)")
    imp.add_argument("--force", action="store_true", help="replace an installed bundle of the same name")
    msub.add_parser("list", help="list installed bundles")
    ver = msub.add_parser("verify", help="check every file's checksum")
    ver.add_argument("name", nargs="?", help="bundle name (default: all installed), folder, or 'demo'")
    rem = msub.add_parser("remove", help="delete an installed bundle")
    rem.add_argument("name", help="the installed bundle's name (as `segrap models list` shows it), not a path")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from .inference import bundles as M

    if args.models_command == "install":
        bundle = M.install_bundle(args.source, force=args.force, allow_http=args.allow_http)
        print(f"installed {bundle.name} {bundle.version} ({bundle.license}) at {bundle.root}")
    elif args.models_command == "import":
        from .training.export import import_results

        bundle = import_results(args.results, name=args.name, version=args.version, license=args.license,
                                folds=list(_split(args.folds) or ()) or None, description=args.description,
                                training_mirroring=args.training_mirroring, force=args.force)
        tasks = ", ".join(f"{t}: folds {','.join(m.folds)}, training mirroring {m.training_mirroring}"
                          for t, m in bundle.tasks.items())
        print(f"imported and installed {bundle.name} {bundle.version} ({bundle.license}) at {bundle.root}; {tasks}; "
              f"all {len(bundle.files)} files checksummed")
        print(f"use it with: segrap segment ... --bundle {bundle.name}")
    elif args.models_command == "list":
        bundles = M.list_bundles()
        if not bundles:
            print(f"no bundles installed in {M.store_root()} (the phantom-trained demo model is always "
                  f"available as --bundle demo)")
        for b in bundles:
            tasks = ", ".join(f"{t} folds {','.join(m.folds)}" for t, m in b.tasks.items())
            print(f"{b.name}\t{b.version}\t{b.license}\t{tasks}\t{b.root}")
    elif args.models_command == "verify":
        bundles = [M.resolve_bundle(args.name)] if args.name else M.list_bundles()
        for b in bundles:
            M.verify_bundle(b)
            print(f"{b.name} {b.version}: all {len(b.files)} files verified")
    elif args.models_command == "remove":
        print(f"removed {M.remove_bundle(args.name)}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap demo
# --------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="write a phantom case and segment it with the demo model")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--seed", type=int, default=99, help="phantom seed (the demo model never saw seed 99)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--details", action="store_true", help="also print the Dice of every structure")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from . import demo

    return demo.run_demo(args.out, size=args.size, seed=args.seed, device=args.device, json_lines=args.json,
                         details=args.details)


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
    from .anatomy import terminology as T

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
    from .evaluation import evaluate

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
    _add_contour_holes(p)
    p.set_defaults(func=_cmd_export_rtstruct)


def _cmd_export_rtstruct(args) -> int:
    from .formats.rtstruct import export_rtstruct

    path, notes = export_rtstruct(args.segmentation, args.reference_ct, args.out, roi_names=args.roi_names,
                                  series_uid=args.ct_series, contour_holes=args.contour_holes)
    for note in notes:
        print(f"note: {note}")
    print(path)
    return EXIT_OK


def _add_dicom_phantom(sub) -> None:
    from .phantom.dicom_series import VARIANTS

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
    from .phantom.dicom_series import write_variant

    written = write_variant(args.variant, args.out, index=args.index, seed=args.seed, size=args.size,
                            slices=args.slices)
    if args.masks:
        from .formats.segfile import write_seg_nrrd

        masks = dict(written.case.oar_masks()) | written.case.gtv_masks()
        write_seg_nrrd(args.out / "masks.seg.nrrd", masks, written.case.ct)
        print(args.out / "masks.seg.nrrd")
    print(written.ct_dir)
    print(written.contrast_dir)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# segrap train (the training recipe: docs/training.md)
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="rebuild the models: datasets, trainers, plans edits, training, bundle export",
                       description="The DKFZ training recipe on nnU-Net v2, step by step in docs/training.md.")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="ACTION")

    c = tsub.add_parser("convert", help="SegRap release and/or DICOM exports -> nnU-Net raw dataset")
    c.add_argument("--segrap-root", type=Path, help="the SegRap release (folder of segrap_XXXX case folders)")
    c.add_argument("--dicom-root", type=Path, help="an institution's exports: one subfolder per case with the CT "
                   "series and its RTSTRUCT (ROI names mapped to the catalogue)")
    c.add_argument("--out", type=Path, help="nnU-Net raw folder (default: $nnUNet_raw)")
    c.add_argument("--task", choices=("oar", "gtv"), required=True, help="oar: Task 1 (CT, 54 classes); gtv: Task 2")
    c.add_argument("--dataset-id", type=int, help="nnU-Net dataset number (default 601 oar, 602 gtv)")
    c.add_argument("--on-conflict", choices=("error", "nearest", "background"), default="error",
                   help="OAR overlaps that match no class: stop (default), nearest class, or background")

    t = tsub.add_parser("trainers", help="list the SegRap trainers and make nnU-Net find them by name")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--path", action="store_true", help="print the folder for nnUNet_extTrainer (writes it if needed)")
    g.add_argument("--install", action="store_true", help="older nnU-Net without nnUNet_extTrainer: write the "
                   "one-line module into nnU-Net's "
                   "trainer package")
    g.add_argument("--uninstall", action="store_true", help="remove the module --install wrote")

    e = tsub.add_parser("edit-plans", help="add a configuration with another patch/batch size (e.g. the poster's)")
    e.add_argument("plans", type=Path, help="plans file, e.g. $nnUNet_preprocessed/Dataset601_SegRapOAR/"
                   "nnUNetResEncUNetLPlans_40G.json")
    e.add_argument("--name", required=True, help="new configuration name, e.g. 3d_fullres_p32x320x256")
    e.add_argument("--base", default="3d_fullres", help="configuration it inherits from (default 3d_fullres)")
    e.add_argument("--patch-size", type=int, nargs="+", metavar="N", help="z y x, e.g. 32 320 256")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--arch", action="append", default=[], metavar="KEY=JSON",
                   help="network setting, e.g. features_per_stage=[8,16,32,64] (repeatable)")
    e.add_argument("--overwrite", action="store_true", help="replace a configuration of that name")

    r = tsub.add_parser("run", help="train one fold with nnU-Net's run_training and the SegRap trainers")
    r.add_argument("dataset", help="dataset id or DatasetXXX_Name")
    r.add_argument("configuration", help="e.g. 3d_fullres or one added by edit-plans")
    r.add_argument("fold", help="0-4 or all")
    r.add_argument("-tr", "--trainer", default="SegRapStagedTrainer",
                   help="trainer class (default SegRapStagedTrainer)")
    r.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    r.add_argument("--pretrained", type=Path, help="nnU-Net checkpoint to start from (matched by name and shape)")
    r.add_argument("--num-gpus", type=int, default=1, help="GPUs for nnU-Net's DDP training (default 1)")
    r.add_argument("--device", choices=("cuda", "cpu", "mps"), default="cuda")
    r.add_argument("--continue", dest="continue_training", action="store_true",
                   help="resume from the latest checkpoint (a fold without one starts afresh)")
    r.add_argument("--val-only", action="store_true", help="only run the final validation")
    r.add_argument("--npz", action="store_true", help="also save validation probabilities (for ensembling)")
    r.add_argument("--epochs", type=int, help="total epochs (short runs; the trainer's own by default)")
    r.add_argument("--iterations", type=int, help="training iterations per epoch (default 250)")
    r.add_argument("--val-iterations", type=int, help="validation iterations per epoch (default 50)")
    r.add_argument("--stage-epochs", type=int, nargs=2, metavar=("HEADS", "WARMUP"),
                   help="epochs of the heads-only and the whole-network warm-up stages (default 10 50)")

    k = tsub.add_parser("check-pretrained", help="what a checkpoint would load into a plans' network, and skip")
    k.add_argument("--checkpoint", required=True, type=Path)
    k.add_argument("--plans", required=True, type=Path, help="plans file the fine-tuning uses")
    k.add_argument("--dataset-json", type=Path, help="default: dataset.json beside the plans file")
    k.add_argument("--configuration", default="3d_fullres")

    x = tsub.add_parser("export-bundle", help="trained result folders -> a model bundle for `segrap models install`")
    x.add_argument("--oar", type=Path, help="Task 1 result folder (<Trainer>__<Plans>__<configuration>)")
    x.add_argument("--gtv", type=Path, help="Task 2 result folder")
    x.add_argument("--folds", help="comma-separated folds (default: every fold with checkpoint_final.pth)")
    x.add_argument("--name", required=True)
    x.add_argument("--version", required=True)
    x.add_argument("--license", required=True, help="license of the weights, e.g. CC-BY-NC-SA-4.0")
    x.add_argument("--description", default="")
    x.add_argument("--training-mirroring", choices=("none", "plain", "laterality-aware"),
                   help="default: what the trainer declares, else what its checkpoint recorded")
    x.add_argument("--test-time-mirroring", action="store_true", help="mirror at test time by default")
    x.add_argument("--out", required=True, type=Path, help="bundle folder to write (must not exist)")
    p.set_defaults(func=_cmd_train)


def _train_convert(args) -> int:
    import os

    from .errors import InputError
    from .training.convert import convert_release
    from .training.convert_dicom import convert_dicom

    if args.segrap_root is None and args.dicom_root is None:
        raise InputError("Give --segrap-root (the SegRap release) and/or --dicom-root (DICOM exports).")
    out = args.out or (Path(os.environ["nnUNet_raw"]) if os.environ.get("nnUNet_raw") else None)
    if out is None:
        raise InputError("Give --out (the nnU-Net raw folder) or set nnUNet_raw.")
    dataset_id = args.dataset_id or (601 if args.task == "oar" else 602)
    if args.segrap_root is not None:
        print(convert_release(args.segrap_root, out, args.task, dataset_id, args.on_conflict).summary())
    if args.dicom_root is not None:
        print(convert_dicom(args.dicom_root, out, args.task, dataset_id, args.on_conflict).summary())
    return EXIT_OK


def _train_trainers(args) -> int:
    from .training import registry
    from .training.trainers import TRAINERS

    if args.path:
        print(registry.trainer_folder())
    elif args.install:
        print(f"wrote {registry.install_shim()}; remove it with `segrap train trainers --uninstall`")
    elif args.uninstall:
        removed = registry.remove_shim()
        print(f"removed {removed}" if removed else "nothing to remove")
    else:
        for name, cls in TRAINERS.items():
            print(f"{name}\t{cls.__doc__.splitlines()[0]}")
        print(f"nnUNetv2_train -tr NAME finds them with: export nnUNet_extTrainer={registry.trainer_folder()}")
    return EXIT_OK


def _train_edit_plans(args) -> int:
    from .errors import InputError
    from .training.plans import add_configuration

    arch = {}
    for item in args.arch:
        key, sep, value = item.partition("=")
        try:
            arch[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            sep = ""
        if not sep or not key.strip():
            raise InputError(f"--arch {item!r}: write KEY=JSON, e.g. features_per_stage=[8,16,32,64].")
    edit = add_configuration(args.plans, args.name, base=args.base, patch_size=args.patch_size,
                             batch_size=args.batch_size, arch_kwargs=arch, overwrite=args.overwrite)
    print(f"{edit.plans_path}: configuration {edit.name} (inherits {edit.base}): patch {list(edit.patch_size)}, "
          f"batch size {edit.batch_size}, network downsampling {list(edit.divisors)}")
    print(f"train it with: segrap train run DATASET {edit.name} FOLD -p {edit.plans_path.stem}")
    return EXIT_OK


def _train_run(args) -> int:
    from .training.run import run

    options = {}
    if args.epochs is not None:
        options["num_epochs"] = args.epochs
    if args.iterations is not None:
        options["num_iterations_per_epoch"] = args.iterations
    if args.val_iterations is not None:
        options["num_val_iterations_per_epoch"] = args.val_iterations
    if args.stage_epochs is not None:
        options["heads_epochs"], options["warmup_epochs"] = args.stage_epochs
    folder = run(args.dataset, args.configuration, args.fold, trainer=args.trainer, plans=args.plans,
                 pretrained=args.pretrained, options=options or None, num_gpus=args.num_gpus, device=args.device,
                 continue_training=args.continue_training, validation_only=args.val_only, npz=args.npz)
    print(f"result: {folder}")
    return EXIT_OK


def _train_check_pretrained(args) -> int:
    from .training.pretrained import check_pretrained

    dataset_json = args.dataset_json or args.plans.parent / "dataset.json"
    print(check_pretrained(args.checkpoint, args.plans, dataset_json, args.configuration).summary())
    return EXIT_OK


def _train_export_bundle(args) -> int:
    from .training.export import export_bundle

    results = {task: path for task, path in (("oar", args.oar), ("gtv", args.gtv)) if path is not None}
    bundle = export_bundle(args.out, results=results, folds=list(_split(args.folds) or ()) or None, name=args.name,
                           version=args.version, license=args.license, description=args.description,
                           training_mirroring=args.training_mirroring, test_time_mirroring=args.test_time_mirroring)
    print(f"bundle written to {bundle}; install it with `segrap models install {bundle}`")
    return EXIT_OK


def _cmd_train(args) -> int:
    actions = {"convert": _train_convert, "trainers": _train_trainers, "edit-plans": _train_edit_plans,
               "run": _train_run, "check-pretrained": _train_check_pretrained, "export-bundle": _train_export_bundle}
    return actions[args.train_command](args)


# --------------------------------------------------------------------------------------------
# segrap send / segrap serve (the DICOM node: docs in node/ and the README)
# --------------------------------------------------------------------------------------------


def _add_send(sub) -> None:
    p = sub.add_parser("send", help="send DICOM files (e.g. an RTSTRUCT) to a DICOM node: C-ECHO, then C-STORE")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="DICOM files, or folders searched for them")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the destination, e.g. TPS@10.0.0.5:104")
    p.add_argument("--calling-ae", default="SEGRAP", help="our AE title (default SEGRAP)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    p.set_defaults(func=_cmd_send)


def _cmd_send(args) -> int:
    from .node.address import parse_destination
    from .node.scu import send_files

    report = send_files(args.paths, parse_destination(args.to), args.calling_ae, timeout=args.timeout)
    for warning in report.warnings:
        print(f"segrap send: warning: {warning}", file=sys.stderr)
    print(f"sent {len(report.sent)} file(s) to {report.destination}")
    return EXIT_OK


def _add_serve(sub) -> None:
    from .inference.devices import DEVICES

    p = sub.add_parser("serve", help="run the DICOM auto-contouring node: CT studies in, RTSTRUCT out",
                       description="A Storage SCP that contours every complete CT study it receives and sends the "
                       "RTSTRUCT to the destinations. Flags win over the --config file.")
    p.add_argument("--config", type=Path, help="TOML file with the same settings (see the README)")
    p.add_argument("--status", action="store_true", help="print the queue of the node whose --spool is given, "
                   "and exit")
    p.add_argument("--ae-title", help="the node's AE title (default SEGRAP)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0; 127.0.0.1 for this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default 11112)")
    p.add_argument("--spool", type=Path, help="folder for received images, the database, outputs and the audit log")
    p.add_argument("--destination", action="append", default=[], metavar="AE@HOST:PORT",
                   help="where each RTSTRUCT is sent (repeatable)")
    p.add_argument("--allow-ae", action="append", default=[], metavar="AE",
                   help="accept associations only from these calling AE titles (repeatable; default any)")
    p.add_argument("--settle", type=float, help="a study is complete after this many seconds without a new "
                   "instance (default 30)")
    p.add_argument("--bundle", help="model bundle (installed name, folder or 'demo')")
    p.add_argument("--device", choices=DEVICES, help="default auto")
    p.add_argument("--tasks", help="oar, gtv or oar,gtv (default both, as the study allows)")
    p.add_argument("--contour-holes", choices=("keyhole", "xor"), help="how holes are written in the RTSTRUCT")
    p.add_argument("--workers", type=int, help="jobs run at once (default one per GPU, one without GPUs)")
    p.add_argument("--threads", type=int, help="CPU threads of each worker")
    p.add_argument("--python", help="Python executable for the worker (default: this one)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import signal

    from .errors import InputError
    from .node.config import load_config
    from .node.service import Node, status_text

    if args.status:
        if args.spool is None:
            raise InputError("--status needs --spool DIR (the node's spool folder).")
        print(status_text(args.spool))
        return EXIT_OK
    config = load_config(args.config, spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port,
                         destinations=args.destination, allow_ae=args.allow_ae, settle=args.settle,
                         bundle=args.bundle, device=args.device, tasks=args.tasks, contour_holes=args.contour_holes,
                         workers=args.workers, threads=args.threads, python=args.python)
    node = Node(config, echo=lambda line: print(line, file=sys.stderr, flush=True))
    signal.signal(signal.SIGTERM, node.stop)
    signal.signal(signal.SIGINT, node.stop)
    return node.run()


# --------------------------------------------------------------------------------------------


COMMANDS = {"structures": _add_structures, "phantom": _add_phantom, "segment": _add_segment, "models": _add_models,
            "demo": _add_demo, "terminology": _add_terminology, "evaluate": _add_evaluate,
            "export-rtstruct": _add_export_rtstruct, "dicom-phantom": _add_dicom_phantom, "train": _add_train,
            "send": _add_send, "serve": _add_serve}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand, or of the one named ``only`` (its options are the same).

    Some subcommands import what their choices come from (the phantom's sizes, the DICOM variants):
    ``main`` builds only the command it runs, so ``segrap segment``, whose process only starts and
    follows the worker, never loads numpy, SimpleITK or pydicom.
    """
    parser = argparse.ArgumentParser(prog="segrap", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segrap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in COMMANDS.items():
        if only is None or name == only:
            add(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if its first word that is not an option names one."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``segrap`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except SegRapError as exc:
        print(f"segrap {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"segrap {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

if __name__ == "__main__":
    sys.exit(main())
