"""The ``segrap`` command: one subcommand per job, each a thin layer over a core module.

Exit codes: 0 success; 2 a usage error (argparse); 3 bad input (image, DICOM, geometry, names);
4 a missing or bad model bundle; 5 an output folder that cannot be written; 6 the worker process
died; 7 a DICOM peer that cannot be reached, rejects the association or refuses a store; 8 another
run is writing the same case into the same output folder (nothing was changed); 1 any other error;
130 interrupted or cancelled. Every error message says what to fix.
"""

from __future__ import annotations

import os
import sys


def _drop_current_folder(path: list[str]) -> None:
    """Take the current folder ('', '.', or its path from an empty PYTHONPATH entry) off ``path``, in place.

    Runs before any other import of the ``segrap`` process: with PYTHONPATH=":" (or "dir:") Python
    puts the current folder on sys.path, and a json.py or argparse.py lying there (a patient data
    folder someone shared) would be imported as the standard module and run. The worker is started
    the same way (runner._SAFE_RUN); this covers the command's own process.
    """
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was deleted: only the relative spellings can name it
        here = None
    path[:] = [p for p in path if p not in ("", ".") and (here is None or os.path.realpath(p) != here)]


_drop_current_folder(sys.path)

import argparse  # noqa: E402 - after the current folder is off sys.path
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__  # noqa: E402
from .console import ProgressPrinter  # noqa: E402
from .errors import (  # noqa: F401, E402
    EXIT_BUSY,
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


def _device_argument(text: str) -> str:
    """argparse type of --device: auto, cuda, cuda:N, mps or cpu (whether it exists is the worker's check)."""
    from .errors import InputError
    from .inference.devices import check_device_name

    try:
        return check_device_name(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_segment(sub) -> None:

    p = sub.add_parser("segment", help="contour the OARs on a CT and the GTVs on a contrast CT")
    src = p.add_argument_group("inputs (one case, or a cohort with --input-dir)")
    src.add_argument("--ct", help="plain CT: NIfTI, NRRD or MHA file, or a DICOM series folder")
    src.add_argument("--contrast-ct", help="contrast-enhanced CT (same formats); needed for the GTVs")
    src.add_argument("--input-dir", type=Path, help="a cohort: one case per subfolder (SegRap layout: "
                     "image.nii.gz and image_contrast.nii.gz); finished cases are skipped")
    src.add_argument("--part", default="1/1", help="K/N: process every N-th case starting with the K-th, K counted "
                     "from 1 (default 1/1); auto: K and N from a Slurm array task's SLURM_ARRAY_TASK_* variables; "
                     "auto/N: K from a Kubernetes Indexed Job's JOB_COMPLETION_INDEX (0-based), N its completions "
                     "(docs/cluster.md)")
    src.add_argument("--ct-series", help="SeriesInstanceUID of the CT when a DICOM folder holds several")
    src.add_argument("--contrast-series", help="SeriesInstanceUID of the contrast CT in its DICOM folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--case-id", help="name of the outputs (default: from the input file or folder name)")
    p.add_argument("--bundle", help="installed bundle name, bundle folder, or 'demo' (default: the only "
                   "installed bundle)")
    p.add_argument("--tasks", help="oar, gtv or oar,gtv (default: what the inputs allow, the OARs on --ct and the "
                   "GTVs on --contrast-ct, saying what is left out; named tasks whose input is missing are an error)")
    p.add_argument("--structures", help="comma-separated subset of structures, any known spelling")
    p.add_argument("--device", type=_device_argument, default="auto",
                   help="auto (cuda, then mps, then cpu), cuda, cuda:N (the N-th GPU), mps or cpu")
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


def _tasks_of(args, ct, contrast, folder: Path | None = None) -> tuple[tuple[str, ...], str | None]:
    """The tasks to run and, when a default left one out, the line that says so (``folder``: a cohort's case).

    Named ``--tasks`` are taken as they are (a missing input is then the worker's error); without
    them, the OARs run when there is a plain CT and the GTVs when there is a contrast CT.
    """
    named = _split(args.tasks)
    if args.tasks is not None:
        return named or (), None
    if ct and not contrast:
        why = f"no contrast CT (image_contrast.*) in {folder}" if folder else "no --contrast-ct given"
        return ("oar",), (f"{why}: contoured the organs at risk only; the tumour volumes (GTVp, GTVnd) need the "
                          f"contrast CT.")
    if contrast and not ct:
        why = f"no plain CT (image.*, ct.*) in {folder}" if folder else "no --ct given"
        return ("gtv",), f"{why}: contoured the tumour volumes only; the organs at risk need the plain CT."
    return ("oar", "gtv"), None


def _request_from_args(args, ct, contrast, case_id, out_dir):
    from .runner import SegmentRequest

    return SegmentRequest(
        ct=str(ct) if ct else None, contrast_ct=str(contrast) if contrast else None, out_dir=str(out_dir),
        case_id=case_id, bundle=args.bundle, tasks=_tasks_of(args, ct, contrast)[0], structures=_split(args.structures),
        device=args.device, folds=_split(args.folds), mirror=args.mirror, tile_step_size=args.step,
        threads=args.threads, low_memory=args.low_memory, register=args.register, ct_series=args.ct_series,
        contrast_series=args.contrast_series, nifti=args.nifti, rtstruct=args.rtstruct, roi_names=args.roi_names,
        keep_largest_component=args.largest, fill_holes=args.fill_holes, contour_holes=args.contour_holes)


def written_since(out_dir: Path, started_ns: int) -> list[Path]:
    """What was moved into ``out_dir`` since a run started (modified since; not staging folders or locks)."""
    from .runner import LOCK_PREFIX, STAGING_PREFIX

    try:
        entries = [p for p in out_dir.iterdir() if not p.name.startswith((STAGING_PREFIX, LOCK_PREFIX))]
        return sorted(p for p in entries if p.lstat().st_mtime_ns >= started_ns)
    except OSError:  # no folder yet: nothing written
        return []


def cancelled_message(label: str, reason: str, out_dir: Path, started_ns: int) -> str:
    """What a stopped run says of its outputs, true to the folder: none, a complete set, or part of one.

    A signal can come after the worker moved its outputs into place and before the parent heard
    'done'; the provenance is moved last, so with it the set is complete, without it it is not.
    """
    written = written_since(out_dir, started_ns)
    if not written:
        return f"{label}: {reason}; cancelled, no output written"
    names = ", ".join(p.name for p in written)
    if any(p.name.endswith(".provenance.json") for p in written):
        return (f"{label}: {reason} after this run's outputs were in place in {out_dir} ({names}): the set is "
                f"complete (its provenance, moved last, lists every file)")
    return (f"{label}: {reason} while this run's outputs were being moved into place: {out_dir} holds {names} "
            f"without its provenance, an incomplete set; run the case again")


def _run_worker(request, args, label: str, note: str | None = None) -> int:
    import time

    from .errors import Cancelled
    from .runner import WorkerRun, cancel_on_termination

    on_event = (lambda e: print(json.dumps(e), flush=True)) if args.json else ProgressPrinter(label)
    run = WorkerRun(request, python=args.python)
    started_ns = time.time_ns()
    try:
        with cancel_on_termination():  # SIGTERM/SIGHUP: stop the worker's tree and remove its temp folders first
            outcome = run.start().wait(on_event)
    except (KeyboardInterrupt, Cancelled) as exc:
        run.cancel()  # wait() did it already, unless the signal came before
        reason = str(exc) or "interrupted (Ctrl-C)"  # a KeyboardInterrupt has no message
        print(cancelled_message(label, reason, Path(request.out_dir), started_ns), file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if isinstance(on_event, ProgressPrinter):
            on_event.close()  # no redraw after the run, whatever ended it
    final = outcome.final
    if final["event"] == "done":
        if not args.json:
            for key, path in final["outputs"].items():
                print(f"{key}: {path}")
            if final.get("review"):
                print(final["review"])
        if note:
            print(f"{label}: note: {note}", file=sys.stderr)
        return EXIT_OK
    if final["event"] == "cancelled":
        print(cancelled_message(label, "cancelled", Path(request.out_dir), started_ns), file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.json:
        print(f"{label}: error: {final.get('message')}", file=sys.stderr)
        if final.get("kind") == "InternalError":
            print(final.get("traceback", ""), file=sys.stderr)
    return exit_code_of_kind(final.get("kind"))


SLURM_ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
                         "SLURM_ARRAY_TASK_COUNT")
KUBERNETES_INDEX_VARIABLE = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True)
class CohortPart:
    """The K-th of N parts of a cohort (K from 1), and where K and N came from (said on stderr)."""

    k: int
    n: int
    source: str = "--part"

    def of(self, cases: list) -> list:
        """This part's cases: the K-th, the (K+N)-th, ... so that N parts never overlap and together hold every case."""
        return cases[self.k - 1::self.n]


def _env_int(environ: Mapping[str, str], name: str, why: str) -> int:
    """An integer environment variable of the scheduler, or an InputError naming it and its value."""
    from .errors import InputError

    text = environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise InputError(f"--part {why}: the environment variable {name}={text!r} is not a whole number.") from None


def _slurm_part(environ: Mapping[str, str], count: int | None, why: str) -> CohortPart:
    """K/N of a Slurm array task: its place in the array's evenly spaced indexes (which may start at any number)."""
    from .errors import InputError

    missing = [name for name in SLURM_ARRAY_VARIABLES if name not in environ]
    if missing:
        raise InputError(f"--part {why}: SLURM_ARRAY_TASK_ID is set but {', '.join(missing)} is not, so the task's "
                         f"place in its array is unknown; give --part K/N (K = the task's place, from 1).")
    task, first, last, total = (_env_int(environ, name, why) for name in SLURM_ARRAY_VARIABLES)
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP", why) if "SLURM_ARRAY_TASK_STEP" in environ else 1
    evenly_spaced = total >= 1 and step >= 1 and first + step * (total - 1) == last
    if not evenly_spaced or not first <= task <= last or (task - first) % step:
        raise InputError(f"--part {why}: the Slurm array (task {task}, indexes {first}..{last}, step {step}, {total} "
                         f"tasks) is not one evenly spaced range such as --array=0-7 or --array=1-15:2, so its tasks "
                         f"cannot be numbered; submit the whole range again (finished cases are skipped) or give "
                         f"--part K/N.")
    part = CohortPart((task - first) // step + 1, total,
                      f"Slurm array task {task} of {first}..{last}" + (f" step {step}" if step != 1 else ""))
    if count is not None and count != total:
        raise InputError(f"--part {why}: the Slurm array has {total} tasks (SLURM_ARRAY_TASK_COUNT), not {count}; "
                         f"make --array and --part agree, or give --part auto.")
    return part


def _kubernetes_part(environ: Mapping[str, str], count: int | None, why: str) -> CohortPart:
    """K/N of a Kubernetes Indexed Job's pod: its 0-based completion index plus one, of the N completions given."""
    from .errors import InputError

    if count is None:
        raise InputError(f"--part {why}: a Kubernetes pod is told its {KUBERNETES_INDEX_VARIABLE} but not how many "
                         f"completions its Job has; give --part auto/N with N = the Job's spec.completions.")
    index = _env_int(environ, KUBERNETES_INDEX_VARIABLE, why)
    if not 0 <= index < count:
        raise InputError(f"--part {why}: {KUBERNETES_INDEX_VARIABLE}={index} is outside 0..{count - 1}; the Job's "
                         f"spec.completions and the N of --part auto/N differ.")
    return CohortPart(index + 1, count, f"Kubernetes completion index {index} of 0..{count - 1}")


def cohort_part(text: str, environ: Mapping[str, str] | None = None) -> CohortPart:
    """Read --part: K/N (K from 1), or auto and auto/N from a Slurm array task's or a Kubernetes pod's variables."""
    from .errors import InputError

    environ = os.environ if environ is None else environ
    head, _, tail = text.partition("/")
    if head != "auto":
        try:
            k, n = int(head), int(tail)
            if not 1 <= k <= n:
                raise ValueError
        except ValueError:
            raise InputError(f"--part must be K/N with 1 <= K <= N, auto or auto/N, got {text!r}.") from None
        return CohortPart(k, n)
    count = None
    if tail:
        try:
            count = int(tail)
            if count < 1:
                raise ValueError
        except ValueError:
            raise InputError(f"--part {text}: N must be a whole number of at least 1.") from None
    slurm, kubernetes = "SLURM_ARRAY_TASK_ID" in environ, KUBERNETES_INDEX_VARIABLE in environ
    if slurm and kubernetes:
        raise InputError(f"--part {text}: both SLURM_ARRAY_TASK_ID and {KUBERNETES_INDEX_VARIABLE} are set, so which "
                         f"scheduler numbers this task is unclear; unset one, or give --part K/N.")
    if slurm:
        return _slurm_part(environ, count, text)
    if kubernetes:
        return _kubernetes_part(environ, count, text)
    job = f" (this is Slurm job {environ['SLURM_JOB_ID']}, but not an array task)" if "SLURM_JOB_ID" in environ else ""
    raise InputError(f"--part {text}: neither SLURM_ARRAY_TASK_ID (a Slurm array task, sbatch --array) nor "
                     f"{KUBERNETES_INDEX_VARIABLE} (a Kubernetes Indexed Job) is set{job}; run it under one of them, "
                     f"or give --part K/N.")


def _cohort_folders(input_dir: Path) -> list[tuple[str, Path | None, Path | None]]:
    """(case id, CT, contrast CT) for every case folder of a cohort, in name order (the order parts are cut from)."""
    from .errors import InputError
    from .formats.imaging import IMAGE_SUFFIXES

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
    return cases


def _cohort_cases(input_dir: Path, part: str, environ: Mapping[str, str] | None = None
                  ) -> list[tuple[str, Path | None, Path | None]]:
    """(case id, CT, contrast CT) for each case folder of a cohort, the K-th of every N."""
    return cohort_part(part, environ).of(_cohort_folders(input_dir))


def _cmd_segment(args) -> int:
    from .errors import InputError

    from .runner import check_case_id

    if args.input_dir is None:
        if not args.ct and not args.contrast_ct:
            raise InputError("Give --ct (and --contrast-ct), or --input-dir for a cohort.")
        if args.case_id is not None:
            check_case_id(args.case_id, "--case-id")
        request = _request_from_args(args, args.ct, args.contrast_ct, args.case_id, args.out)
        return _run_worker(request, args, "segrap segment", _tasks_of(args, args.ct, args.contrast_ct)[1])
    if args.ct or args.contrast_ct or args.case_id:
        raise InputError("--input-dir processes a cohort: leave out --ct, --contrast-ct and --case-id.")
    failures = []
    part = cohort_part(args.part)
    cohort = _cohort_folders(args.input_dir)
    cases = part.of(cohort)
    if part.n > 1:
        print(f"part {part.k}/{part.n} ({part.source}): {len(cases)} of the cohort's {len(cohort)} cases"
              + ("; nothing to do, the cohort has fewer cases than parts" if not cases else ""), file=sys.stderr)
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
        note = _tasks_of(args, ct, contrast, args.input_dir / case_id)[1]
        if args.tasks is not None:  # a named task whose image this case lacks is left out, and said so
            left_out = [t for t, image in (("oar", ct), ("gtv", contrast)) if t in request.tasks and image is None]
            request.tasks = tuple(t for t in request.tasks if t not in left_out)
            if left_out:
                note = f"no {' or '.join('plain CT' if t == 'oar' else 'contrast CT' for t in left_out)} in " \
                       f"{args.input_dir / case_id}: {', '.join(left_out)} left out for this case."
        rc = _run_worker(request, args, f"[{number}/{len(cases)}] {case_id}", note)
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
                                   "in any of: the output folder of `segrap segment` (one case or a cohort), "
                                   ".seg.nrrd, case folders of <Structure>.nii.gz, the challenge's 4D .mha, "
                                   "Task001/Task002 label maps, a folder holding an RTSTRUCT beside its CT "
                                   "series; matched by case id.")
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
    flag = summary.get("review_flag")
    if flag:
        def f(v):
            return "-" if v is None else f"{v:.3f}"
        print(f"review flag: AUC {f(flag['auc'])} for DSC < 0.5, sensitivity {f(flag['sensitivity'])}, false flags "
              f"{f(flag['false_flags'])} ({flag['dsc_below_0.5']} of {flag['structures']} structures below 0.5)"
              f"{evaluate.left_out_of_review(flag)}")
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
    p.add_argument("--masks", action="store_true", help="also write the true structures as <case>.seg.nrrd, named "
                   "with the case id `segrap segment` gives the series (study-<hash of the study UID>), so "
                   "`segrap evaluate --ref OUT` matches them")
    p.set_defaults(func=_cmd_dicom_phantom)


def _cmd_dicom_phantom(args) -> int:
    from .phantom.dicom_series import write_variant

    written = write_variant(args.variant, args.out, index=args.index, seed=args.seed, size=args.size,
                            slices=args.slices)
    if args.masks:
        from .formats.dicom import study_case_id
        from .formats.segfile import write_seg_nrrd

        masks = dict(written.case.oar_masks()) | written.case.gtv_masks()
        truth = args.out / f"{study_case_id(written.study_uid)}.seg.nrrd"
        write_seg_nrrd(truth, masks, written.case.ct)
        print(truth)
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
# segrap send / segrap serve (the DICOM node: docs/node.md)
# --------------------------------------------------------------------------------------------


def _add_send(sub) -> None:
    p = sub.add_parser("send", help="send DICOM files (e.g. an RTSTRUCT) to a DICOM node: C-ECHO, then C-STORE")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="DICOM files, or folders searched for them")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the destination, e.g. TPS@10.0.0.5:104")
    p.add_argument("--calling-ae", default="SEGRAP", help="our AE title (default SEGRAP)")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    _add_tls(p, "the peer")
    p.set_defaults(func=_cmd_send)


