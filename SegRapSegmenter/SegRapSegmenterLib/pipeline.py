"""The whole job: CT (+ contrast CT) -> both tasks -> 47 overlapping structures -> outputs with provenance.

Outputs are written into a staging folder inside the output folder and moved into place only when
all of them are complete, so a failed or cancelled run leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import __version__
from .anatomy import structures as S
from .anatomy.qa import structure_report
from .anatomy.review import (OUTSIDE_REVIEW_ABOVE, REMOVED_REVIEW_ABOVE, review_structure, review_tags,
                             summary_line)
from .arrays import CroppedMasks, uint8_image
from .console import StageEstimate
from .errors import DicomError, InputError, OutputError
from .formats.dicom import SeriesInfo, choose_ct_series, discover_series, series_case_id, study_case_id
from .formats.identity import check_identity_of_files, check_pair, identity_of_series
from .formats.imaging import VolumeSource, check_volume_header, contrast_on_ct_grid, read_volume
from .inference.body import THRESHOLD_HU as BODY_THRESHOLD_HU
from .inference.body import body_of_image
from .inference.bundles import Bundle, resolve_bundle, sha256_file, verify_bundle
from .inference.certainty import expected_dice
from .inference.statistics import load_statistics, volume_range
from .inference.devices import pick_device
from .inference.predictor import InferenceOptions, TaskPredictor, describe_device
# the request and its checks live with the runner, which the CLI's process imports without numpy;
# they are this module's API too (docs/command-line.md: ``from SegRapSegmenterLib.pipeline import SegmentRequest, run``)
from .runner import (STAGING_PREFIX, TASKS, SegmentRequest, acquire_case_lock, check_case_id,  # noqa: F401
                     default_case_id, is_staging_of, release_case_lock, request_paths, staging_path)

log = logging.getLogger(__name__)

Progress = Callable[[str, float, str], None]  # stage, fraction of the whole job, message
Warn = Callable[[str], None]


@dataclass
class SegmentResult:
    """Where the outputs are, and what the run warned about."""

    case_id: str
    outputs: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    review: str = ""  # one line naming the structures to review (``anatomy.review.summary_line``)
    flagged: list[str] = field(default_factory=list)


def _check_request(req: SegmentRequest) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(req.tasks))
    if not tasks or any(t not in TASKS for t in tasks):
        raise InputError(f"--tasks must be 'oar', 'gtv' or both, got {','.join(req.tasks) or 'nothing'}.")
    if req.structures is not None:
        chosen = S.select(list(req.structures))
        wanted = {s.task for s in chosen}
        tasks = tuple(t for t in tasks if t in wanted)
        if not tasks:
            raise InputError("None of the requested --structures belongs to the requested --tasks.")
    if "oar" in tasks and not req.ct:
        raise InputError("The organs at risk (--tasks oar) are contoured on the plain CT: give --ct.")
    if "gtv" in tasks and not req.contrast_ct:
        raise InputError("The tumour volumes (--tasks gtv) are contoured on the contrast CT: give --contrast-ct, "
                         "or run --tasks oar.")
    if req.rtstruct and req.ct and not Path(req.ct).is_dir():
        raise InputError(f"--rtstruct needs the CT as a DICOM series folder (it references the CT's DICOM "
                         f"instances); {req.ct} is a file.")
    if not 0 < req.tile_step_size <= 1:
        raise InputError(f"--step must be in (0, 1], got {req.tile_step_size}.")
    return tasks


def request_case_id(req: SegmentRequest, named: str | None = None,
                    dicom: dict[str, SeriesInfo] | None = None) -> str:
    """The case id of a request: ``--case-id``; for a DICOM input, its study's (``formats.dicom.study_case_id``, as
    the node names cases, so a folder ``.../CT`` is not named after its parent); else from the input file's name.

    ``dicom``: the inputs' series as ``discover_dicom`` found them (the study of the CT series read); without it the
    first matching file's header is read."""
    named = named or request_paths(req)[0]
    role, source, series = ("ct", req.ct, req.ct_series) if req.ct else ("contrast", req.contrast_ct,
                                                                         req.contrast_series)
    if req.case_id or not source or not Path(source).is_dir():
        return named
    found = (dicom or {}).get(role)
    study = (study_case_id(found.study_uid) if found.study_uid else None) if found else series_case_id(source, series)
    return check_case_id(study or named, "the case id taken from the DICOM study")


