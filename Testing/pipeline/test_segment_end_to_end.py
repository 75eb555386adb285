"""`segrap segment` end to end on the demo bundle: outputs, overlaps, accuracy, provenance, protocol."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
import slicerio
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.demo import score_against_truth
from SegRapSegmenterLib.formats import segfile
from SegRapSegmenterLib.inference.bundles import DEMO_BUNDLE_PATH, load_bundle

# The demo model's DSC on held-out phantom cases is recorded in data/segrap-demo-heldout-dsc.json (0.3.0, small:
# all 47 structures found in each of 3 cases, mean OARs about 0.96, GTVs about 0.9); the floors sit below it,
# so that a regression to the large organs only (0.1.0: OARs 0.23) fails.
OAR_DSC_FLOOR = 0.8
GTV_DSC_FLOOR = 0.75


def test_run_succeeds_with_a_done_event(segment_run):
    assert segment_run["returncode"] == 0, segment_run["stderr"][-3000:]
    kinds = [e["event"] for e in segment_run["events"]]
    assert kinds[0] == "start" and kinds[-1] == "done"
    fractions = [e["fraction"] for e in segment_run["events"] if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = {e["stage"] for e in segment_run["events"] if e["event"] == "progress"}
    assert {"oar-inference", "gtv-inference", "write", "done"} <= stages


def test_segmentation_holds_47_named_overlapping_segments(segment_run):
    outputs = segment_run["events"][-1]["outputs"]
    seg = segfile.read_seg_nrrd(outputs["segmentation"])
    assert seg.segment_names == list(S.STRUCTURE_NAMES)
    for name in S.STRUCTURE_NAMES:
        assert seg.colors[name] == tuple(round(c / 255, 6) for c in S.get(name).color) or np.allclose(
            seg.colors[name], [c / 255 for c in S.get(name).color], atol=1e-5)
    # recomposition from the 54 classes: every contained structure lies inside its container
    for outer, inner in [("Eye_L", "Lens_L"), ("Eye_R", "Lens_R"), ("Brain", "BrainStem"), ("Brain", "TemporalLobe_R"),
                         ("MiddleEar_R", "Cochlea_R"), ("MiddleEar_L", "IAC_L"), ("Larynx", "Larynx_Glottic")]:
        assert not (seg.masks[inner] & ~seg.masks[outer]).any(), (outer, inner)
    assert seg.masks["BrainStem"].any() and (seg.masks["Brain"] & ~seg.masks["BrainStem"]).any()
    ct = segment_run["paths"].ct
    reference = sitk.ReadImage(str(ct))
    assert seg.reference.GetSize() == reference.GetSize()
    assert np.allclose(seg.reference.GetOrigin(), reference.GetOrigin())
    demo = load_bundle(DEMO_BUNDLE_PATH)
    assert seg.provenance["model"] == {"name": "segrap-demo", "version": demo.version}  # what export-rtstruct names
    loaded = slicerio.read_segmentation(outputs["segmentation"])
    assert [s["name"] for s in loaded["segments"]] == list(S.STRUCTURE_NAMES)


def test_accuracy_against_the_phantom_truth(segment_run):
    scores = score_against_truth(segment_run["case"], segment_run["events"][-1]["outputs"]["segmentation"])
    oar = np.mean([scores[n] for n in S.OAR_NAMES])
    gtv = np.mean([scores[n] for n in S.GTV_NAMES])
    assert oar >= OAR_DSC_FLOOR, (oar, sorted(scores.items(), key=lambda kv: kv[1])[:8])
    assert gtv >= GTV_DSC_FLOOR, (gtv, {n: scores[n] for n in S.GTV_NAMES})
    # no left/right swap: each paired structure overlaps its own side's truth more than the other side's
    truth = segment_run["case"].oar_masks()
    seg = segfile.read_seg_nrrd(segment_run["events"][-1]["outputs"]["segmentation"])
    for s in S.OARS:
        if s.laterality and truth[s.name].sum() > 50 and seg.masks[s.name].any():
            own = np.count_nonzero(seg.masks[s.name] & truth[s.name])
            other = np.count_nonzero(seg.masks[s.name] & truth[s.partner])
            assert own >= other, s.name


def test_provenance_records_model_folds_device_inputs_and_timings(segment_run):
    outputs = segment_run["events"][-1]["outputs"]
    prov = json.loads(open(outputs["provenance"]).read())
    assert prov["bundle"]["name"] == "segrap-demo" and prov["bundle"]["tasks"]["oar"]["folds"] == ["all"]
    assert prov["inference"]["oar"]["device"] == "cpu" and prov["inference"]["gtv"]["folds"] == ["all"]
    assert prov["inputs"]["ct"]["sha256"] and prov["inputs"]["contrast_ct"]["sha256"]
    assert prov["contrast_alignment"]["method"] == "same-grid"
    # NIfTI inputs carry no patient: the provenance says the pair's identity was not checked
    identity = prov["inputs"]["identity"]
    assert identity["patient"].startswith("not checked") and "carry no patient identity" in identity["patient"]
    assert identity["ct"] == {"kind": "file"} and identity["contrast_ct"] == {"kind": "file"}
    assert {"oar_inference", "gtv_inference", "write", "total"} <= set(prov["timings_s"])
    assert set(prov["structures"]) == set(S.STRUCTURE_NAMES)
    brain = prov["structures"]["Brain"]
    assert brain["volume_ml"] > 10 and "flags" in brain and len(brain["centroid_lps_mm"]) == 3
    assert {"torch", "nnunetv2", "SimpleITK"} <= set(prov["software"])


def test_nifti_and_challenge_outputs(segment_run):
    outputs = segment_run["events"][-1]["outputs"]
    seg = segfile.read_seg_nrrd(outputs["segmentation"])
    folder = outputs["nifti"]
    for name in ("Parotid_L", "GTVnd", "Lens_R"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(f"{folder}/{name}.nii.gz")) > 0
        assert np.array_equal(mask, seg.masks[name])
    oar4d = sitk.ReadImage(outputs["challenge_oar"])
    assert oar4d.GetDimension() == 4 and oar4d.GetSize()[3] == 45
    stack = sitk.GetArrayFromImage(oar4d)
    assert np.array_equal(stack[S.get("Eye_R").index] > 0, seg.masks["Eye_R"])
    assert sitk.ReadImage(outputs["challenge_gtv"]).GetSize()[3] == 2


def test_nothing_but_the_outputs_in_the_folder(segment_run):
    names = sorted(p.name for p in segment_run["out"].iterdir())
    assert names == ["segrap_0000.provenance.json", "segrap_0000.seg.nrrd", "segrap_0000_gtv_4d.mha",
                     "segrap_0000_oar_4d.mha", "segrap_0000_structures"]


def test_evaluate_scores_the_demo_prediction_and_writes_every_report(segment_run, tmp_path):
    import matplotlib.image
    from SegRapSegmenterLib import cli

    pred = tmp_path / "pred"
    pred.mkdir()
    seg = segment_run["events"][-1]["outputs"]["segmentation"]
    (pred / "segrap_0000.seg.nrrd").symlink_to(seg)
    out = tmp_path / "report"
    reference = segment_run["paths"].folder.parent  # the release layout's case folders
    assert cli.main(["evaluate", "--pred", str(pred), "--ref", str(reference), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    text = json.dumps(summary)
    assert "Parotid_L" in text and "GTVnd" in text
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 47
    assert (out / "report.md").read_text().strip()
    for png in [out / "boxplot.png", *sorted((out / "montages").glob("*.png"))]:
        assert matplotlib.image.imread(png).ndim == 3
    assert list((out / "montages").glob("*.png"))


def test_every_structure_has_a_confidence_a_review_flag_and_its_segment_tags(segment_run):
    done = segment_run["events"][-1]
    prov = json.loads(open(done["outputs"]["provenance"]).read())
    for name, entry in prov["structures"].items():
        assert 0.0 <= entry["confidence"] <= 1.0 and isinstance(entry["review"], bool), name
        assert entry["review"] == bool(entry["review_reasons"]), name
    # the network's certainty was measured for every structure of both tasks (the frugal path)
    assert prov["review"]["certainty_measured"] == sorted(S.STRUCTURE_NAMES)
    # the demo bundle carries its training set's volumes: the plausibility check ran
    assert prov["review"]["plausibility"] == "volumes against the bundle's training statistics (88 cases)"
    assert prov["review"]["flagged"] == [n for n, e in prov["structures"].items() if e["review"]]
    assert done["review"] == prov["review"]["summary"] and done["flagged"] == prov["review"]["flagged"]
    # Slicer reads the flag from the segment tags (slicerio splits them the way Slicer's storage node does)
    loaded = slicerio.read_segmentation(done["outputs"]["segmentation"])
    for segment in loaded["segments"]:
        entry = prov["structures"][segment["name"]]
        assert segment["tags"]["SegRap.Review"] == ("1" if entry["review"] else "0")
        assert float(segment["tags"]["SegRap.Confidence"]) == round(entry["confidence"], 3)
        if entry["review"]:
            assert segment["tags"]["SegRap.ReviewReasons"] == "; ".join(entry["review_reasons"])


def test_evaluate_reports_how_the_review_flag_ranked_against_the_true_dsc(segment_run, tmp_path):
    from SegRapSegmenterLib import cli

    out = tmp_path / "report"
    reference = segment_run["paths"].folder.parent
    assert cli.main(["evaluate", "--pred", str(segment_run["out"]), "--ref", str(reference), "--out", str(out),
                     "--no-plots"]) == 0
    flag = json.loads((out / "summary.json").read_text())["review_flag"]
    assert flag["structures"] == 47 and flag["absent_left_out"] == 0
    prov = json.loads(next(segment_run["out"].glob("*.provenance.json")).read_text())
    import csv

    scores = {row["structure"]: float(row["dsc_exact"])
              for row in csv.DictReader((out / "scores.csv").read_text().splitlines())}
    assert set(scores) == set(S.STRUCTURE_NAMES)
    good = [n for n in S.STRUCTURE_NAMES if scores[n] >= 0.9]
    expected = sum(prov["structures"][n]["review"] for n in good) / len(good)
    assert flag["false_flags"] == expected
    assert "Review flag of the runs" in (out / "report.md").read_text()
