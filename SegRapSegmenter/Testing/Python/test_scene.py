"""The MRML glue (SegRapSegmenterLib.slicer_bridge.scene) on real MRML scenes: volume nodes -> worker inputs, worker results ->
segmentation nodes, edited segmentation nodes -> RTSTRUCT.

Runs headless with the slicer-core package (pytest) and inside Slicer (its test runner). Geometry is
checked against Slicer's own volume reader (vtkMRMLVolumeArchetypeStorageNode), not against the code
under test; segments are checked voxel by voxel against the phantom truth.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.anatomy import terminology
from SegRapSegmenterLib.errors import Cancelled, DicomError, GeometryError
from SegRapSegmenterLib.formats import dicom, imaging, rtstruct
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.phantom import dicom_series as phantom_dicom
from SegRapSegmenterLib.slicer_bridge import scene as SC
from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic

DIRECTIONS = ("identity", "flipped", "rotated", "oblique")
# the worker's result files are written here with pynrrd (segfile), which Slicer does not ship
NO_PYNRRD = importlib.util.find_spec("nrrd") is None
PYNRRD_REASON = "pynrrd not installed (as in a stock Slicer): the worker-result fixtures are written with it"
if not NO_PYNRRD:
    from SegRapSegmenterLib.formats import segfile


def fresh_scene():
    """Slicer's scene, cleared, inside Slicer; a new headless scene with slicer-core."""
    if hasattr(slicer, "app"):
        slicer.mrmlScene.Clear()
        return slicer.mrmlScene
    return SC.headless_scene()


def ct_from_dicom(scene, series):
    """A CT volume node as Slicer's DICOM plugin leaves it: the series' voxels and its instance UIDs attribute."""
    node = SC.add_volume_node(scene, series.image, "CT from DICOM")
    node.SetAttribute(SC.INSTANCE_UIDS_ATTRIBUTE, " ".join(s.sop_instance_uid for s in series.series.slices))
    return node


def read_with_slicer(scene, path: Path, name: str = "CT"):
    """A volume node loaded by Slicer's own reader (the reference for what Slicer shows)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise AssertionError(f"Slicer could not read {path}")
    return node


def all_masks(case: phantom.PhantomCase) -> dict[str, np.ndarray]:
    return {**dict(case.oar_masks().items()), **case.gtv_masks()}


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


class VolumeNodeToWorkerInputTest(unittest.TestCase):
    """What the worker reads is the volume Slicer shows: voxels, origin, spacing and direction."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.scene = fresh_scene()

    def tearDown(self):
        self.tmp.cleanup()

    def test_every_direction_reaches_the_worker_intact(self):
        for direction in DIRECTIONS:
            with self.subTest(direction=direction):
                case = phantom.make_case(0, seed=0, size="small", direction=direction)
                source = self.root / f"{direction}.nrrd"
                sitk.WriteImage(case.ct, str(source))
                node = read_with_slicer(self.scene, source)
                written = SC.write_volume(node, self.root / f"{direction}-worker.nrrd")
                got = imaging.read_volume(written, "CT").image  # the worker's own reader
                self.assertEqual(got.GetSize(), case.ct.GetSize())
                np.testing.assert_allclose(got.GetOrigin(), case.ct.GetOrigin(), atol=1e-6)
                np.testing.assert_allclose(got.GetSpacing(), case.ct.GetSpacing(), atol=1e-9)
                np.testing.assert_allclose(got.GetDirection(), case.ct.GetDirection(), atol=1e-9)
                np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(case.ct))

    def test_a_voxel_lands_where_slicer_puts_it(self):
        case = phantom.make_case(0, seed=0, size="small", direction="oblique")
        sitk.WriteImage(case.ct, str(self.root / "ct.nrrd"))
        node = read_with_slicer(self.scene, self.root / "ct.nrrd")
        image = SC.volume_image(node)
        ijk = (7, 60, 31)
        ras = SC.ijk_to_ras(node) @ np.array([*ijk, 1.0])
        lps = image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)

    def test_volume_node_made_from_an_image_matches_slicers_reader(self):
        case = phantom.make_case(0, seed=0, size="small", direction="rotated")
        sitk.WriteImage(case.ct, str(self.root / "ct.nrrd"))
        loaded = read_with_slicer(self.scene, self.root / "ct.nrrd")
        made = SC.add_volume_node(self.scene, case.ct, "made")
        np.testing.assert_allclose(SC.ijk_to_ras(made), SC.ijk_to_ras(loaded), atol=1e-9)

    def test_volume_under_a_transform_is_refused_and_identity_is_not(self):
        case = phantom.make_case(0, seed=0, size="small")
        node = SC.add_volume_node(self.scene, case.ct, "CT")
        transform = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
        node.SetAndObserveTransformNodeID(transform.GetID())
        SC.write_volume(node, self.root / "identity.nrrd")  # an identity transform changes nothing
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(0, 3, 12.5)
        transform.SetMatrixTransformToParent(matrix)
        with self.assertRaisesRegex(GeometryError, "Harden the transform"):
            SC.write_volume(node, self.root / "moved.nrrd")
        self.assertFalse((self.root / "moved.nrrd").exists())