def discover_dicom(req: SegmentRequest, tasks: tuple[str, ...]) -> dict[str, SeriesInfo]:
    """The CT series of each DICOM folder the run reads (``ct``; ``contrast`` when Task 2 runs), each file's header
    read once: the case id, the identity check and the reader all take the series from here."""
    found = {}
    for role, path, series, wanted in (("ct", req.ct, req.ct_series, True),
                                       ("contrast", req.contrast_ct, req.contrast_series, "gtv" in tasks)):
        if wanted and path and Path(path).is_dir():
            found[role] = choose_ct_series(path, discover_series(path), series)
    return found


def _check_inputs(req: SegmentRequest, tasks: tuple[str, ...]) -> None:
    """The input images' paths, types and headers (no voxels): a typo fails here, before the model is touched."""
    if req.ct:
        check_volume_header(req.ct, "CT")
    if "gtv" in tasks:
        check_volume_header(req.contrast_ct, "Contrast CT")


def _check_out_dir(out_dir: Path) -> None:
    """Fail early when the output folder could not be written; it is created for the case's lock and removed again
    when the run fails and leaves it empty."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Output folder {out_dir}: cannot be created ({existing} is a file, not a folder); choose "
                          f"another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "not writable" if existing == out_dir else f"cannot be created ({existing} is not writable)"
        raise OutputError(f"Output folder {out_dir}: {what}; choose another --out.")


# --------------------------------------------------------------------------------------------
# The worker's memory (glibc's allocator)
# --------------------------------------------------------------------------------------------


def _glibc():
    """The C library when it is glibc (Linux), else None."""
    import ctypes

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """On glibc, keep blocks of up to 512 MiB that are freed in the heap for reuse instead of unmapping them.

    Every sliding-window tile allocates and frees the same tensors (Task 1's scores alone are 95 MB
    a tile on the CPU). Above glibc's mmap threshold (at most 32 MiB by default) each is a fresh
    mapping whose pages the kernel faults in and zeroes again, tile after tile; kept in the heap
    they are reused. Measured on the full phantom's Task 1 (2 CPU cores): 10.6 -> 8.6 s, the
    process's peak within noise (1.33-1.41 GB without, 1.42 GB with). Elsewhere (macOS, Windows,
    musl) nothing is changed. The worker sets this for its process; ``run`` gives the kept blocks back
    after each task (``give_back_freed_memory``), so they do not add to the next stage's peak.
    Returns whether both settings took.
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h; values are C ints
    # free memory at the heap's top is given back only beyond 1 GiB, so a tile's blocks stay for the next
    return bool(mallopt(m_mmap_threshold, 512 << 20)) & bool(mallopt(m_trim_threshold, 1 << 30))


def give_back_freed_memory() -> None:
    """Return the heap's free blocks to the system (glibc's malloc_trim; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# --------------------------------------------------------------------------------------------
# Post-processing and QA
# --------------------------------------------------------------------------------------------


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a mask (the mask itself when it has one or none)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@dataclass
class Cleanup:
    """What post-processing did: the steps per structure, and the share of its predicted voxels it removed."""

    steps: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, float] = field(default_factory=dict)


def postprocess(masks: CroppedMasks, keep_largest: bool, fill: bool) -> Cleanup:
    """Per-structure clean-up in place, each on its own crop; returns what was done to each structure.

    Both steps give the same result on the bounding box as on the full grid: components do not
    change, and background touching the box's edge is outside the structure either way.
    """
    done = Cleanup()
    for name in list(masks):
        box, mask = masks.crop(name)
        steps = []
        if keep_largest and S.get(name).single_component and mask.any():
            kept = keep_largest_component(mask)
            before = int(mask.sum())
            removed = before - int(kept.sum())
            if removed:
                mask = kept
                done.removed[name] = removed / before
                steps.append(f"removed {removed} voxels ({removed / before:.0%}) outside the largest component")
        if fill and mask.any():
            filled = ndimage.binary_fill_holes(mask)
            added = int(filled.sum() - mask.sum())
            if added:
                mask = filled
                steps.append(f"filled {added} hole voxels")
        if steps:
            masks.put(name, box, mask)
            done.steps[name] = steps
    return done


def _structures_of(task: str, labels: np.ndarray, shape, req: SegmentRequest) -> tuple[CroppedMasks, Cleanup]:
    """A task's label map as cropped structure masks, cleaned up (``postprocess``)."""
    masks = CroppedMasks(shape)
    if task == "oar":
        recomposed = S.recompose(labels)
        for name in S.OAR_NAMES:
            masks.put(name, *recomposed.crop(name))
    else:
        for name, mask in S.recompose_gtv(labels).items():
            masks.put_full(name, mask)
    return masks, postprocess(masks, req.keep_largest_component, req.fill_holes)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"segrap": __version__, "python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "SimpleITK", "numpy", "pydicom"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _input_record(source: VolumeSource) -> dict:
    record = {"path": str(source.path), "kind": source.kind, "size": list(source.image.GetSize()),
              "spacing": list(source.image.GetSpacing()), "origin": list(source.image.GetOrigin()),
              "direction": list(source.image.GetDirection())}
    if source.path.is_file():
        record["sha256"] = sha256_file(source.path)
    if source.notes:
        record["notes"] = list(source.notes)
    return record


