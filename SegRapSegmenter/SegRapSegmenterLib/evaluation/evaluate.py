"""Evaluate predictions against references with the SegRap metrics, and write the CSV, JSON and Markdown reports.

Cases are matched by id between the two folders (any format of ``maskfiles``; the two sides may
differ). Each case is read, checked to share the reference's grid, scored structure by structure
(``metrics``) and, when an output folder is given, drawn as a montage of its worst structures
before the next case is read, so memory holds one case at a time. Summaries follow the challenge
tables: per structure the mean and standard deviation over cases of the per-case values rounded
to 4 decimals; per task the mean of the structure means.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..anatomy import structures as S
from ..arrays import Crop
from ..errors import GeometryError, InputError
from ..formats import maskfiles as F
from . import metrics as M
from .quality import Reviewed, review_figures, review_of

log = logging.getLogger("segrap.evaluate")

CSV_NAME, JSON_NAME, REPORT_NAME, BOXPLOT_NAME, MONTAGE_DIR = (
    "scores.csv", "summary.json", "report.md", "boxplot.png", "montages")

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseScore:
    """One structure of one case, with a note when something about it is worth knowing."""

    case_id: str
    score: M.StructureScore
    note: str = ""

    @property
    def structure(self) -> str:
        return self.score.structure

    @property
    def task(self) -> str:
        return S.get(self.score.structure).task


@dataclass
class Evaluation:
    """Every score of a run, the cases that could not be matched, and notes for the report."""

    reference: Path
    prediction: Path
    rows: list[CaseScore] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    reference_only: list[str] = field(default_factory=list)
    prediction_only: list[str] = field(default_factory=list)
    formats: dict[str, set[str]] = field(default_factory=lambda: {"reference": set(), "prediction": set()})
    class_dice: dict[str, np.ndarray] = field(default_factory=dict)  # case -> Dice of the 54 classes
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    reviewed: list[Reviewed] = field(default_factory=list)  # each scored structure's confidence and review flag
    unreadable_provenance: dict[str, str] = field(default_factory=dict)  # case -> why its review flags are left out

    def structures(self) -> list[str]:
        """Structures scored in at least one case, in catalogue order."""
        present = {r.structure for r in self.rows}
        return [n for n in S.STRUCTURE_NAMES if n in present]

    def values(self, structure: str, metric: str) -> np.ndarray:
        """The rounded per-case values of one structure (``metric`` is ``dsc`` or ``nsd``)."""
        return np.array([getattr(r.score, metric) for r in self.rows if r.structure == structure], dtype=float)

    def worst(self, n: int = 10) -> list[CaseScore]:
        """The ``n`` lowest-scoring structure-case pairs (by DSC, then NSD)."""
        return sorted(self.rows, key=lambda r: (r.score.dsc_exact, r.score.nsd_exact, r.case_id))[:n]

    def summary(self) -> dict:
        """The JSON summary: per structure, per task and overall means and standard deviations."""
        per_structure = {}
        for name in self.structures():
            dsc, nsd_ = self.values(name, "dsc"), self.values(name, "nsd")
            per_structure[name] = {
                "task": S.get(name).task, "tolerance_mm": S.get(name).nsd_tolerance_mm, "cases": int(dsc.size),
                "dsc_mean": _r(dsc.mean()), "dsc_std": _r(dsc.std()), "dsc_min": _r(dsc.min()),
                "nsd_mean": _r(nsd_.mean()), "nsd_std": _r(nsd_.std()), "nsd_min": _r(nsd_.min())}
        tasks = {}
        for task in F.TASKS:
            names = [n for n in per_structure if per_structure[n]["task"] == task]
            if names:
                tasks[task] = self._group(names, per_structure)
        summary = {
            "tool": f"segrap evaluate {__version__}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reference": str(self.reference), "prediction": str(self.prediction),
            "formats": {k: sorted(v) for k, v in self.formats.items()},
            "cases": list(self.cases),
            "unmatched": {"reference_only": self.reference_only, "prediction_only": self.prediction_only},
            "definitions": {
                "values": "per-case DSC and NSD rounded to 4 decimals as the organizers' script does",
                "structure_mean_std": "mean and population standard deviation (ddof=0) over cases",
                "task_mean": "mean over the task's structures of the structure means",
                "task_std": "standard deviation over cases of each case's mean over the task's structures",
                "nsd": "surface Dice at the structure's tolerance_mm (DeepMind definition, surfel areas)",
                "class_dice_54": "Dice of the 54 Task 1 classes: per class mean over cases (classes absent "
                                 "from both maps left out), then mean over classes (DKFZ poster figure)",
            },
            "tasks": tasks,
            "overall": self._group(list(per_structure), per_structure) if per_structure else None,
            "structures": per_structure,
            "class_dice_54": self._class_dice_summary(),
            "review_flag": self._review_summary(),
            "notes": self.notes,
        }
        return summary

    def _review_summary(self) -> dict | None:
        """How the runs' confidence and review flag ranked against the DSC, and the cases whose provenance could not
        be read (so left out); None when no run recorded them and no provenance was unreadable."""
        if not self.reviewed and not self.unreadable_provenance:
            return None
        return {**review_figures(self.reviewed),
                "unreadable_provenance": dict(self.unreadable_provenance),
                "definition": "auc: P(confidence of a structure with DSC < 0.5 < that of one with DSC >= 0.5); "
                              "sensitivity: share of DSC < 0.5 flagged; false_flags: share of DSC >= 0.9 flagged; "
                              "structures absent from both reference and prediction left out (docs/quality.md); "
                              "unreadable_provenance: cases left out of these figures, with why"}

    def _group(self, names: list[str], per_structure: dict) -> dict:
        per_case: dict[str, dict[str, list[float]]] = {}
        for r in self.rows:
            if r.structure in names:
                entry = per_case.setdefault(r.case_id, {"dsc": [], "nsd": []})
                entry["dsc"].append(r.score.dsc)
                entry["nsd"].append(r.score.nsd)
        case_dsc = np.array([np.mean(v["dsc"]) for v in per_case.values()])
        case_nsd = np.array([np.mean(v["nsd"]) for v in per_case.values()])
        return {"structures": len(names), "cases": len(per_case),
                "dsc_mean": _r(np.mean([per_structure[n]["dsc_mean"] for n in names])),
                "dsc_std": _r(case_dsc.std()),
                "nsd_mean": _r(np.mean([per_structure[n]["nsd_mean"] for n in names])),
                "nsd_std": _r(case_nsd.std())}

    def _class_dice_summary(self) -> dict | None:
        if not self.class_dice:
            return None
        stack = list(self.class_dice.values())
        with np.errstate(invalid="ignore"):
            per_class = {S.CLASS_NAMES[i + 1]: (None if math.isnan(v) else _r(v))
                         for i, v in enumerate(_nanmean_columns(stack))}
        return {"cases": len(stack), "mean": _r(M.mean_class_dice(stack)), "per_class": per_class}


def _nanmean_columns(rows: list[np.ndarray]) -> np.ndarray:
    stack = np.vstack(rows)
    counts = np.sum(~np.isnan(stack), axis=0)
    sums = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _r(value: float) -> float:
    return round(float(value), 4)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _check_task(task: str | None) -> str | None:
    if task is not None and task not in F.TASKS:
        raise InputError(f"--task must be one of {', '.join(F.TASKS)}, got {task!r}.")
    return task


def _single_task(names: tuple[str, ...]) -> str | None:
    tasks = {S.get(n).task for n in names}
    return tasks.pop() if len(tasks) == 1 else None


def _check_grids(ref: F.CaseSource, pred: F.CaseSource, notes: list[str]) -> None:
    why = ref.geometry.mismatch(pred.geometry)
    if why:
        raise GeometryError(
            f"The prediction {pred.path} and the reference {ref.path} are on different grids ({why}). "
            f"Predictions must be on the reference CT's grid: resample the prediction (nearest neighbour) "
            f"onto the reference image, or evaluate against the matching reference.")
    for side, other in ((ref, pred), (pred, ref)):
        if not side.geometry.positioned and other.geometry.positioned:
            notes.append(f"{side.case_id}: {side.path.name} carries no origin or direction (as the challenge's 4D "
                         f".mha); it was matched to {other.path.name} by shape and spacing only.")


def score_case(ref: F.CaseSource, pred: F.CaseSource, task: str | None = None,
               notes: list[str] | None = None) -> list[CaseScore]:
    """Scores of one case: the reference's structures of the task(s) the prediction covers."""
    notes = [] if notes is None else notes
    _check_grids(ref, pred, notes)
    pred_names = set(pred.names())
    tasks = {task} if task else {S.get(n).task for n in pred_names}
    wanted = [n for n in ref.names() if S.get(n).task in tasks]
    if not wanted:
        raise InputError(f"{ref.path} holds none of the structures to evaluate "
                         f"({'task ' + task if task else 'those of ' + str(pred.path)}).")
    spacing = ref.geometry.spacing
    rows = []
    for name in wanted:
        note = ""
        if name in pred_names:
            pred_mask = pred.crop(name)
        else:
            pred_mask = M.Crop.empty(ref.geometry.shape)
            note = "not in prediction: scored as empty"
        rows.append(CaseScore(ref.case_id, M.score_structure(name, ref.crop(name), pred_mask, spacing), note))
    missing = [n for n in S.STRUCTURE_NAMES if S.get(n).task in tasks and n not in ref.names()]
    if missing:
        notes.append(f"{ref.case_id}: the reference holds no {', '.join(missing)}; not evaluated.")
    return rows


