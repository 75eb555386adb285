"""The module's self-test (Reload and Test, ``ctest py_SegRapSegmenter``): the test methods, mixed into
``SegRapSegmenterTest`` in the module file.

Slicer's test runner loads the module file with ``unittest.TestLoader().loadTestsFromName``
(Base/Python/slicer/testing.py v5.10.0:25, v5.12.0:25) and calls each ``test_*`` method itself,
not ``runTest``: so each test that needs more than Slicer ships skips itself, with the reason.
Imported when Slicer discovers the module (the module file's test class derives from it): standard
library only at the top, Python 3.9 syntax, everything Slicer-specific inside the tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import unittest

# Packages the inference part needs in Slicer's Python; Slicer's extension build servers have none of
# them but scipy, so there the other parts run and this one is skipped with the reason.
INFERENCE_PACKAGES = ("torch", "nnunetv2", "scipy", "nrrd")
SELF_TESTS = ("test_slicer_version_is_supported", "test_terminology_is_registered",
              "test_panel_lists_every_structure", "test_panel_binds_the_parameter_node",
              "test_demo_bundle_end_to_end")


def inference_unavailable() -> str | None:
    """Why the inference part cannot run in this Slicer (None when it can)."""
    missing = [name for name in INFERENCE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not importable in Slicer's Python (as on Slicer's extension build servers)"
    return None


def _panel():
    import slicer

    return slicer.modules.segrapsegmenter.widgetRepresentation().self().panel


class SelfTests:
    """Version check, terminology and panel (always); the whole workflow with the demo bundle when torch is there."""

    def run_all(self) -> None:
        """Every self-test in order, each on a cleared scene; a skipped one says why (Reload and Test)."""
        for name in SELF_TESTS:
            self.setUp()
            try:
                getattr(self, name)()
            except unittest.SkipTest as skip:
                logging.warning(f"SegRapSegmenter self-test: {name} skipped: {skip}")
                self.delayDisplay(f"Skipped: {skip}")

    def test_slicer_version_is_supported(self) -> None:
        from SegRapSegmenterLib.slicer_bridge import compat

        self.delayDisplay("Slicer version")
        self.assertIsNone(compat.running_slicer_problem())
        self.assertIn("5.10", compat.version_problem(5, 8))

    def test_terminology_is_registered(self) -> None:
        self.delayDisplay("SegRap terminology in Slicer")
        import slicer
        from SegRapSegmenterLib.anatomy import structures, terminology
        from SegRapSegmenterLib.slicer_bridge.logic import register_terminology

        name = register_terminology()
        self.assertEqual(name, terminology.CONTEXT_NAME)
        entry = slicer.vtkSlicerTerminologyEntry()
        terminologies = slicer.modules.terminologies.logic()
        self.assertTrue(terminologies.DeserializeTerminologyEntry(terminology.terminology_entry("Parotid_L"), entry))
        # the three-argument form exists from Slicer 5.10 (vtkSlicerTerminologiesModuleLogic.h v5.10.0:374-376)
        self.assertTrue(terminologies.UpdateEntryFromLoadedTerminologies(entry, [name], []))
        color = entry.GetTypeModifierObject().GetRecommendedDisplayRGBValue()
        self.assertEqual(tuple(color), structures.get("Parotid_L").color)
        self.assertEqual(entry.GetTypeModifierObject().GetSlicerLabel(), "Left parotid gland")

    def test_panel_lists_every_structure(self) -> None:
        self.delayDisplay("Structure list of the panel")
        import qt

        panel = _panel()
        tree = panel.ui.structuresTreeWidget
        count = sum(tree.topLevelItem(i).childCount() for i in range(tree.topLevelItemCount))
        self.assertEqual(count, 47)
        panel.ui.subsetStructuresRadioButton.checked = True
        panel.checkAllStructures(False)
        tree.topLevelItem(0).child(0).setCheckState(0, qt.Qt.Checked)
        self.assertEqual(panel.selectedStructures(), [tree.topLevelItem(0).child(0).data(0, qt.Qt.UserRole)])
        panel.ui.allStructuresRadioButton.checked = True
        self.assertIsNone(panel.selectedStructures())

    def test_panel_binds_the_parameter_node(self) -> None:
        """Widgets -> parameter node and back, for the connector-bound and the hand-synced fields, and Close Scene."""
        self.delayDisplay("Panel <-> parameter node")
        import qt
        import slicer
        from SegRapSegmenterLib.slicer_bridge import parameters

        settings = qt.QSettings()
        saved = {key: settings.value(parameters.SETTINGS_PREFIX + key) for key in parameters.PERSISTENT}
        panel = _panel()
        try:
            panel.initializeParameterNode()
            p, ui = panel._parameterNode, panel.ui
            self.assertIsNotNone(panel._parameterNodeGuiTag)
            ui.mirroringCheckBox.checked = not p.mirror
            self.assertEqual(p.mirror, ui.mirroringCheckBox.checked)
            p.lowMemory = not ui.lowMemoryCheckBox.checked
            self.assertEqual(ui.lowMemoryCheckBox.checked, p.lowMemory)
            ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
            self.assertEqual(p.device, "cpu")
            p.device = "auto"
            self.assertEqual(ui.deviceComboBox.currentText, "auto")
            ui.foldsLineEdit.text = "0,1"
            self.assertEqual(p.folds, "0,1")
            p.pythonExecutable = os.path.join(tempfile.gettempdir(), "python")
            self.assertEqual(ui.pythonExecutablePathLineEdit.currentPath, p.pythonExecutable)
            ui.pythonExecutablePathLineEdit.currentPath = ""  # heard through validInputChanged(false) only
            self.assertEqual(p.pythonExecutable, "")
            if ui.modelBundleComboBox.count:
                ui.modelBundleComboBox.currentIndex = ui.modelBundleComboBox.count - 1
                self.assertEqual(p.bundle, ui.modelBundleComboBox.currentText)
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Bound CT")
            p.ctVolume = volume
            self.assertIs(ui.ctVolumeSelector.currentNode(), volume)
            before = p.parameterNode
            # Close Scene: the singleton parameter node stays, reset to its defaults (vtkMRMLScene.cxx v5.10.0:348-383)
            slicer.mrmlScene.Clear()
            if panel.host.parent.isEntered:
                self.assertIs(panel._parameterNode.parameterNode, before)
                self.assertIsNone(panel._parameterNode.ctVolume)
                self.assertEqual(before.GetAttribute(parameters.SETTINGS_APPLIED), "1")  # set up again
                self.assertIsNotNone(panel._parameterNodeGuiTag)
            else:
                self.assertIsNone(panel._parameterNode)
        finally:
            for key, value in saved.items():
                if value is None:
                    settings.remove(parameters.SETTINGS_PREFIX + key)
                else:
                    settings.setValue(parameters.SETTINGS_PREFIX + key, value)

    def test_demo_bundle_end_to_end(self) -> None:
        """Phantom CT and contrast CT (as DICOM) -> demo bundle on CPU -> 47 segments -> RTSTRUCT read back."""
        reason = inference_unavailable()
        if reason:
            self.skipTest(f"inference part: {reason}")
        self.delayDisplay("Demo bundle on a phantom case (CPU, a few minutes)")
        import slicer
        from SegRapSegmenterLib.anatomy import structures
        from SegRapSegmenterLib.formats import dicom, rtstruct
        from SegRapSegmenterLib.phantom import cases as phantom
        from SegRapSegmenterLib.phantom import dicom_series as phantom_dicom
        from SegRapSegmenterLib.slicer_bridge import scene
        from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic

        with tempfile.TemporaryDirectory(prefix="segrap-selftest-") as tmp:
            case = phantom.make_case(0, seed=99, size="small")
            written = phantom_dicom.write_phantom_dicom(case, tmp)
            ctSeries = dicom.read_ct_series(written.ct_dir)
            ct = scene.add_volume_node(slicer.mrmlScene, ctSeries.image, "Phantom CT")
            ct.SetAttribute(scene.INSTANCE_UIDS_ATTRIBUTE, " ".join(s.sop_instance_uid for s in ctSeries.series.slices))
            contrast = scene.add_volume_node(slicer.mrmlScene, dicom.read_ct_series(written.contrast_dir).image,
                                             "Phantom contrast CT")
            logic = SegmentationLogic()
            events = []
            segmentation = logic.segment(ct, contrast, bundle="demo", device="cpu", progress=events.append)
            self.assertTrue(any(e.get("event") == "progress" for e in events))
            names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            self.assertEqual(names, list(structures.STRUCTURE_NAMES))
            masks = scene.segmentation_masks(segmentation, ct)
            lens, eye = masks["Lens_L"], masks["Eye_L"]
            self.assertTrue(lens.any(), "the demo model found no left lens")
            self.assertFalse((lens & ~eye).any(), "Lens_L must lie inside Eye_L (overlapping segments)")

            self.delayDisplay("Structures flagged for review, in the panel")
            import json

            provenance = json.loads(segmentation.GetAttribute(scene.PROVENANCE_ATTRIBUTE) or "{}")
            flagged = scene.flagged_segments(segmentation)
            self.assertEqual(sorted(f.name for f in flagged), sorted(provenance["review"]["flagged"]))
            panel = _panel()
            if panel is not None:
                shown = panel.showReview(segmentation)
                self.assertEqual([f.name for f in shown], [f.name for f in flagged])
                self.assertEqual(panel.ui.reviewListWidget.count, max(1, len(flagged)))

            self.delayDisplay("RTSTRUCT export and read-back")
            path = logic.exportRtStruct(segmentation, ct, os.path.join(tmp, "out"), dicomFolder=str(written.ct_dir))
            back = rtstruct.read_rtstruct(path, ctSeries)
            self.assertEqual(set(back), set(structures.STRUCTURE_NAMES))
            self.assertTrue((back["Lens_L"] == lens).all())
        self.delayDisplay("SegRap self-test passed")