@unittest.skipIf(NO_PYNRRD, PYNRRD_REASON)
class WorkerResultToSegmentationNodeTest(unittest.TestCase):
    """A worker's .seg.nrrd becomes 47 overlapping, named, colored, coded segments on the CT."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.case = phantom.make_case(0, seed=0, size="small", direction="oblique")
        cls.truth = all_masks(cls.case)
        sitk.WriteImage(cls.case.ct, str(cls.root / "ct.nrrd"))
        cls.result = segfile.write_seg_nrrd(cls.root / "case.seg.nrrd", cls.truth, cls.case.ct,
                                            provenance={"bundle": "segrap-demo", "version": "1.2.0", "case_id": "x"})

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.scene = fresh_scene()
        self.ct = read_with_slicer(self.scene, self.root / "ct.nrrd")

    def test_the_provenance_header_is_read_without_pynrrd(self):
        # Slicer does not ship pynrrd: its process reads the one header field it needs with the standard library
        import nrrd

        expected = nrrd.read_header(str(self.result))["SegRap_Provenance"]
        self.assertEqual(SC.nrrd_header_field(self.result, "SegRap_Provenance"), expected)
        self.assertIsNone(SC.nrrd_header_field(self.result, "SegRap_NoSuchField"))
        code = ("import json, sys\nsys.modules['nrrd'] = None\n"  # import nrrd now raises ImportError
                "from SegRapSegmenterLib.slicer_bridge import scene\n"
                f"print(json.dumps(scene._file_provenance(scene.Path({str(self.result)!r}))))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["bundle"], "segrap-demo")

    def test_47_segments_with_names_colors_and_terminology(self):
        node = SC.load_segmentation(self.result, self.ct)
        segmentation = node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 47)
        names = [segmentation.GetNthSegment(i).GetName() for i in range(47)]
        self.assertEqual(names, list(S.STRUCTURE_NAMES))
        for name in S.STRUCTURE_NAMES:
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
            np.testing.assert_allclose(segment.GetColor(), [c / 255 for c in S.get(name).color], atol=1e-5)
            tag = vtk.mutable("")
            self.assertTrue(segment.GetTag("TerminologyEntry", tag), name)
            self.assertEqual(str(tag), terminology.terminology_entry(name))
        self.assertLess(segmentation.GetNumberOfLayers(), 6)  # shared layers, not one labelmap per structure
        self.assertEqual(node.GetAttribute(SC.MODEL_ATTRIBUTE), "segrap-demo 1.2.0")
        self.assertIsNone(node.GetStorageNode())  # not tied to the worker's temp file
        self.assertIsNotNone(node.GetDisplayNode())

    def test_segments_match_the_truth_voxel_by_voxel_with_overlaps_intact(self):
        node = SC.load_segmentation(self.result, self.ct)
        reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        self.assertEqual(reference.GetID(), self.ct.GetID())
        masks = SC.segmentation_masks(node, self.ct)
        self.assertEqual(set(masks), set(S.STRUCTURE_NAMES))
        for name in S.STRUCTURE_NAMES:
            np.testing.assert_array_equal(masks[name], self.truth[name], err_msg=name)
        for inner, outer in (("Lens_L", "Eye_L"), ("Lens_R", "Eye_R"), ("Hippocampus_L", "Brain"), ("Larynx_Glottic", "Larynx")):
            self.assertTrue(masks[inner].any())
            self.assertFalse((masks[inner] & ~masks[outer]).any(), f"{inner} outside {outer}")

    def test_a_structure_the_model_did_not_find_stays_an_empty_segment_and_is_listed(self):
        masks = dict(self.truth)
        masks["Chiasm"] = np.zeros_like(masks["Chiasm"])
        path = segfile.write_seg_nrrd(self.root / "empty.seg.nrrd", masks, self.case.ct)
        node = SC.load_segmentation(path, self.ct)
        segmentation = node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 47)
        chiasm = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Chiasm"))
        self.assertTrue(chiasm.HasTag(segfile.EMPTY_TAG))
        self.assertFalse(SC.segmentation_masks(node, self.ct, ["Chiasm"])["Chiasm"].any())
        self.assertEqual(node.GetAttribute(SC.EMPTY_ATTRIBUTE), "Chiasm")

    def test_segments_flagged_for_review_are_listed_least_confident_first_with_a_place_to_jump_to(self):
        masks = dict(self.truth)
        masks["Chiasm"] = np.zeros_like(masks["Chiasm"])
        tags = {"Parotid_L": {"SegRap.Review": "1", "SegRap.Confidence": "0.412",
                              "SegRap.ReviewReasons": "low network certainty (expected Dice 0.41)|x"},
                "Chiasm": {"SegRap.Review": "1", "SegRap.Confidence": "0.000", "SegRap.ReviewReasons": "empty"},
                "Brain": {"SegRap.Review": "0", "SegRap.Confidence": "0.990"}}
        path = segfile.write_seg_nrrd(self.root / "flagged.seg.nrrd", masks, self.case.ct, segment_tags=tags)
        node = SC.load_segmentation(path, self.ct)  # read by Slicer's own storage node (slicer-core)
        flagged = SC.flagged_segments(node)
        self.assertEqual([(f.name, f.confidence) for f in flagged], [("Chiasm", 0.0), ("Parotid_L", 0.412)])
        # Slicer splits the tags at '|': the writer turned the reason's '|' into '/', so nothing was cut off
        self.assertEqual(flagged[1].reasons, "low network certainty (expected Dice 0.41)/x")
        self.assertIsNone(SC.segment_center_ras(node, flagged[0].segment_id))  # empty: nowhere to jump
        center = np.array(SC.segment_center_ras(node, flagged[1].segment_id))
        voxels = np.argwhere(self.truth["Parotid_L"])  # z, y, x
        lps = np.array([self.case.ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in voxels.mean(0)[::-1]])])
        ras = lps[0] * [-1, -1, 1]
        self.assertLess(np.linalg.norm(center - ras), 10.0)  # the middle of the parotid, within a voxel or two

    def test_loading_into_an_existing_node_replaces_same_names_and_keeps_the_others(self):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.ct)
        mine = node.GetSegmentation().AddEmptySegment("", "Boost")
        stale = node.GetSegmentation().AddEmptySegment("", "Brain")
        box = np.zeros(self.truth["Brain"].shape, bool)
        box[5:9, 10:20, 10:20] = True
        SC.set_segment_mask(node, mine, box, self.ct)
        SC.set_segment_mask(node, stale, box, self.ct)
        same = SC.load_segmentation(self.result, self.ct, node)
        self.assertIs(same, node)
        masks = SC.segmentation_masks(node, self.ct)
        self.assertEqual(len(masks), 48)
        np.testing.assert_array_equal(masks["Boost"], box)
        np.testing.assert_array_equal(masks["Brain"], self.truth["Brain"])

    def test_a_result_on_another_grid_keeps_the_ct_as_reference(self):
        ct = self.case.ct
        # coarse voxel i covers fine voxels 2i and 2i+1 on each axis: its centre is half a fine voxel further
        shift = np.array(ct.GetDirection()).reshape(3, 3) @ (0.5 * np.array(ct.GetSpacing()))
        small = sitk.Resample(ct, [s // 2 for s in ct.GetSize()], sitk.Transform(), sitk.sitkLinear,
                              (np.array(ct.GetOrigin()) + shift).tolist(), [2 * v for v in ct.GetSpacing()],
                              ct.GetDirection())
        box = np.zeros(tuple(reversed(small.GetSize())), bool)
        box[4:8, 10:20, 10:20] = True
        path = segfile.write_seg_nrrd(self.root / "coarse.seg.nrrd", {"Brain": box}, small)
        node = SC.load_segmentation(path, self.ct)
        mask = SC.segmentation_masks(node, self.ct)["Brain"]
        self.assertEqual(mask.shape, self.truth["Brain"].shape)
        self.assertEqual(int(mask.sum()), 8 * int(box.sum()))  # each coarse voxel covers 2 x 2 x 2 CT voxels


_OBLIQUE: dict = {}


def oblique_dicom():
    """The oblique phantom's CT written as DICOM (24 slices), its series read back, and its 47 masks: made once for
    the module (tearDownModule removes it), since both RTSTRUCT classes only read it."""
    if not _OBLIQUE:
        tmp = tempfile.TemporaryDirectory()
        case = phantom_dicom.variant_case("oblique", size="small", slices=24)
        written = phantom_dicom.write_phantom_dicom(case, Path(tmp.name) / "dicom", variant="oblique")
        _OBLIQUE.update(tmp=tmp, value=(written, dicom.read_ct_series(written.ct_dir), all_masks(written.case)))
    return _OBLIQUE["value"]


def tearDownModule():
    if _OBLIQUE:
        _OBLIQUE.pop("tmp").cleanup()
        _OBLIQUE.clear()


@unittest.skipIf(NO_PYNRRD, PYNRRD_REASON)
class EditedSegmentationToRtStructTest(unittest.TestCase):
    """An edited segmentation node becomes an RTSTRUCT on the CT's original DICOM files, edit included."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.written, cls.series, cls.truth = oblique_dicom()
        cls.result = segfile.write_seg_nrrd(cls.root / "case.seg.nrrd", cls.truth, cls.series.image,
                                            provenance={"bundle": "segrap-demo", "version": "1.2.0"})

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.scene = fresh_scene()
        self.ct = ct_from_dicom(self.scene, self.series)

    def test_a_segment_painted_bigger_is_exported_as_painted(self):
        node = SC.load_segmentation(self.result, self.ct)
        segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Parotid_L")
        original = self.truth["Parotid_L"]
        painted = original | np.roll(original, 3, axis=2) | np.roll(original, -3, axis=1)  # grown in-plane
        self.assertGreater(int(painted.sum()), int(original.sum()) + 50)
        SC.set_segment_mask(node, segment_id, painted, self.ct)

        out = SegmentationLogic().exportRtStruct(node, self.ct, self.root / "out",
                                                 dicomFolder=self.written.ct_dir)
        self.assertEqual(out.name, "CT_from_DICOM_RTSTRUCT.dcm")
        back = rtstruct.read_rtstruct(out, self.series)  # also checks the frame of reference
        self.assertEqual(set(back), set(S.STRUCTURE_NAMES))
        np.testing.assert_array_equal(back["Parotid_L"], painted)
        for name in S.STRUCTURE_NAMES:
            if name != "Parotid_L":
                np.testing.assert_array_equal(back[name], self.truth[name], err_msg=name)
        import pydicom

        ds = pydicom.dcmread(out)
        referenced = {c.ReferencedSOPInstanceUID for item in ds.ROIContourSequence
                      for contour in item.get("ContourSequence", []) for c in contour.ContourImageSequence}
        self.assertLessEqual(referenced, {s.sop_instance_uid for s in self.series.series.slices})
        self.assertEqual(ds.ManufacturerModelName, "segrap-demo")  # recorded when the result was loaded

    def test_a_ct_not_loaded_from_dicom_gets_a_clear_message(self):
        node = SC.load_segmentation(self.result, self.ct)
        self.ct.RemoveAttribute(SC.INSTANCE_UIDS_ATTRIBUTE)
        with self.assertRaisesRegex(DicomError, "was not loaded from DICOM"):
            SegmentationLogic().exportRtStruct(node, self.ct, self.root / "no.dcm")
        self.assertFalse((self.root / "no.dcm").exists())

    def test_dicom_files_gone_from_the_database_are_named(self):
        node = SC.load_segmentation(self.result, self.ct)
        empty = self.root / "empty"
        empty.mkdir(exist_ok=True)
        with self.assertRaisesRegex(DicomError, "not in the DICOM database"):
            SegmentationLogic().exportRtStruct(node, self.ct, self.root / "x.dcm", dicomFolder=empty)