def evaluate(prediction: str | Path, reference: str | Path, task: str | None = None, *,
             on_case: Callable[[F.CaseSource, F.CaseSource, list[CaseScore]], None] | None = None) -> Evaluation:
    """Score every case found in both ``prediction`` and ``reference`` (folders of cases, or single cases).

    ``task`` (``oar`` or ``gtv``) limits the structures and tells label maps which task they hold;
    without it, each case is scored on the reference's structures of the task(s) the prediction
    covers. ``on_case`` is called with the open sources and the rows of each case (for pictures).
    """
    task = _check_task(task)
    pred_root, ref_root = Path(prediction), Path(reference)
    preds, refs = F.find_cases(pred_root), F.find_cases(ref_root)
    if len(preds) == 1 and len(refs) == 1 and set(preds) != set(refs):
        # two single cases named differently (result.seg.nrrd vs segrap_0001/): pair them
        (pid, pentry), = preds.items()
        (rid, _), = refs.items()
        preds = {rid: pentry}
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(f"No case id appears in both {pred_root} (cases: {_few(preds)}) and {ref_root} "
                         f"(cases: {_few(refs)}). Name prediction files after the reference cases.")
    result = Evaluation(ref_root, pred_root, cases=common,
                        reference_only=sorted(set(refs) - set(preds)),
                        prediction_only=sorted(set(preds) - set(refs)))
    if result.reference_only:
        result.notes.append(f"{len(result.reference_only)} reference case(s) have no prediction and were not "
                            f"evaluated: {', '.join(result.reference_only[:20])}")
    if result.prediction_only:
        result.notes.append(f"{len(result.prediction_only)} prediction(s) have no reference: "
                            f"{', '.join(result.prediction_only[:20])}")
    for i, case_id in enumerate(common, start=1):
        ref = refs[case_id].open(task)
        pred = preds[case_id].open(task or _single_task(ref.names()))
        result.formats["reference"].add(ref.format)
        result.formats["prediction"].add(pred.format)
        rows = score_case(ref, pred, task, result.notes)
        result.rows.extend(rows)
        try:
            review = review_of(preds[case_id].path, case_id)
        except InputError as exc:
            review = None
            result.unreadable_provenance[case_id] = str(exc)
            warning = f"{case_id}: its review flags are left out of the review-flag figures: {exc}"
            log.warning("%s", warning)
            result.notes.append(warning)
        if review:
            result.reviewed += [Reviewed(case_id, r.structure, r.score.dsc_exact, *review[r.structure],
                                         absent=r.score.reference_voxels == 0 and r.score.prediction_voxels == 0)
                                for r in rows if r.structure in review]
        ref_lm, pred_lm = ref.labelmap(), pred.labelmap()
        if ref_lm is not None and pred_lm is not None:
            result.class_dice[case_id] = M.class_dice(ref_lm, pred_lm, S.NUM_CLASSES)
        mean_dsc = np.mean([r.score.dsc for r in rows])
        log.info("case %d/%d %s: %d structures, mean DSC %.4f", i, len(common), case_id, len(rows), mean_dsc)
        if on_case is not None:
            on_case(ref, pred, rows)
        del ref, pred
    if not result.class_dice:
        result.notes.append("54-class Dice: computed only when both sides are Task001 label maps; not here.")
    return result