SEND_WARNINGS_SHOWN = 5  # warning statuses printed one per line; the rest are counted


def _add_tls(p, peer: str) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM); with --tls-key and --tls-ca: mutual TLS")
    p.add_argument("--tls-key", metavar="FILE", help="our private key (PEM, unencrypted)")
    p.add_argument("--tls-ca", metavar="FILE", help=f"CA certificate(s) (PEM) that {peer} must be signed by")


def _cmd_send(args) -> int:
    import time

    from .node.address import parse_destination
    from .node.scu import send_files
    from .node.tls import tls_files

    if not args.verbose:  # pynetdicom logs two INFO lines per file; the summary below says what they would
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    t0 = time.monotonic()
    report = send_files(args.paths, parse_destination(args.to), args.calling_ae, timeout=args.timeout,
                        tls=tls_files(args.tls_cert, args.tls_key, args.tls_ca))
    for warning in report.warnings[:SEND_WARNINGS_SHOWN]:
        print(f"segrap send: warning: {warning}", file=sys.stderr)
    if len(report.warnings) > SEND_WARNINGS_SHOWN:
        print(f"segrap send: warning: {len(report.warnings) - SEND_WARNINGS_SHOWN} more file(s) stored with a "
              f"warning status (-v lists every store)", file=sys.stderr)
    warned = f", {len(report.warnings)} with a warning status" if report.warnings else ""
    print(f"sent {len(report.sent)} file(s) to {report.destination} in one association (C-ECHO answered; every "
          f"store accepted{warned}) in {time.monotonic() - t0:.1f} s")
    return EXIT_OK


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the DICOM auto-contouring node: CT studies in, RTSTRUCT out",
                       description="A Storage SCP that contours every complete CT study it receives and sends the "
                       "RTSTRUCT to the destinations. Flags win over the --config file.")
    p.add_argument("--config", type=Path, help="TOML file with the same settings (see docs/node.md)")
    p.add_argument("--status", action="store_true", help="print the queue of the node whose --spool is given, "
                   "and exit")
    p.add_argument("--rerun", metavar="STUDY_UID", help="contour this sent or failed study of --spool again (the "
                   "new RTSTRUCT replaces the earlier one at the destinations), and exit")
    p.add_argument("--redeliver", metavar="STUDY_UID", help="send this study's RTSTRUCT (the same file) to every "
                   "destination again, and exit")
    p.add_argument("--ae-title", help="the node's AE title (default SEGRAP)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only; the "
                   "address the scanners and PACS reach, or 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port to listen on (default 11112)")
    p.add_argument("--spool", type=Path, help="folder for received images, the database, outputs and the audit log")
    p.add_argument("--destination", action="append", default=[], metavar="AE@HOST:PORT",
                   help="where each RTSTRUCT is sent (repeatable)")
    p.add_argument("--allow-ae", action="append", default=[], metavar="AE",
                   help="accept associations only from these calling AE titles (repeatable; default any)")
    p.add_argument("--settle", type=float, help="a study is complete after this many seconds without a new "
                   "instance (default 30)")
    p.add_argument("--bundle", help="model bundle (installed name, folder or 'demo')")
    p.add_argument("--device", type=_device_argument, help="auto (default), cuda, cuda:N, mps or cpu")
    p.add_argument("--tasks", help="oar, gtv or oar,gtv (default both, as the study allows)")
    p.add_argument("--contour-holes", choices=("keyhole", "xor"), help="how holes are written in the RTSTRUCT")
    p.add_argument("--workers", type=int, help="jobs run at once (default one per GPU, one without GPUs)")
    p.add_argument("--threads", type=int, help="CPU threads of each worker")
    p.add_argument("--python", help="Python executable for the worker (default: this one)")
    p.add_argument("--min-free-mb", type=float, help="refuse C-STOREs with 0xA700 (out of resources) while the "
                   "spool's disk has less free space than this (default 1024)")
    p.add_argument("--max-instance-mb", type=float, help="refuse a data set larger than this with 0xA700 "
                   "(default 64); an association sending over twice as much for one data set is closed")
    p.add_argument("--keep-days", type=float, help="delete the images and outputs of studies sent or failed more "
                   "than this many days ago (default: keep them)")
    p.add_argument("--queue", metavar="postgresql://USER@HOST/DB", help="the queue in PostgreSQL, shared by several "
                   "nodes on one spool folder (default: SQLite in the spool, one node; docs/cluster.md)")
    p.add_argument("--node-name", help="this node's name in the shared queue (default HOST-PORT)")
    p.add_argument("--lease", type=float, help="seconds after a node's last heartbeat before another node takes "
                   "over its running jobs (default 60)")
    _add_tls(p, "every calling peer (scanner, PACS)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import signal

    from .errors import InputError
    from .node.config import load_config
    from .node.service import Node, requeue_study, status_text

    queue = args.queue or (load_config(args.config, spool=args.spool or ".").queue if args.config else None)
    if args.rerun or args.redeliver:
        if args.spool is None or (args.rerun and args.redeliver):
            raise InputError("--rerun or --redeliver STUDY_UID (one of them) needs --spool DIR (the node's spool).")
        print(requeue_study(args.spool, args.rerun or args.redeliver, redeliver=bool(args.redeliver), queue=queue))
        return EXIT_OK
    if args.status:
        if args.spool is None and queue is None:
            raise InputError("--status needs --spool DIR (the node's spool folder) or --queue URL (nodes sharing "
                             "a PostgreSQL queue).")
        print(status_text(args.spool, queue=queue))
        return EXIT_OK
    config = load_config(args.config, spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port,
                         destinations=args.destination, allow_ae=args.allow_ae, settle=args.settle,
                         bundle=args.bundle, device=args.device, tasks=args.tasks, contour_holes=args.contour_holes,
                         workers=args.workers, threads=args.threads, python=args.python,
                         min_free_mb=args.min_free_mb, max_instance_mb=args.max_instance_mb,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, keep_days=args.keep_days,
                         queue=args.queue, node_name=args.node_name, lease=args.lease)
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