def _check_identity(req: SegmentRequest, tasks: tuple[str, ...],
                    dicom: dict[str, SeriesInfo] | None = None) -> tuple[dict, list[str]]:
    """The inputs' identity record and warnings (``identity.check_pair``), from the DICOM headers alone, before the
    model: InputError for two patients. Image files have none: for those a caller wrote from DICOM volumes, the
    DICOM files it names (``identity_files``, Slicer) are checked, or its own record (``identity``) stands.
    ``dicom``: the series ``discover_dicom`` found (discovered here when not given)."""
    contrast_path = req.contrast_ct if "gtv" in tasks else None
    if req.identity_files is not None:
        return check_identity_of_files(req.identity_files, contrast_path is not None, req.register,
                                        req.patient_values_in_errors)
    dicom = discover_dicom(req, tasks) if dicom is None else dicom

    def of(role: str, path: str | None):
        return identity_of_series(path, dicom[role]) if role in dicom else None

    record, warnings = check_pair(of("ct", req.ct), of("contrast", contrast_path),
                                  ct_path=req.ct, contrast_path=contrast_path, register=req.register,
                                  patient_values=req.patient_values_in_errors)
    if req.identity and record.get("patient", "").startswith("not checked"):
        # files written by a caller that checked where they came from itself: its check stands, said again here
        record = dict(req.identity)
        warnings = list(record.pop("warnings", []))
    return record, warnings


def run(req: SegmentRequest, progress: Progress | None = None, warn: Warn | None = None) -> SegmentResult:
    """Run the job of a request; returns the outputs' paths (see the module docstring for guarantees).

    The cheap checks come first (names, input paths and file headers, the device, the output folder),
    then the case's lock in the output folder (a second run of the same case stops with CaseBusyError),
    and only then the model bundle and the images' voxels.
    """
    t_start = time.perf_counter()
    tasks = _check_request(req)
    case_id, staging = request_paths(req)
    _check_inputs(req, tasks)
    dicom = discover_dicom(req, tasks)  # each DICOM file's header read once, for all that follows
    case_id = request_case_id(req, case_id, dicom)
    identity = _check_identity(req, tasks, dicom)  # one patient: refused here, before the model and any output
    pick_device(req.device)
    _check_out_dir(Path(req.out_dir))
    lock = acquire_case_lock(req.out_dir, case_id, staging)
    succeeded = False
    try:
        result = _segment(req, tasks, case_id, staging, t_start, progress, warn, identity, dicom)
        succeeded = True
        return result
    finally:
        release_case_lock(lock, succeeded)