def _few(cases: dict) -> str:
    names = sorted(cases)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# --------------------------------------------------------------------------------------------
# Writing the reports
# --------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write a file under a temporary name in its folder and rename it when complete.

    The file gets the permissions the umask gives any new file (mkstemp's 0600 would hide a report
    from the colleagues it is for).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


CSV_COLUMNS = ("case", "structure", "task", "dsc", "nsd", "tolerance_mm", "dsc_exact", "nsd_exact",
               "reference_voxels", "prediction_voxels", "reference_ml", "prediction_ml", "note")


def scores_csv(evaluation: Evaluation) -> str:
    """The per-case, per-structure table as CSV text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in evaluation.rows:
        s = r.score
        writer.writerow([r.case_id, s.structure, r.task, f"{s.dsc:.4f}", f"{s.nsd:.4f}", f"{s.tolerance_mm:g}",
                         repr(s.dsc_exact), repr(s.nsd_exact), s.reference_voxels, s.prediction_voxels,
                         f"{s.reference_ml:.4f}", f"{s.prediction_ml:.4f}", r.note])
    return buf.getvalue()


def _pm(mean: float, std: float, percent: bool = True) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if percent else f"{mean:.4f} ± {std:.4f}"


def report_markdown(evaluation: Evaluation, summary: dict, montages: dict[str, str] | None = None,
                    boxplot: str | None = None) -> str:
    """The human-readable report (values in percent, like the challenge tables)."""
    lines = ["# SegRap evaluation", "",
             f"- Reference: `{evaluation.reference}` ({', '.join(summary['formats']['reference'])})",
             f"- Prediction: `{evaluation.prediction}` ({', '.join(summary['formats']['prediction'])})",
             f"- Cases: {len(evaluation.cases)}; created {summary['created']} by {summary['tool']}",
             "- DSC and NSD as the SegRap 2023 organizers compute them (NSD tolerance 1 mm, Larynx 2 mm, "
             "OralCavity 3 mm); per-case values rounded to 4 decimals; mean ± standard deviation in percent.",
             "", "## Summary", "", "| Task | Structures | Cases | DSC (%) | NSD (%) |", "|---|---|---|---|---|"]
    labels = {"oar": "Task 1: organs at risk", "gtv": "Task 2: tumor volumes"}
    for task, g in summary["tasks"].items():
        lines.append(f"| {labels[task]} | {g['structures']} | {g['cases']} | {_pm(g['dsc_mean'], g['dsc_std'])} | "
                     f"{_pm(g['nsd_mean'], g['nsd_std'])} |")
    if summary["overall"] and len(summary["tasks"]) > 1:
        g = summary["overall"]
        lines.append(f"| All | {g['structures']} | {g['cases']} | {_pm(g['dsc_mean'], g['dsc_std'])} | "
                     f"{_pm(g['nsd_mean'], g['nsd_std'])} |")
    flag = summary.get("review_flag")
    if flag:
        def f(v):
            return "-" if v is None else f"{v:.3f}"
        lines += ["", f"Review flag of the runs (docs/quality.md): AUC of the confidence for DSC < 0.5 {f(flag['auc'])}, "
                      f"sensitivity {f(flag['sensitivity'])}, false flags among DSC >= 0.9 {f(flag['false_flags'])}, "
                      f"over {flag['structures']} structures ({flag['dsc_below_0.5']} with DSC < 0.5)"
                      + left_out_of_review(flag) + "."]
    cd = summary.get("class_dice_54")
    if cd:
        lines += ["", f"54-class Dice (Task 1 label maps, mean over classes as in the DKFZ poster): "
                      f"**{100 * cd['mean']:.2f} %** over {cd['cases']} case(s)."]
    lines += ["", "## Per structure", "",
              "| Structure | Tolerance (mm) | Cases | DSC (%) | NSD (%) | Lowest DSC (%) |", "|---|---|---|---|---|---|"]
    for name, s in summary["structures"].items():
        lines.append(f"| {name} | {s['tolerance_mm']:g} | {s['cases']} | {_pm(s['dsc_mean'], s['dsc_std'])} | "
                     f"{_pm(s['nsd_mean'], s['nsd_std'])} | {100 * s['dsc_min']:.2f} |")
    lines += ["", "## Lowest scores", "", "| Case | Structure | DSC | NSD | Reference (ml) | Prediction (ml) | Note |",
              "|---|---|---|---|---|---|---|"]
    for r in evaluation.worst(10):
        s = r.score
        lines.append(f"| {r.case_id} | {s.structure} | {s.dsc:.4f} | {s.nsd:.4f} | {s.reference_ml:.2f} | "
                     f"{s.prediction_ml:.2f} | {r.note} |")
    if boxplot or montages:
        lines += ["", "## Figures", ""]
        if boxplot:
            lines += [f"![DSC and NSD per structure]({boxplot})", ""]
        for case_id, rel in (montages or {}).items():
            lines.append(f"- [{case_id}]({rel}): axial slices of the worst structures "
                         f"(reference green, prediction magenta)")
    if evaluation.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in evaluation.notes]
    return "\n".join(lines) + "\n"


def left_out_of_review(flag: dict) -> str:
    """The review-flag line's mention of the cases whose provenance could not be read ('' when none)."""
    cases = sorted(flag.get("unreadable_provenance") or {})
    return f"; left out, their provenance unreadable (see Notes): {', '.join(cases)}" if cases else ""


