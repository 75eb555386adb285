"""SegRapSegmenterLogic's work (SegRapSegmenterLib.slicer_bridge.logic) with the real worker process on real MRML scenes.

Two worker runs in all: one cancelled on its first inference progress event (through the
asynchronous path, polled by an injected scheduler as Slicer's qt timer would), and one complete
run on a small CT crop. They use the packaged demo bundle, or an untrained development bundle at
/tmp/dev-bundle where the demo bundle is not there yet (mechanics only: its contours are noise).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
import unittest
from pathlib import Path

import slicer
from SegRapSegmenterLib.errors import Cancelled, InputError, ModelError, SegRapError
from SegRapSegmenterLib.inference import bundles as models
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.runner import process_tree
from SegRapSegmenterLib.slicer_bridge import scene as SC
from SegRapSegmenterLib.slicer_bridge.dependencies import WORKER_IMPORTS, missing_here
from SegRapSegmenterLib.slicer_bridge.logic import CANCELLED, DONE, FAILED, SegmentationLogic

DEV_BUNDLE = Path("/tmp/dev-bundle")


def test_bundle() -> str | None:
    """The demo bundle when it is packaged, else the development bundle, else None."""
    if (models.DEMO_BUNDLE_PATH / models.MANIFEST_NAME).is_file():
        return "demo"
    if (DEV_BUNDLE / models.MANIFEST_NAME).is_file():
        return str(DEV_BUNDLE)
    return None


test_bundle.__test__ = False  # a helper, not a test
BUNDLE = test_bundle()
# what the worker runs need in this Python (Slicer's own): none of it but scipy ships with Slicer, so in a
# stock Slicer those runs are skipped with this reason; the input checks run everywhere
MISSING_FOR_RUNS = missing_here((*WORKER_IMPORTS, "psutil"))


@functools.lru_cache(maxsize=None)
def small_case(seed: int) -> phantom.PhantomCase:
    """Phantom case 0 of a cohort, small size: deterministic, so made once per seed (1-2 s each) and shared."""
    return phantom.make_case(0, seed=seed, size="small")


def fresh_scene():
    """Slicer's scene, cleared, inside Slicer; a new headless scene with slicer-core."""
    if hasattr(slicer, "app"):
        slicer.mrmlScene.Clear()
        return slicer.mrmlScene
    return SC.headless_scene()


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def alive(pid: int) -> bool:
    """True while ``pid`` runs (psutil: the same on every OS; a zombie has ended)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LogicInputsTest(unittest.TestCase):
    """Wrong inputs are refused before any worker starts, and leave the scene as it was."""

    def setUp(self):
        self.scene = fresh_scene()
        self.ct = SC.add_volume_node(self.scene, small_case(0).ct, "CT")

    def test_gtvs_without_a_contrast_ct_are_refused(self):
        before = node_ids(self.scene)
        with self.assertRaisesRegex(InputError, "contrast CT"):
            SegmentationLogic().segment(self.ct, None, tasks=("oar", "gtv"))
        self.assertEqual(node_ids(self.scene), before)

    def test_a_structure_subset_outside_the_tasks_is_refused(self):
        with self.assertRaisesRegex(InputError, "None of the selected structures"):
            SegmentationLogic().segment(self.ct, None, tasks=("oar",), structures=["GTVp"])

    def test_worker_error_surfaces_as_the_cores_exception_and_the_scene_is_unchanged(self):
        before = node_ids(self.scene)
        logic = SegmentationLogic()
        # a missing bundle; in a stock Slicer (no torch) the worker says first that torch is not installed,
        # checked before the bundle (the device is among the cheap checks): a ModelError either way
        with self.assertRaisesRegex(ModelError, "not installed"):
            logic.segment(self.ct, None, tasks=("oar",), bundle=str(Path(tempfile.gettempdir()) / "no-such-bundle"),
                          device="cpu")
        self.assertEqual(node_ids(self.scene), before)
        self.assertFalse(logic.run.workdir.exists())


@unittest.skipIf(MISSING_FOR_RUNS, f"{', '.join(MISSING_FOR_RUNS)} not installed in this Python (as in a stock "
                                   "Slicer): the worker cannot run")
@unittest.skipIf(BUNDLE is None, "no model bundle: neither the demo bundle nor /tmp/dev-bundle is there")
class LogicWorkerRunTest(unittest.TestCase):
    """Real worker runs through the logic: cancel mid-run, and a complete run into a segmentation node."""

    def setUp(self):
        self.scene = fresh_scene()

    def test_cancel_on_the_first_inference_progress_leaves_the_scene_unchanged(self):
        case = small_case(0)
        ct = SC.add_volume_node(self.scene, case.ct, "CT")
        contrast = SC.add_volume_node(self.scene, case.contrast_ct, "Contrast CT")
        before = node_ids(self.scene)
        polls, events, finished, tree = [], [], [], []
        logic = SegmentationLogic(scheduler=polls.append)  # stands in for Slicer's qt timer

        def progress(event):
            events.append(event)
            if event.get("event") == "progress" and event.get("stage", "").endswith("-inference"):
                tree.extend(p.pid for p in process_tree(logic.run.worker.process.pid))
                logic.cancel()

        node = logic.segment(ct, contrast, bundle=BUNDLE, device="cpu", wait=False, progress=progress,
                             finished=finished.append)
        self.assertEqual(len(polls), 1)  # returned at once, with the run handed to the scheduler
        self.assertTrue(logic.running)
        self.assertIsNotNone(self.scene.GetNodeByID(node.GetID()))  # the output node exists while running
        with self.assertRaisesRegex(SegRapError, "already running"):
            logic.segment(ct, contrast, bundle=BUNDLE)
        deadline = time.monotonic() + 120
        while polls[0]():
            self.assertLess(time.monotonic(), deadline, "the run neither reached inference nor stopped")
            time.sleep(0.05)
        run = logic.run
        self.assertEqual(run.state, CANCELLED)
        self.assertEqual(finished, [run])
        self.assertTrue(any(e.get("stage", "").endswith("-inference") for e in events))
        self.assertEqual(node_ids(self.scene), before)  # the output node is gone again
        self.assertIsNotNone(run.worker.process.poll())
        self.assertTrue(tree)
        self.assertEqual([pid for pid in tree if alive(pid)], [])  # the worker and everything it had started
        self.assertFalse(run.workdir.exists())
        with self.assertRaises(Cancelled):
            run.result()

    def test_a_complete_run_fills_a_new_segmentation_node_with_the_chosen_structures(self):
        case = small_case(0)
        crop = case.ct[0:40, 20:60, 14:30]  # small, with air around the head: seconds, not a minute
        ct = SC.add_volume_node(self.scene, crop, "Small CT")
        before = set(node_ids(self.scene))
        events = []
        logic = SegmentationLogic()
        node = logic.segment(ct, None, tasks=("oar", "gtv"), structures=["eye_l", "Lens_L", "Parotid_L"],
                             bundle=BUNDLE, device="cpu", progress=events.append, show3D=True)
        self.assertEqual(logic.run.state, DONE)
        self.assertIn(node.GetID(), set(node_ids(self.scene)) - before)
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["Eye_L", "Lens_L", "Parotid_L"])  # catalogue order and spelling; GTVs skipped
        reference = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        self.assertEqual(reference.GetID(), ct.GetID())
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))  # shown in 3D
        self.assertTrue(node.GetAttribute(SC.MODEL_ATTRIBUTE))
        masks = SC.segmentation_masks(node, ct)
        self.assertEqual(masks["Eye_L"].shape, tuple(reversed(crop.GetSize())))
        self.assertFalse((masks["Lens_L"] & ~masks["Eye_L"]).any())  # recomposed: the lens lies in the eye
        stages = [e["stage"] for e in events if e.get("event") == "progress"]
        self.assertIn("oar-inference", stages)
        self.assertNotIn("gtv-inference", stages)
        fractions = [e["fraction"] for e in events if e.get("event") == "progress"]
        self.assertEqual(fractions, sorted(fractions))
        self.assertEqual(fractions[-1], 1.0)
        self.assertFalse(logic.run.workdir.exists())

    def test_stop_ends_the_worker_at_once_and_calls_nothing_back(self):
        # what cleanup() does on module reload and Slicer exit: no later timer tick will finish the run
        ct = SC.add_volume_node(self.scene, small_case(0).ct, "CT")
        before = node_ids(self.scene)
        called = []
        logic = SegmentationLogic(scheduler=lambda poll: None)
        logic.segment(ct, None, tasks=("oar",), bundle=BUNDLE, device="cpu", wait=False, progress=called.append,
                      finished=called.append)
        run = logic.run
        logic.stop()
        self.assertEqual(run.state, CANCELLED)
        self.assertEqual(called, [])
        self.assertIsNotNone(run.worker.process.poll())  # the worker has ended
        self.assertFalse(run.workdir.exists())
        self.assertEqual(node_ids(self.scene), before)
        logic.stop()  # a second stop (reload after exit) does nothing

    def test_a_run_that_ends_after_its_scene_was_cleared_fails_cleanly(self):
        # Close Scene while the worker runs: the result has nowhere to go, and nothing raises into the timer
        crop = small_case(0).ct[0:40, 20:60, 14:30]
        ct = SC.add_volume_node(self.scene, crop, "Small CT")
        polls, finished = [], []
        logic = SegmentationLogic(scheduler=polls.append)
        logic.segment(ct, None, tasks=("oar",), structures=["Eye_L"], bundle=BUNDLE, device="cpu", wait=False,
                      finished=finished.append, show3D=False)
        self.scene.Clear(0)
        deadline = time.monotonic() + 300
        while polls[0]():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        run = logic.run
        self.assertEqual(finished, [run])
        self.assertEqual(run.state, FAILED)
        self.assertIn("not in a scene", str(run.error))
        self.assertIsNone(run.segmentation_node)  # the node it made went with the scene, and is not kept
        self.assertFalse(run.workdir.exists())

    @unittest.skipIf(BUNDLE != "demo", "needs the packaged demo bundle (a trained model that places left by position)")
    def test_a_left_right_swap_is_collected_for_the_modules_warning_dialog(self):
        # the demo bundle with its training orientation misdeclared (LPS models labelled RPS, in the manifest
        # and in the dataset.json the conversion wrote, else the bundle is refused): every input reaches
        # the network mirrored and the left structures come back on the patient's right
        bundle = Path(tempfile.mkdtemp()) / "misdeclared"
        shutil.copytree(models.DEMO_BUNDLE_PATH, bundle)
        manifest = json.loads((bundle / models.MANIFEST_NAME).read_text())
        manifest["tasks"]["oar"]["orientation"] = "RPS"
        dataset_path = bundle / "oar" / "dataset.json"
        dataset = json.loads(dataset_path.read_text())
        dataset[models.DATASET_ORIENTATION_KEY] = "RPS"
        dataset_path.write_text(json.dumps(dataset))
        manifest["files"]["oar/dataset.json"] = models.sha256_file(dataset_path)
        (bundle / models.MANIFEST_NAME).write_text(json.dumps(manifest))
        try:
            ct = SC.add_volume_node(self.scene, small_case(99).ct, "CT")
            logic = SegmentationLogic()
            logic.segment(ct, None, tasks=("oar",), structures=["Mandible_L", "Mandible_R"], bundle=str(bundle),
                          device="cpu", show3D=False)
        finally:
            shutil.rmtree(bundle.parent, ignore_errors=True)
        self.assertEqual(logic.run.state, DONE)
        self.assertEqual(len(logic.run.laterality_warnings), 1, logic.run.warnings)
        self.assertTrue(logic.run.laterality_warnings[0].startswith("Mandible_L lies to the patient's right of "
                                                                     "Mandible_R"))


if __name__ == "__main__":
    unittest.main()
