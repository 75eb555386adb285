"""A CT and a contrast CT of two patients (their files found through the DICOM database) are refused by the worker
before the model, the scene left as it was; the GUI thread only looks the files up and reads no header. Real MRML
scenes (slicer-core headless, or Slicer's own) and a real worker process."""

from __future__ import annotations

import shutil
import tempfile
import unittest
from pathlib import Path

import pydicom
import slicer  # noqa: F401 - the MRML classes the scene module uses
from SegRapSegmenterLib.errors import DicomError, InputError
from SegRapSegmenterLib.formats.dicom import read_ct_series
from SegRapSegmenterLib.formats.identity import check_identity_of_files
from SegRapSegmenterLib.formats.pydicom_compat import save_file
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom.dicom_series import write_phantom_dicom
from SegRapSegmenterLib.slicer_bridge import scene as SC
from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic


def _fresh_scene():
    if hasattr(slicer, "app"):
        slicer.mrmlScene.Clear()
        return slicer.mrmlScene
    return SC.headless_scene()


def _as_loaded_from_dicom(scene, folder: Path, name: str):
    """A volume node as Slicer's DICOM plugin leaves it: the series' voxels and its instance UIDs attribute."""
    volume = read_ct_series(folder)
    node = SC.add_volume_node(scene, volume.image, name)
    node.SetAttribute(SC.INSTANCE_UIDS_ATTRIBUTE, " ".join(s.sop_instance_uid for s in volume.series.slices))
    return node


class LogicIdentityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = Path(tempfile.mkdtemp(prefix="segrap-identity-"))
        case = phantom.make_case(0, seed=99, size="small")
        cls.pair = write_phantom_dicom(case, cls.root / "study", seed=99)
        # the contrast CT again, as another patient's: other PatientID and SOP instance UIDs on every file
        cls.other = cls.root / "other"
        cls.other.mkdir()
        for k, path in enumerate(sorted(cls.pair.contrast_dir.iterdir())):
            ds = pydicom.dcmread(path)
            ds.PatientID = "SOMEONE-ELSE"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.9"
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.9"
            save_file(ds, cls.other / path.name)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    def setUp(self):
        self.scene = _fresh_scene()
        self.logic = SegmentationLogic()
        self.logic.dicomDatabase = SC.FolderDicomIndex(self.root)
        self.ct = _as_loaded_from_dicom(self.scene, self.pair.ct_dir, "CT")

    def test_a_contrast_ct_of_another_patient_is_refused_by_the_worker_and_the_scene_is_left_as_it_was(self):
        other = _as_loaded_from_dicom(self.scene, self.other, "Other CE")
        count = self.scene.GetNumberOfNodes()
        with self.assertRaisesRegex(InputError, "two patients.*'SOMEONE-ELSE'"):
            self.logic.segment(self.ct, other, tasks=("oar", "gtv"), bundle="demo", device="cpu", wait=True)
        self.assertEqual(self.scene.GetNumberOfNodes(), count)  # the segmentation node made for it was removed
        self.assertFalse(self.logic.running)

    def test_the_gui_thread_only_looks_the_files_up_and_the_worker_reads_their_headers(self):
        contrast = _as_loaded_from_dicom(self.scene, self.pair.contrast_dir, "CE")
        broken = self.root / "broken"
        shutil.copytree(self.pair.contrast_dir, broken)
        self.logic.dicomDatabase = SC.FolderDicomIndex(broken)
        first = sorted(broken.iterdir())[0]
        first.write_bytes(b"not a DICOM file")  # a header read now would fail
        sources = self.logic.identityFiles(None, contrast)
        self.assertIsNone(sources["ct"])
        self.assertEqual(sources["contrast_ct"]["label"], "volume 'CE'")
        self.assertIn(str(first), sources["contrast_ct"]["files"])
        with self.assertRaisesRegex(DicomError, f"volume 'CE'.*{first.name}"):
            check_identity_of_files({"ct": None, **sources}, True, False)

    def test_one_patients_pair_is_recorded_as_checked(self):
        contrast = _as_loaded_from_dicom(self.scene, self.pair.contrast_dir, "CE")
        record = self.logic.checkIdentity(self.ct, contrast)
        self.assertTrue(record["patient"].startswith("same patient (PatientID"), record)
        self.assertTrue(record["same_study"] and record["same_frame_of_reference"])
        self.assertEqual(record["warnings"], [])
        self.assertEqual(record["ct"]["series_uid"], self.pair.ct_series_uid)

    def test_volumes_not_from_dicom_are_recorded_as_not_checked(self):
        plain = SC.add_volume_node(self.scene, read_ct_series(self.pair.contrast_dir).image, "From a NRRD file")
        record = self.logic.checkIdentity(self.ct, plain)
        self.assertIn("not checked: volume 'From a NRRD file'", record["patient"])
        self.assertIn("not loaded from Slicer's DICOM database", record["patient"])


if __name__ == "__main__":
    unittest.main()