def _montage_rows(ref: F.CaseSource, pred: F.CaseSource, rows: list[CaseScore], worst: int) -> list:
    """The ``worst`` lowest-DSC structures of a case that are not empty in both, as the montage draws them."""
    from .plots import MontageRow

    scored = [r for r in rows if r.score.reference_voxels or r.score.prediction_voxels]
    chosen = sorted(scored, key=lambda r: (r.score.dsc_exact, r.score.nsd_exact))[:max(1, worst)]
    pred_names = set(pred.names())
    out = []
    for row in chosen:
        reference = ref.crop(row.structure)
        prediction = pred.crop(row.structure) if row.structure in pred_names else Crop.empty(reference.shape)
        out.append(MontageRow(row.structure, reference, prediction, row.score.dsc, row.score.nsd))
    return out


def run(prediction: str | Path, reference: str | Path, out: str | Path, task: str | None = None, *,
        plots: bool = True, worst: int = 4) -> Evaluation:
    """Evaluate and write scores.csv, summary.json, report.md and (with ``plots``) the PNG figures into ``out``.

    A run that fails removes the output folder again when it made it (no empty or half-filled folder is left).
    """
    out = Path(out)
    top = None if out.exists() else out  # the outermost folder this run will make
    while top is not None and not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        return _run(prediction, reference, out, task, plots, worst)
    except BaseException:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        raise


