"""SegRapSegmenter: the 3D Slicer module of SegRapExtension (thin: metadata, panel wiring, logic facade).

Head-and-neck auto-contouring (45 organs at risk on CT, GTVp and GTVnd on contrast CT) with the DKFZ
nnU-Net method of the SegRap 2023 challenge. All the work is done by the headless core package
``SegRapSegmenterLib`` next to this file; this module only wires the GUI to it.

Status of this file (skeleton of issue 2; the module itself is issue 5):
- working: module metadata, loading the panel (Resources/UI/SegRapSegmenter.ui), the parameter node
  bound to the panel, the structure list filled from the catalogue, registering the SegRap terminology
  with Slicer's Terminologies module, and a self-test of those;
- not implemented yet (issue 5): running the segmentation, cancel, model install/verify and RTSTRUCT
  export. ``SegRapSegmenterLogic`` raises ``NotImplementedError`` for them and the panel says so.
No image processing happens here (a packaging test checks that this file imports no numpy, SimpleITK
or scipy).
"""

from __future__ import annotations

import logging
import os
import sys

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

LIBRARY = "SegRapSegmenterLib"
TERMINOLOGY_FILE = os.path.join(os.path.dirname(__file__), "Resources", "SegRapSegmenter.term.json")
NOT_IMPLEMENTED = ("{what} is not implemented yet in the Slicer module (SegRapExtension issue 5: "
                   "asynchronous run, model store and RTSTRUCT export).")


def registerTerminology() -> str:
    """Load the SegRap terminology into Slicer's Terminologies module; returns its context name."""
    terminologies = slicer.modules.terminologies.logic()
    name = terminologies.LoadTerminologyFromFile(TERMINOLOGY_FILE)
    if not name:
        raise RuntimeError(f"Slicer could not load the terminology file {TERMINOLOGY_FILE}.")
    return name


#
# Module metadata
#


