"""The CT and the contrast CT must be one patient's: two patients are refused before any model runs; another
study or frame of reference is allowed and said; image files are recorded as not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from SegRapSegmenterLib.errors import DicomError, InputError
from SegRapSegmenterLib.formats.dicom import Patient, read_ct_series
from SegRapSegmenterLib.formats.identity import check_pair, identity_of_folder
from SegRapSegmenterLib.formats.pydicom_compat import save_file
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom

HELD_OUT_SEED = 99


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    case = phantom.make_case(2, seed=HELD_OUT_SEED, size="small")
    return write_phantom_dicom(case, tmp_path_factory.mktemp("identity") / "dicom", seed=HELD_OUT_SEED)


def _copy_with(folder: Path, target: Path, only=None, **values) -> Path:
    """A copy of a series with attributes changed on every file (or on the files whose index ``only`` admits)."""
    target.mkdir(parents=True)
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        if only is None or only(k):
            for keyword, value in values.items():
                setattr(ds, keyword, value)
        save_file(ds, target / path.name)
    return target


def _segment(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SegRapSegmenterLib.cli", "segment", *args, "--bundle", "demo",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600)


def test_contrast_ct_of_another_patient_exits_3_naming_both_ids_and_writes_nothing(pair, tmp_path):
    other = _copy_with(pair.contrast_dir, tmp_path / "other", PatientID="SOMEONE-ELSE")
    out = tmp_path / "out"
    proc = _segment("--ct", str(pair.ct_dir), "--contrast-ct", str(other), "--out", str(out))
    assert proc.returncode == 3, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    said = events[-1]["message"]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "InputError", events[-1]
    ct_id = pydicom.dcmread(next(pair.ct_dir.iterdir()), stop_before_pixels=True).PatientID
    assert "two patients" in said and "'SOMEONE-ELSE'" in said and f"'{ct_id}'" in said and str(other) in said
    # refused before any model ran: no inference event, and no output folder at all
    assert not any(str(e.get("stage", "")).endswith("inference") for e in events)
    assert not out.exists()


def test_another_patient_name_or_birth_date_is_refused_even_with_the_same_id(pair, tmp_path):
    ct = identity_of_folder(pair.ct_dir)
    renamed = identity_of_folder(_copy_with(pair.contrast_dir, tmp_path / "renamed", PatientName="Other^Person"))
    with pytest.raises(InputError, match="PatientName"):
        check_pair(ct, renamed, ct_path="ct", contrast_path="ce", register=False)
    born = identity_of_folder(_copy_with(pair.contrast_dir, tmp_path / "born", PatientBirthDate="19500101"))
    ct_born = identity_of_folder(_copy_with(pair.ct_dir, tmp_path / "ct_born", PatientBirthDate="19600101"))
    with pytest.raises(InputError, match="PatientBirthDate '19600101' vs '19500101'"):
        check_pair(ct_born, born, ct_path="ct", contrast_path="ce", register=False)


def test_names_are_compared_as_names_and_blank_values_are_not_a_difference():
    assert Patient("1", "Doe^John", "").differences(Patient("1", "DOE^JOHN^^", "19700101")) == ""
    assert Patient("1", "Doe^John=Ideographic", "").differences(Patient("1", "doe^john", "")) == ""
    assert "PatientName" in Patient("1", "Doe^John", "").differences(Patient("1", "Doe^Jane", ""))
    assert "PatientID '1' vs '2'" in Patient("1", "", "").differences(Patient("2", "", ""))


def test_a_series_that_mixes_two_patients_is_refused_when_read(pair, tmp_path):
    mixed = _copy_with(pair.ct_dir, tmp_path / "mixed", only=lambda k: k % 2 == 1, PatientID="SOMEONE-ELSE")
    with pytest.raises(DicomError, match="mixes patients.*PatientID"):
        read_ct_series(mixed)
    with pytest.raises(DicomError, match="mixes patients"):
        identity_of_folder(mixed)


def test_missing_patient_id_is_a_warning_not_a_silent_pass(pair, tmp_path):
    ct = identity_of_folder(_copy_with(pair.ct_dir, tmp_path / "ct", PatientID=""))
    ce = identity_of_folder(_copy_with(pair.contrast_dir, tmp_path / "ce", PatientID=""))
    record, warnings = check_pair(ct, ce, ct_path="ct", contrast_path="ce", register=False)
    assert record["patient"].startswith("not checked: no PatientID") and len(warnings) == 1
    assert "could not be checked" in warnings[0]


def test_image_files_are_recorded_as_not_checked(pair):
    ct = identity_of_folder(pair.ct_dir)
    record, warnings = check_pair(ct, None, ct_path=str(pair.ct_dir), contrast_path="ce.nii.gz", register=False)
    assert record["patient"] == "not checked: ce.nii.gz: image files (NIfTI, NRRD or MetaImage), which carry " \
                                "no patient identity"
    assert record["contrast_ct"] == {"kind": "file"} and record["ct"]["series_uid"] == pair.ct_series_uid
    assert warnings == []


def test_registered_pair_of_two_studies_is_recorded_without_a_warning(pair, tmp_path):
    ct = identity_of_folder(pair.ct_dir)
    ce = identity_of_folder(_copy_with(pair.contrast_dir, tmp_path / "ce", StudyInstanceUID="1.2.3.4",
                                       FrameOfReferenceUID="1.2.3.5"))
    record, warnings = check_pair(ct, ce, ct_path="ct", contrast_path="ce", register=True)
    assert warnings == [] and record["alignment"].startswith("registered")
    assert record["same_study"] is False and record["same_frame_of_reference"] is False


def test_contrast_ct_of_another_study_is_contoured_with_a_warning_and_both_uids(pair, tmp_path):
    other_study = _copy_with(pair.contrast_dir, tmp_path / "later", StudyInstanceUID="1.2.826.0.1.3680043.10.9.1",
                             FrameOfReferenceUID="1.2.826.0.1.3680043.10.9.2")
    out = tmp_path / "out"
    proc = _segment("--ct", str(pair.ct_dir), "--contrast-ct", str(other_study), "--tasks", "gtv",
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()][-1]
    prov = json.loads(Path(done["outputs"]["provenance"]).read_text())
    identity = prov["inputs"]["identity"]
    assert identity["patient"].startswith("same patient (PatientID")
    assert identity["same_study"] is False and identity["same_frame_of_reference"] is False
    assert identity["alignment"].startswith("assumed")
    assert identity["ct"]["study_uid"] == pair.study_uid
    assert identity["contrast_ct"]["study_uid"] == "1.2.826.0.1.3680043.10.9.1"
    said = [w for w in prov["warnings"] if "another study" in w]
    assert said and pair.study_uid in said[0] and "1.2.826.0.1.3680043.10.9.1" in said[0] and "--register" in said[0]
    assert any("another study" in w for w in done.get("warnings", [])) or "another study" in proc.stderr
    # the provenance names no patient value
    ct_id = pydicom.dcmread(next(pair.ct_dir.iterdir()), stop_before_pixels=True).PatientID
    assert ct_id not in json.dumps(identity)


def test_a_callers_identity_record_stands_for_image_files_and_its_warnings_are_said_again(tmp_path):
    from SegRapSegmenterLib.pipeline import SegmentRequest, _check_identity

    ct, ce = (str(tmp_path / name) for name in ("ct.nrrd", "contrast_ct.nrrd"))
    slicer_record = {"patient": "same patient (PatientID compared)", "checked_in": "Slicer (DICOM database)",
                     "warnings": ["The contrast CT volume 'CE' is from another study"]}
    req = SegmentRequest(ct=ct, contrast_ct=ce, out_dir=str(tmp_path), identity=slicer_record)
    record, warnings = _check_identity(req, ("oar", "gtv"))
    assert record["checked_in"] == "Slicer (DICOM database)" and "warnings" not in record
    assert warnings == ["The contrast CT volume 'CE' is from another study"]
    # without it, image files are recorded as not checked
    record, warnings = _check_identity(SegmentRequest(ct=ct, contrast_ct=ce, out_dir=str(tmp_path)), ("oar", "gtv"))
    assert record["patient"].startswith("not checked") and warnings == []


def test_without_patient_values_the_refusal_names_the_attributes_only(pair, tmp_path):
    ct = identity_of_folder(pair.ct_dir)
    other = identity_of_folder(_copy_with(pair.contrast_dir, tmp_path / "other", PatientID="SOMEONE-ELSE"))
    with pytest.raises(InputError) as refused:
        check_pair(ct, other, ct_path="ct", contrast_path="ce", register=False, patient_values=False)
    assert "PatientID differs" in str(refused.value) and "SOMEONE-ELSE" not in str(refused.value)
    assert ct.patient.id not in str(refused.value)