class RtStructExportOffTheGuiThreadTest(unittest.TestCase):
    """The panel's export: the scene is read when the call is made, the RTSTRUCT written by the call on a task's thread."""

    NAMES = ("Eye_L", "Lens_L", "Parotid_L")

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = Path(cls.tmp.name)
        cls.written, cls.series, truth = oblique_dicom()
        cls.truth = {name: truth[name] for name in cls.NAMES}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.scene = fresh_scene()
        self.ct = ct_from_dicom(self.scene, self.series)
        self.node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
        self.node.SetReferenceImageGeometryParameterFromVolumeNode(self.ct)
        for name, mask in self.truth.items():  # as painted in the Segment Editor (no worker result, no pynrrd)
            SC.set_segment_mask(self.node, self.node.GetSegmentation().AddEmptySegment("", name), mask, self.ct)

    def test_the_call_writes_on_a_task_thread_what_the_scene_held_when_it_was_made(self):
        from SegRapSegmenterLib.slicer_bridge.background import BackgroundTask

        call = SegmentationLogic.exportRtStructCall(self.node, self.ct, self.root / "out",
                                                    dicomFolder=self.written.ct_dir)
        self.scene.Clear()  # nothing of the scene is read after the call was made
        threads = []

        def write(report, should_stop):
            threads.append(threading.current_thread())
            return call(report=report, should_stop=should_stop)

        reports = []
        task = BackgroundTask("export", write, progress=lambda m, f: reports.append(m), passes_control=True).start()
        task.wait(timeout_s=120)
        self.assertIsNone(task.error)
        self.assertIsNot(threads[0], threading.main_thread())
        self.assertEqual(task.result.name, "CT_from_DICOM_RTSTRUCT.dcm")
        back = rtstruct.read_rtstruct(task.result, self.series)
        self.assertEqual(set(back), set(self.NAMES))
        for name in self.NAMES:
            np.testing.assert_array_equal(back[name], self.truth[name], err_msg=name)
        self.assertEqual(reports, ["Writing the RTSTRUCT CT_from_DICOM_RTSTRUCT.dcm ..."])

    def test_a_cancelled_export_writes_nothing(self):
        call = SegmentationLogic.exportRtStructCall(self.node, self.ct, self.root / "cancelled.dcm",
                                                    dicomFolder=self.written.ct_dir)
        with self.assertRaises(Cancelled):
            call(should_stop=lambda: True)
        self.assertFalse((self.root / "cancelled.dcm").exists())

    def test_a_ct_without_its_dicom_files_is_refused_when_the_call_is_made(self):
        empty = self.root / "empty"
        empty.mkdir(exist_ok=True)
        with self.assertRaisesRegex(DicomError, "not in the DICOM database"):
            SegmentationLogic.exportRtStructCall(self.node, self.ct, self.root / "x.dcm", dicomFolder=empty)


if __name__ == "__main__":
    unittest.main()