class SegRapSegmenter(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegRap Segmenter"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["SegRapExtension developers"]
        self.parent.helpText = (
            "Automatic contouring of 45 head-and-neck organs at risk on CT and of the nasopharyngeal "
            "tumour volumes (GTVp, GTVnd) on contrast CT, with the DKFZ nnU-Net method of the SegRap 2023 "
            "challenge. Results are overlapping, editable segments with standard (SNOMED CT) terminology "
            "that can be exported as DICOM RTSTRUCT. See "
            '<a href="https://github.com/SegRapExtension/SegRapExtension">the project page</a>.'
        )
        self.parent.acknowledgementText = (
            "Method: DKFZ's SegRap 2023 submission (MultiTalent pre-training, nnU-Net ResEnc fine-tuning). "
            "Challenge data and evaluation: SegRap 2023 organizers (Luo et al., Medical Image Analysis 2025)."
        )
        slicer.app.connect("startupCompleted()", _registerTerminologyQuietly)


def _registerTerminologyQuietly() -> None:
    try:
        registerTerminology()
    except Exception as exc:  # never block Slicer's start-up; the self-test reports it
        logging.warning(f"SegRapSegmenter: {exc}")


#
# Parameter node: the panel's state, saved with the scene
#


@parameterNodeWrapper
class SegRapSegmenterParameterNode:
    """GUI state; each field is bound to the .ui widget whose SlicerParameterName is the field name."""

    ctVolume: vtkMRMLScalarVolumeNode
    contrastCtVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    exportSegmentation: vtkMRMLSegmentationNode
    segmentOars: bool = True
    segmentGtvs: bool = True
    bundle: str = ""
    device: str = "auto"
    folds: str = ""
    mirror: bool = False
    lowMemory: bool = False
    pythonExecutable: str = ""


#
# Widget
#


class SegRapSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the panel and connects it to the parameter node and the logic; no processing here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegRapSegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegRapSegmenterLogic()
        self._fillStructureTree()
        _registerTerminologyQuietly()  # also when the module is loaded after start-up or reloaded

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.subsetStructuresRadioButton.connect("toggled(bool)", self.ui.structuresTreeWidget.setEnabled)
        self.ui.selectAllStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(True))
        self.ui.clearStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(False))
        for button in (self.ui.installModelFromFileButton, self.ui.installModelFromUrlButton,
                       self.ui.verifyModelButton, self.ui.exportRtStructToFolderButton,
                       self.ui.exportRtStructToDatabaseButton):
            button.connect("clicked(bool)", self.onNotImplementedButton)
        self.ui.statusLabel.text = NOT_IMPLEMENTED.format(what="Running the segmentation")

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        self._disconnectParameterNode()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload the core package too, so edits to SegRapSegmenterLib take effect without a restart."""
        for name in [m for m in sys.modules if m == LIBRARY or m.startswith(LIBRARY + ".")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        """Bind the panel to the scene's parameter node, picking the first CT when none is set."""
        self._disconnectParameterNode()
        self._parameterNode = self.logic.getParameterNode()
        if not self._parameterNode.ctVolume:
            self._parameterNode.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)
        self._updateApplyButton()

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApplyButton)

    def _updateApplyButton(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ready = bool(p and (p.segmentOars and p.ctVolume or p.segmentGtvs and p.contrastCtVolume))
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = ("Segment the selected structures." if ready else
                                       "Select a CT for the organs at risk or a contrast CT for the GTVs.")

    def _fillStructureTree(self) -> None:
        """One checkable item per structure, under one parent item per region."""
        tree = self.ui.structuresTreeWidget
        tree.clear()
        for group, members in self.logic.structureGroups().items():
            parent = qt.QTreeWidgetItem(tree, [group])
            parent.setFlags(parent.flags() | qt.Qt.ItemIsAutoTristate | qt.Qt.ItemIsUserCheckable)
            for name, displayName in members:
                child = qt.QTreeWidgetItem(parent, [displayName])
                child.setData(0, qt.Qt.UserRole, name)
                child.setFlags(child.flags() | qt.Qt.ItemIsUserCheckable)
                child.setCheckState(0, qt.Qt.Checked)

    def _checkAllStructures(self, checked: bool) -> None:
        state = qt.Qt.Checked if checked else qt.Qt.Unchecked
        tree = self.ui.structuresTreeWidget
        for i in range(tree.topLevelItemCount):
            tree.topLevelItem(i).setCheckState(0, state)

    def selectedStructures(self) -> list[str] | None:
        """SegRap names checked in the tree, or None when "All" is selected."""
        if self.ui.allStructuresRadioButton.checked:
            return None
        tree = self.ui.structuresTreeWidget
        names = []
        for i in range(tree.topLevelItemCount):
            group = tree.topLevelItem(i)
            for j in range(group.childCount()):
                child = group.child(j)
                if child.checkState(0) == qt.Qt.Checked:
                    names.append(child.data(0, qt.Qt.UserRole))
        return names

    def onApplyButton(self) -> None:
        p = self._parameterNode
        tasks = [task for task, on in (("oar", p.segmentOars), ("gtv", p.segmentGtvs)) if on]
        with slicer.util.tryWithErrorDisplay("SegRap segmentation failed.", waitCursor=True):
            segmentation = self.logic.segment(
                p.ctVolume, p.contrastCtVolume, p.outputSegmentation, tasks=tasks,
                structures=self.selectedStructures(), device=p.device, folds=p.folds or None,
                mirror=p.mirror, bundle=p.bundle or None)
            p.outputSegmentation = segmentation

    def onNotImplementedButton(self) -> None:
        slicer.util.warningDisplay(NOT_IMPLEMENTED.format(what="This action"), windowTitle="SegRap Segmenter")


#
# Logic: the facade the GUI and the Python console use; everything is delegated to SegRapSegmenterLib
#


class SegRapSegmenterLogic(ScriptedLoadableModuleLogic):
    """Facade over the core package for the GUI and the Python console.

    Implemented: ``getParameterNode``, ``structureGroups`` (from the catalogue), ``registerTerminology``.
    Not implemented yet (issue 5), raising ``NotImplementedError``: ``segment``, ``cancel``,
    ``exportRtStruct``, ``installModel``, ``verifyModel``.
    """

    def getParameterNode(self) -> SegRapSegmenterParameterNode:
        return SegRapSegmenterParameterNode(super().getParameterNode())

    @staticmethod
    def structureGroups() -> dict[str, list[tuple[str, str]]]:
        """Catalogue structures by region group: {group: [(SegRap name, display name), ...]}."""
        from SegRapSegmenterLib import structures

        groups: dict[str, list[tuple[str, str]]] = {}
        for s in structures.STRUCTURES:
            groups.setdefault(s.group, []).append((s.name, s.display_name))
        return groups

    @staticmethod
    def registerTerminology() -> str:
        """Load the SegRap terminology into Slicer; returns its context name."""
        return registerTerminology()

    def segment(self, ctNode, contrastCtNode=None, segmentationNode=None, tasks=("oar", "gtv"), structures=None,
                device="auto", folds=None, mirror=False, bundle=None, wait=True, progress=None):
        """Segment the CT (and contrast CT) into ``segmentationNode``; not implemented yet (issue 5)."""
        raise NotImplementedError(NOT_IMPLEMENTED.format(what="Running the segmentation"))

    def cancel(self) -> None:
        """Stop a running segmentation; not implemented yet (issue 5)."""
        raise NotImplementedError(NOT_IMPLEMENTED.format(what="Cancelling a run"))

    def exportRtStruct(self, segmentationNode, ctNode, path):
        """Write an RTSTRUCT referencing the CT's DICOM files; not implemented yet (issue 5)."""
        raise NotImplementedError(NOT_IMPLEMENTED.format(what="RTSTRUCT export"))

    def installModel(self, source):
        """Install a model bundle from a folder, zip or URL; not implemented yet (issue 5)."""
        raise NotImplementedError(NOT_IMPLEMENTED.format(what="Installing a model bundle"))

    def verifyModel(self, name):
        """Check a model bundle's files against its manifest; not implemented yet (issue 5)."""
        raise NotImplementedError(NOT_IMPLEMENTED.format(what="Verifying a model bundle"))


#
# Self-test (run in Slicer: Reload and Test, or ctest py_SegRapSegmenter)
#


class SegRapSegmenterTest(ScriptedLoadableModuleTest):
    """Checks what the module does today; the end-to-end test of issue 5 (phantom -> demo bundle ->
    47 segments -> RTSTRUCT) is still to be written."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_terminology_is_registered()
        self.setUp()
        self.test_panel_lists_every_structure()
        self.setUp()
        self.test_unimplemented_actions_say_so()

    def test_terminology_is_registered(self) -> None:
        self.delayDisplay("SegRap terminology in Slicer")
        from SegRapSegmenterLib import terminology

        name = SegRapSegmenterLogic.registerTerminology()
        self.assertEqual(name, terminology.CONTEXT_NAME)
        entry = slicer.vtkSlicerTerminologyEntry()
        terminologies = slicer.modules.terminologies.logic()
        self.assertTrue(terminologies.DeserializeTerminologyEntry(terminology.terminology_entry("Parotid_L"), entry))
        self.assertTrue(terminologies.UpdateEntryFromLoadedTerminologies(entry, [name], []))
        color = entry.GetTypeModifierObject().GetRecommendedDisplayRGBValue()
        from SegRapSegmenterLib import structures

        self.assertEqual(tuple(color), structures.get("Parotid_L").color)
        self.assertEqual(entry.GetTypeModifierObject().GetSlicerLabel(), "Left parotid gland")

    def test_panel_lists_every_structure(self) -> None:
        self.delayDisplay("Structure list of the panel")
        widget = slicer.modules.segrapsegmenter.widgetRepresentation().self()
        tree = widget.ui.structuresTreeWidget
        count = sum(tree.topLevelItem(i).childCount() for i in range(tree.topLevelItemCount))
        self.assertEqual(count, 47)
        widget.ui.subsetStructuresRadioButton.checked = True
        widget._checkAllStructures(False)
        tree.topLevelItem(0).child(0).setCheckState(0, qt.Qt.Checked)
        self.assertEqual(widget.selectedStructures(), [tree.topLevelItem(0).child(0).data(0, qt.Qt.UserRole)])
        widget.ui.allStructuresRadioButton.checked = True
        self.assertIsNone(widget.selectedStructures())

    def test_unimplemented_actions_say_so(self) -> None:
        self.delayDisplay("Placeholders raise NotImplementedError")
        logic = SegRapSegmenterLogic()
        with self.assertRaisesRegex(NotImplementedError, "issue 5"):
            logic.segment(None)