def _segment(req: SegmentRequest, tasks: tuple[str, ...], case_id: str, staging: Path, t_start: float,
             progress: Progress | None, warn: Warn | None, identity: tuple[dict, list[str]],
             dicom: dict[str, SeriesInfo]) -> SegmentResult:
    """``run``'s work once its checks passed and it holds the case's lock."""
    progress = progress or (lambda stage, fraction, message: None)
    warnings: list[str] = []

    def warning(message: str) -> None:
        warnings.append(message)
        log.warning(message)
        if warn:
            warn(message)

    for message in identity[1]:
        warning(message)

    timings: dict[str, float] = {}
    out_dir = Path(req.out_dir)

    progress("model", 0.0, "checking the model bundle")
    t0 = time.perf_counter()
    bundle: Bundle = resolve_bundle(req.bundle)
    for task in tasks:
        bundle.task(task)
    verification = verify_bundle(bundle, quick=True)
    statistics = load_statistics(bundle)  # the training set's volumes, for the review's plausibility check
    timings["verify_bundle"] = time.perf_counter() - t0

    progress("read", 0.02, "reading the images")
    t0 = time.perf_counter()
    ct = read_volume(req.ct, "CT", req.ct_series, dicom.get("ct")) if req.ct else None
    contrast = None
    if "gtv" in tasks and ct is None:
        contrast = read_volume(req.contrast_ct, "Contrast CT", req.contrast_series, dicom.get("contrast"))
    # (the contrast CT's header was checked with the CT's; its voxels are read when Task 2 starts, so they are
    # not held while Task 1 runs)
    reference = ct.image if ct is not None else contrast.image
    if req.rtstruct and ct is not None and ct.dicom is not None and not ct.dicom.series.frame_of_reference_uid:
        raise DicomError(f"{req.ct}: the CT series has no FrameOfReferenceUID, so an RTSTRUCT cannot reference it. "
                         f"Export the series again from the scanner or PACS, or leave out --rtstruct.")
    give_back_freed_memory()  # the readers' decompression buffers (30 MB for a 512 x 512 x 126 .nii.gz)
    timings["read"] = time.perf_counter() - t0

    options = InferenceOptions(device=req.device, folds=req.folds, mirror=req.mirror,
                               tile_step_size=req.tile_step_size, threads=req.threads, low_memory=req.low_memory)
    # the body is found once, on the CT (the contrast CT is put on its grid), and both tasks skip the rest
    t0 = time.perf_counter()
    body = body_of_image(reference)  # its box limits both tasks; its tight box tells a contour outside the patient
    box = body.box
    if not box.found:
        warning(f"No patient body found in {req.ct or req.contrast_ct} (nothing above {BODY_THRESHOLD_HU:.0f} HU "
                f"after the opening): the whole image is processed.")
    timings["body"] = time.perf_counter() - t0
    masks = CroppedMasks(sitk.GetArrayViewFromImage(reference).shape)
    inference_record: dict[str, dict] = {}
    # Task 1's labels are turned into structures and cleaned up on a second thread while Task 2 runs
    background = ThreadPoolExecutor(max_workers=1)
    pending = []
    alignment = None
    certainty: dict[str, float] = {}  # expected Dice per structure (inference.certainty)
    span = {"oar": (0.05, 0.75), "gtv": (0.75, 0.92)} if len(tasks) == 2 else {tasks[0]: (0.05, 0.92)}
    for task in tasks:
        lo, hi = span[task]
        if task == "gtv" and contrast is None:
            progress("read", lo, "reading the contrast CT")
            t0 = time.perf_counter()
            contrast = read_volume(req.contrast_ct, "Contrast CT", req.contrast_series, dicom.get("contrast"))
            give_back_freed_memory()
            timings["read"] += time.perf_counter() - t0
        progress(f"{task}-model", lo, f"loading the {task} model")
        t0 = time.perf_counter()
        predictor = TaskPredictor(bundle, task, options)
        image = ct.image if task == "oar" else None
        if task == "gtv":
            if ct is not None:
                image, alignment = contrast_on_ct_grid(ct, contrast, register=req.register)
                for note in alignment.notes:
                    warning(note)
            else:
                image = contrast.image
        progress(f"{task}-inference", lo, f"running the {task} model on {describe_device(predictor.device)}")
        estimate = StageEstimate()  # the time left of the task, from the rate its tiles are measured to go at
        labels = predictor.predict(image, lambda f, lo=lo, hi=hi, task=task, estimate=estimate: progress(
            f"{task}-inference", lo + (hi - lo) * f, f"{task}: {f:.0%} of the sliding window{estimate.text(f)}"),
            box=box if task == "oar" or ct is not None else None, warn=warning)
        timings[f"{task}_inference"] = time.perf_counter() - t0
        if predictor.class_table is not None:
            certainty.update(expected_dice(task, predictor.class_table))
        pending.append(background.submit(_structures_of, task, labels, masks.shape, req))
        del labels
        inference_record[task] = {"folds": list(predictor.folds), "device": describe_device(predictor.device),
                                  "test_time_mirroring_axes": list(predictor.mirroring_axes or []),
                                  "test_time_mirroring_swaps_left_right": predictor.swaps_left_right,
                                  "tile_step_size": req.tile_step_size,
                                  "orientation": predictor.orientation_note(image), **predictor.last_run}
        if predictor.device.type == "cuda":
            import torch

            inference_record[task]["peak_gpu_memory_gib"] = round(
                torch.cuda.max_memory_allocated(predictor.device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(predictor.device)
        del predictor
        give_back_freed_memory()  # what the task's tiles kept in the heap (reuse_freed_memory)

    progress("postprocess", 0.92, "post-processing and checking the structures")
    t0 = time.perf_counter()
    cleanup = Cleanup()
    try:
        for future in pending:
            task_masks, task_cleanup = future.result()
            for name in task_masks:
                masks.put(name, *task_masks.crop(name))
            cleanup.steps.update(task_cleanup.steps)
            cleanup.removed.update(task_cleanup.removed)
    finally:
        background.shutdown(cancel_futures=True)
    if req.structures is not None:
        keep = {s.name for s in S.select(list(req.structures))}
        masks = masks.subset(keep)
    structures, qa_warnings = structure_report(masks, reference)
    for message in qa_warnings:
        warning(message)
    for name, fraction in cleanup.removed.items():
        if name in structures and fraction > REMOVED_REVIEW_ABOVE:
            removed_ml = structures[name]["volume_ml"] * fraction / (1.0 - fraction)
            warning(f"{name}: post-processing removed {fraction:.0%} of the predicted voxels ({removed_ml:.1f} ml "
                    f"outside the largest component): check the contour")
    outside = {name: body.outside_fraction(*masks.crop(name)) for name in structures}
    for name, fraction in outside.items():
        if fraction > OUTSIDE_REVIEW_ABOVE:
            warning(f"{name}: {fraction:.0%} of the contour lies outside the patient's body: check the contour and "
                    f"the image")
    reviews = {name: review_structure(voxels=entry["voxels"], flags=entry["flags"], certainty=certainty.get(name),
                                      removed_fraction=cleanup.removed.get(name, 0.0), volume_ml=entry["volume_ml"],
                                      volume_range_ml=volume_range(statistics, name),
                                      outside_fraction=outside[name])
               for name, entry in structures.items()}
    for name, entry in structures.items():
        entry.update(reviews[name].record())
    review_line = summary_line(reviews)
    timings["postprocess"] = time.perf_counter() - t0

    progress("write", 0.95, "writing the outputs")
    t0 = time.perf_counter()
    provenance = {
        "case_id": case_id, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": _versions(), "bundle": bundle.summary() | {"verification": verification.summary()},
        "tasks": list(tasks), "inference": inference_record,
        "inputs": {"ct": _input_record(ct) if ct else None, "contrast_ct": _input_record(contrast) if contrast else None,
                   "identity": identity[0]},
        "contrast_alignment": asdict(alignment) if alignment else None,
        "postprocessing": {"keep_largest_component": req.keep_largest_component, "fill_holes": req.fill_holes,
                           "changes": cleanup.steps},
        "structures": structures, "review": {"summary": review_line, "flagged": [n for n, r in reviews.items()
                                                                                 if r.review],
                                             "method": "docs/quality.md", "certainty_measured": sorted(certainty),
                                             "plausibility": (f"volumes against the bundle's training statistics "
                                                              f"({statistics.get('cases')} cases)") if statistics
                                             else "not checked: the bundle carries no training statistics"},
        "warnings": warnings, "timings_s": {},
        "empty_structures": {"names": [n for n in masks if not masks.crop(n)[1].any()],
                             "handling": "kept: an empty segment (tag SegRap.Empty) in the .seg.nrrd, a ROI without "
                                         "contours marked EMPTY in the RTSTRUCT"},
        "notice": "Automatically generated contours: review and edit before clinical use.",
    }
    outputs = _write_outputs(req, case_id, masks, reference, ct, provenance, staging, out_dir, timings, t_start, t0,
                             warning)
    progress("done", 1.0, f"wrote {len(outputs)} outputs to {out_dir}")
    return SegmentResult(case_id, outputs, warnings, review_line, [n for n, r in reviews.items() if r.review])


def output_names(case_id: str) -> dict[str, str]:
    """Every name a run of ``case_id`` may write into its output folder, by output key (the provenance last);
    ``segrap evaluate`` reads the same names (``formats.maskfiles``)."""
    from .formats.maskfiles import segment_output_names

    return segment_output_names(case_id)


def _output_record(key: str, path: Path) -> dict:
    """What provenance says of one output: its name and sha256 (per file for a folder); the RTSTRUCT's UID."""
    if path.is_dir():
        return {"folder": path.name, "files": {p.name: sha256_file(p) for p in sorted(path.iterdir())}}
    record = {"file": path.name, "sha256": sha256_file(path)}
    if key == "rtstruct":
        import pydicom

        record["sop_instance_uid"] = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return record


def _previous_set(out_dir: Path, case_id: str) -> tuple[list[str], str | None]:
    """The outputs an earlier run of the case left in the folder, and when that run wrote them (if its provenance says)."""
    names = [name for name in output_names(case_id).values() if (out_dir / name).exists()]
    try:
        created = json.loads((out_dir / f"{case_id}.provenance.json").read_text()).get("created_utc")
    except (OSError, ValueError, AttributeError):
        created = None
    return names, created


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_outputs(req: SegmentRequest, case_id: str, masks: CroppedMasks, reference: sitk.Image,
                   ct: VolumeSource | None, provenance: dict, staging: Path, out_dir: Path, timings: dict,
                   t_start: float, t_write: float, warning: Warn = log.warning) -> dict[str, str]:
    """Write the outputs into the staging folder, then replace the case's earlier outputs with them as one set.

    The earlier set's provenance goes first (a set without provenance is incomplete: a cohort run
    does it again), then the new files are moved into place, then what the earlier set had and the
    new one lacks is removed, and the new provenance, which lists every output with its sha256,
    comes last.
    """
    from .formats.maskfiles import write_challenge_mha
    from .formats.segfile import write_seg_nrrd

    if staging.exists():
        shutil.rmtree(staging)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder
        for old in out_dir.iterdir():  # staging folders of this case's runs that were killed (the lock is ours)
            if old.is_dir() and not old.is_symlink() and is_staging_of(old.name, case_id):
                shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"Output folder {out_dir}: cannot write ({exc.strerror}).") from exc
    file_names = output_names(case_id)
    try:
        names: dict[str, Path] = {"segmentation": staging / file_names["segmentation"]}
        write_seg_nrrd(names["segmentation"], masks, reference, provenance={
            "model": {"name": provenance["bundle"]["name"], "version": provenance["bundle"]["version"]},
            "case_id": case_id, "notice": provenance["notice"], "empty_structures": provenance["empty_structures"],
            "review": provenance["review"]}, segment_tags=review_tags(provenance["structures"]))
        if req.nifti:
            folder = staging / file_names["nifti"]
            folder.mkdir()
            for name in masks:
                sitk.WriteImage(uint8_image(masks[name], reference), str(folder / f"{name}.nii.gz"), useCompression=True)
            names["nifti"] = folder
            for task, task_names in (("oar", S.OAR_NAMES), ("gtv", S.GTV_NAMES)):
                if any(n in masks for n in task_names):
                    path = staging / file_names[f"challenge_{task}"]
                    write_challenge_mha(path, masks.subset(task_names), task,
                                        reference.GetSpacing()[::-1], reference)
                    names[f"challenge_{task}"] = path
        if req.rtstruct:
            from .formats.rtstruct import write_rtstruct

            path = staging / file_names["rtstruct"]
            notes = list(ct.notes) + [f"{name}: {'; '.join(steps)}" for name, steps in
                                      provenance["postprocessing"]["changes"].items()]
            write_rtstruct(masks, ct.dicom, path, model_name=provenance["bundle"]["name"],
                           model_version=provenance["bundle"]["version"], roi_names=req.roi_names, notes=notes,
                           contour_holes=req.contour_holes, review={
                               name: f"{'; '.join(e['review_reasons'])} (confidence {e['confidence']:.2f})"
                               for name, e in provenance["structures"].items() if e.get("review")})
            names["rtstruct"] = path
        provenance["outputs"] = {key: _output_record(key, path) for key, path in names.items()}
        previous, previous_created = _previous_set(out_dir, case_id)
        stale = [name for name in previous if name not in {p.name for p in names.values()}
                 and name != file_names["provenance"]]
        if previous:
            provenance["replaced"] = {"previous_created_utc": previous_created, "removed": stale}
            warning(f"Replaced the outputs of an earlier run of {case_id} in {out_dir}"
                    + (f" (written {previous_created})" if previous_created else "")
                    + (f"; removed what the new set lacks: {', '.join(stale)}" if stale else "") + ".")
        timings["write"] = time.perf_counter() - t_write
        timings["total"] = time.perf_counter() - t_start
        provenance["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        names["provenance"] = staging / file_names["provenance"]
        names["provenance"].write_text(json.dumps(provenance, indent=1))
        _remove(out_dir / file_names["provenance"])
        final: dict[str, str] = {}
        for key, path in names.items():
            target = out_dir / path.name
            if key == "provenance":
                for name in stale:
                    _remove(out_dir / name)
            else:
                _remove(target)
            os.replace(path, target)
            final[key] = str(target)
        return final
    except OSError as exc:
        raise OutputError(f"Output folder {out_dir}: writing failed ({exc}).") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