def _run(prediction: str | Path, reference: str | Path, out: Path, task: str | None, plots: bool,
         worst: int) -> Evaluation:
    montages: dict[str, str] = {}

    def draw(ref: F.CaseSource, pred: F.CaseSource, rows: list[CaseScore]) -> None:
        from . import plots

        path = out / MONTAGE_DIR / f"{ref.case_id}.png"
        background = ref.background()
        if background is None:
            background = pred.background()
        write_atomic(path, plots.montage_png(ref.case_id, _montage_rows(ref, pred, rows, worst), background,
                                             ref.geometry.spacing))
        montages[ref.case_id] = f"{MONTAGE_DIR}/{path.name}"

    evaluation = evaluate(prediction, reference, task, on_case=draw if plots else None)
    summary = evaluation.summary()
    files = {"csv": write_atomic(out / CSV_NAME, scores_csv(evaluation)),
             "json": write_atomic(out / JSON_NAME, json.dumps(summary, indent=1) + "\n")}
    boxplot = None
    if plots:
        from . import plots

        values = {n: {m: evaluation.values(n, m) for m in ("dsc", "nsd")} for n in evaluation.structures()}
        files["boxplot"] = write_atomic(out / BOXPLOT_NAME, plots.boxplot_png(values, len(evaluation.cases)))
        boxplot = BOXPLOT_NAME
        for case_id, rel in montages.items():
            files[f"montage:{case_id}"] = out / rel
    files["report"] = write_atomic(out / REPORT_NAME, report_markdown(evaluation, summary, montages, boxplot))
    evaluation.files = files
    return evaluation
