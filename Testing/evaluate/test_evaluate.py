"""`segrap evaluate` on small phantom cases: every input format, case matching, grid checks and the report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import GeometryError, InputError
from SegRapSegmenterLib.evaluation import evaluate
from SegRapSegmenterLib.formats import maskfiles, segfile
from SegRapSegmenterLib.phantom import cases as phantom

CASES = (0, 1)


def _prediction(case: phantom.PhantomCase) -> tuple[np.ndarray, np.ndarray]:
    """Perturbed truth: the 54-class map moved one voxel (2 mm) along x, the tumours eroded by one voxel."""
    labelmap = np.roll(case.labelmap, 1, axis=2)
    gtv = np.zeros_like(case.gtv_labelmap)
    for s in S.GTVS:
        gtv[ndimage.binary_erosion(case.gtv_labelmap == s.label)] = s.label
    return labelmap, gtv


def _masks(labelmap: np.ndarray, gtv: np.ndarray) -> dict[str, np.ndarray]:
    oars = S.recompose(labelmap)
    masks = {n: oars[n] for n in S.OAR_NAMES}
    masks.update(S.recompose_gtv(gtv))
    return masks


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A two-case reference in the release layout, and the same prediction in every format."""
    root = tmp_path_factory.mktemp("evaluate")
    paths = {"release": root / "release"}
    for i in CASES:
        case = phantom.make_case(i, seed=5, size="small")
        written = phantom.write_case(case, paths["release"])
        labelmap, gtv = _prediction(case)
        masks = _masks(labelmap, gtv)
        folder = root / "pred_nifti" / case.case_id
        folder.mkdir(parents=True)
        for name, mask in masks.items():
            sitk.WriteImage(case.label_image(mask), str(folder / f"{name}.nii.gz"))
        (root / "pred_seg").mkdir(exist_ok=True)
        segfile.write_seg_nrrd(root / "pred_seg" / f"{case.case_id}.seg.nrrd", masks, case.ct)
        spacing = case.ct.GetSpacing()[::-1]
        for task, names in (("oar", S.OAR_NAMES), ("gtv", S.GTV_NAMES)):
            (root / f"pred_mha_{task}").mkdir(exist_ok=True)
            maskfiles.write_challenge_mha(root / f"pred_mha_{task}" / f"{case.case_id}.mha",
                                          {n: masks[n] for n in names}, task, spacing)
        for task, lm in (("Task001", labelmap), ("Task002", gtv)):
            (root / "pred_onehot" / task).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(case.label_image(lm), str(root / "pred_onehot" / task / f"{case.case_id}.nii.gz"))
        paths["ref_task001"] = written.task001.parent
        paths["ref_task002"] = written.task002.parent
    for name in ("pred_nifti", "pred_seg", "pred_mha_oar", "pred_mha_gtv"):
        paths[name] = root / name
    paths["pred_task001"] = root / "pred_onehot" / "Task001"
    paths["pred_task002"] = root / "pred_onehot" / "Task002"
    paths["root"] = root
    return paths


def _scores(result: evaluate.Evaluation) -> dict[tuple[str, str], tuple[float, float]]:
    return {(r.case_id, r.structure): (r.score.dsc_exact, r.score.nsd_exact) for r in result.rows}


def test_cli_writes_every_report_and_the_pictures_open(data, tmp_path):
    out = tmp_path / "report"
    rc = cli.main(["evaluate", "--pred", str(data["pred_nifti"]), "--ref", str(data["release"]), "--out", str(out)])
    assert rc == 0
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(CASES) * len(S.STRUCTURE_NAMES)
    assert {r["case"] for r in rows} == {f"segrap_{i:04d}" for i in CASES}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"oar", "gtv"}
    assert set(summary["structures"]) == set(S.STRUCTURE_NAMES)
    parotid = summary["structures"]["Parotid_L"]
    values = [float(r["dsc"]) for r in rows if r["structure"] == "Parotid_L"]
    assert parotid["dsc_mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert parotid["dsc_std"] == pytest.approx(np.std(values), abs=1e-4)
    report = (out / "report.md").read_text()
    assert "| Parotid_L | 1 | 2 |" in report and "boxplot.png" in report
    for png in [out / "boxplot.png", *(out / "montages" / f"segrap_{i:04d}.png" for i in CASES)]:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert not list(out.rglob("*.part"))  # atomic writes leave no temporaries


def test_every_prediction_format_gives_the_same_scores(data):
    base = _scores(evaluate.evaluate(data["pred_nifti"], data["release"]))
    assert len(base) == len(CASES) * 47
    assert _scores(evaluate.evaluate(data["pred_seg"], data["release"])) == base
    oar = _scores(evaluate.evaluate(data["pred_mha_oar"], data["release"]))
    gtv = _scores(evaluate.evaluate(data["pred_mha_gtv"], data["release"]))
    assert len(oar) == len(CASES) * 45 and len(gtv) == len(CASES) * 2
    assert {**oar, **gtv} == base
    task1 = evaluate.evaluate(data["pred_task001"], data["release"])
    task2 = evaluate.evaluate(data["pred_task002"], data["release"])
    assert {**_scores(task1), **_scores(task2)} == base


def test_label_map_references_give_the_same_scores_and_the_54_class_dice(data):
    base = _scores(evaluate.evaluate(data["pred_nifti"], data["release"], task="oar"))
    result = evaluate.evaluate(data["pred_task001"], data["ref_task001"])
    assert _scores(result) == base
    summary = result.summary()["class_dice_54"]
    assert summary["cases"] == len(CASES) and 0.0 < summary["mean"] < 1.0
    gtv = evaluate.evaluate(data["pred_mha_gtv"], data["ref_task002"], task="gtv")
    assert {r.structure for r in gtv.rows} == {"GTVp", "GTVnd"}
    assert any("no origin or direction" in n for n in gtv.notes)


def test_tolerance_and_spacing_come_from_catalogue_and_image(data):
    # the prediction is the truth moved 2 mm along x (the phantom's x spacing): within 2 mm and 3 mm, not 1 mm
    scores = _scores(evaluate.evaluate(data["pred_nifti"], data["release"], task="oar"))
    for case in (f"segrap_{i:04d}" for i in CASES):
        assert scores[(case, "Larynx")][1] == 1.0
        assert scores[(case, "OralCavity")][1] == 1.0
        assert scores[(case, "Brain")][1] < 0.9
        assert scores[(case, "Brain")][0] > 0.9


def test_identical_cases_score_one(data):
    result = evaluate.evaluate(data["release"], data["release"])
    assert all(r.score.dsc == 1.0 and r.score.nsd == 1.0 for r in result.rows)
    assert len(result.rows) == len(CASES) * 47


def test_cases_are_matched_by_id(data, tmp_path):
    only_one = tmp_path / "one"
    only_one.mkdir()
    (only_one / "segrap_0001.mha").symlink_to(data["pred_mha_gtv"] / "segrap_0001.mha")
    result = evaluate.evaluate(only_one, data["release"], task="gtv")
    assert result.cases == ["segrap_0001"] and result.reference_only == ["segrap_0000"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "patient_7.mha").symlink_to(data["pred_mha_gtv"] / "segrap_0001.mha")
    (stranger / "patient_8.mha").symlink_to(data["pred_mha_gtv"] / "segrap_0000.mha")
    with pytest.raises(InputError, match="No case id appears in both"):
        evaluate.evaluate(stranger, data["release"])


def test_a_prediction_on_another_grid_is_an_error_naming_both_files(data, tmp_path):
    folder = tmp_path / "pred"
    folder.mkdir()
    source = sitk.ReadImage(str(data["pred_task001"] / "segrap_0000.nii.gz"))
    moved = sitk.Image(source)
    moved.SetOrigin(tuple(o + 5.0 for o in source.GetOrigin()))
    sitk.WriteImage(moved, str(folder / "segrap_0000.nii.gz"))
    reference = data["ref_task001"] / "segrap_0000.nii.gz"
    with pytest.raises(GeometryError) as err:
        evaluate.evaluate(folder, reference)
    assert str(folder / "segrap_0000.nii.gz") in str(err.value) and str(reference) in str(err.value)
    rc = cli.main(["evaluate", "--pred", str(folder), "--ref", str(reference), "--out", str(tmp_path / "o"),
                   "--no-plots"])
    assert rc == cli.EXIT_INPUT  # a geometry mismatch is bad input


def test_folders_without_cases_are_explained(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no cases found"):
        maskfiles.find_cases(tmp_path)


def test_rtstruct_cases_are_read_on_their_ct(data, tmp_path):
    dicom = pytest.importorskip("SegRapSegmenterLib.formats.dicom")
    phantom_dicom = pytest.importorskip("SegRapSegmenterLib.phantom.dicom_series")
    case = phantom.make_case(0, seed=5, size="small")
    written = phantom_dicom.write_phantom_dicom(case, tmp_path / "dicom" / case.case_id)
    volume = dicom.read_ct_series(written.ct_dir)
    from SegRapSegmenterLib.formats.rtstruct import write_rtstruct

    write_rtstruct(_masks(case.labelmap, case.gtv_labelmap), volume, written.root / "RS.dcm",
                   model_name="phantom truth", model_version="0")
    as_reference = evaluate.evaluate(data["pred_nifti"], tmp_path / "dicom")
    assert as_reference.formats["reference"] == {"RTSTRUCT"}
    against_release = evaluate.evaluate(data["pred_nifti"], data["release"])
    expected = {k: v for k, v in _scores(against_release).items() if k[0] == case.case_id}
    assert _scores(as_reference) == expected
    as_prediction = evaluate.evaluate(tmp_path / "dicom", data["release"])
    assert all(r.score.dsc == 1.0 and r.score.nsd == 1.0 for r in as_prediction.rows)
    assert len(as_prediction.rows) == 47
