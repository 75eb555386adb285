"""SegRapSegmenter: the 3D Slicer module of SegRapExtension (thin: metadata, panel wiring, logic facade, self-test).

Head-and-neck auto-contouring (45 organs at risk on CT, GTVp and GTVnd on contrast CT) with the DKFZ
nnU-Net method of the SegRap 2023 challenge. All the work is done by the headless core package
``SegRapSegmenterLib`` next to this file, through its ``slicer_bridge``: ``logic`` (runs the worker
process, polls it from a qt timer, cancel, RTSTRUCT export, model store), ``scene`` (volume and
segmentation nodes <-> files) and ``dependencies`` (what the worker's Python needs, pinned installs). This file only wires the
panel to them; it does no image processing (a packaging test checks that it imports no numpy,
SimpleITK or scipy).

What only real Slicer can check (headless tests cover everything below the widgets): the panel
wiring, the qt timer, the consent dialogs and ``slicer.util.pip_install``, the DICOM database
import of an exported RTSTRUCT.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

import qt
import slicer
import vtk
from SegRapSegmenterLib.slicer_bridge.logic import CANCELLED, DONE, SegmentationLogic
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
SETTINGS_PREFIX = "SegRapSegmenter/"
PERSISTENT = ("bundle", "device", "folds", "mirror", "lowMemory", "pythonExecutable")  # kept in the application settings
LOW_MEMORY_NOTE = ("For GPUs with little memory: class scores and the image stay in CPU memory and only tiles go "
                   "to the GPU (slower). Running out of GPU memory switches to this by itself, with a warning.")


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
        self._probe = None  # dependencies.PythonProbe of the selected Python, once known
        self._elapsedTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegRapSegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegRapSegmenterLogic()
        try:
            self._fillStructureTree()
            self._fillBundles()
        except ImportError as exc:  # scipy missing in Slicer's Python: Apply offers to install it
            logging.warning(f"SegRapSegmenter: {exc}; press Apply to install the missing packages.")
        _registerTerminologyQuietly()  # also when the module is loaded after start-up or reloaded

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.subsetStructuresRadioButton.connect("toggled(bool)", self.ui.structuresTreeWidget.setEnabled)
        self.ui.selectAllStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(True))
        self.ui.clearStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(False))
        self.ui.modelBundleComboBox.connect("currentTextChanged(QString)", self._showBundle)
        self.ui.installModelFromFileButton.connect("clicked(bool)", self.onInstallModelFromFile)
        self.ui.installModelFromUrlButton.connect("clicked(bool)", self.onInstallModelFromUrl)
        self.ui.verifyModelButton.connect("clicked(bool)", self.onVerifyModel)
        self.ui.exportRtStructToFolderButton.connect("clicked(bool)", self.onExportToFolder)
        self.ui.exportRtStructToDatabaseButton.connect("clicked(bool)", self.onExportToDatabase)
        self.ui.pythonExecutablePathLineEdit.connect("currentPathChanged(QString)", lambda _: self._forgetProbe())
        self.ui.lowMemoryCheckBox.toolTip = LOW_MEMORY_NOTE
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self.ui.deviceInfoLabel.text = "Checked when you first press Apply."

        self.initializeParameterNode()
        self._showBundle(self.ui.modelBundleComboBox.currentText)

    def cleanup(self) -> None:
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.running:
            self.logic.cancel()
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

    # -- parameter node and settings -------------------------------------------------------

    def initializeParameterNode(self) -> None:
        """Bind the panel to the scene's parameter node (new ones start from the saved settings)."""
        self._disconnectParameterNode()
        self._parameterNode = self.logic.getParameterNode()
        p = self._parameterNode
        if not p.parameterNode.GetAttribute("SegRapSegmenter.SettingsApplied"):
            settings = qt.QSettings()
            for key in PERSISTENT:
                value = settings.value(SETTINGS_PREFIX + key)
                if value is not None:
                    setattr(p, key, slicer.util.toBool(value) if isinstance(getattr(p, key), bool) else str(value))
            p.parameterNode.SetAttribute("SegRapSegmenter.SettingsApplied", "1")
        if not p.ctVolume:
            p.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._parameterNodeGuiTag = p.connectGui(self.ui)
        self.addObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _disconnectParameterNode(self) -> None:
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        settings = qt.QSettings()
        for key in PERSISTENT:
            settings.setValue(SETTINGS_PREFIX + key, getattr(p, key))
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        p = self._parameterNode
        if self.logic.running:
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Cancel", True
            self.ui.applyButton.toolTip = "Stop the running segmentation; the scene stays as it was."
            return
        ready = bool(p and (p.segmentOars and p.ctVolume or p.segmentGtvs and p.contrastCtVolume))
        self.ui.applyButton.text, self.ui.applyButton.enabled = "Apply", ready
        self.ui.applyButton.toolTip = ("Segment the selected structures." if ready else
                                       "Select a CT for the organs at risk or a contrast CT for the GTVs.")

    # -- structures ---------------------------------------------------------------------------

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

    # -- dependencies ---------------------------------------------------------------------------

    def _python(self) -> str:
        from SegRapSegmenterLib.slicer_bridge.logic import default_python

        return (self._parameterNode.pythonExecutable if self._parameterNode else "") or default_python()

    def _forgetProbe(self) -> None:
        self._probe = None
        self.ui.deviceInfoLabel.text = "Checked when you next press Apply."

    def _ensureDependencies(self) -> bool:
        """Check the worker's Python and Slicer's own; offer a pinned install into Slicer's Python. True when ready."""
        from SegRapSegmenterLib.slicer_bridge import dependencies

        python = self._python()
        ownPython = not (self._parameterNode and self._parameterNode.pythonExecutable)
        if self._probe is None or self._probe.executable != python:
            with slicer.util.WaitCursor():
                self.ui.statusLabel.text = f"Checking the Python environment {python} ..."
                slicer.app.processEvents()
                self._probe = dependencies.probe_python(python)
            self.ui.deviceInfoLabel.text = self._probe.device_text()
            self.ui.statusLabel.text = ""
        if self._probe.error:
            slicer.util.errorDisplay(f"Cannot use the Python executable {python}:\n{self._probe.error}",
                                     windowTitle="SegRap Segmenter")
            return False
        if not ownPython and self._probe.missing:
            plan = dependencies.install_plan(self._probe.missing)
            slicer.util.errorDisplay(
                f"The Python environment {python} lacks: {', '.join(self._probe.missing)}.\n\nInstall them there, "
                f"for example:\n{dependencies.manual_command(python, plan)}", windowTitle="SegRap Segmenter")
            return False
        missing = sorted(set(dependencies.missing_here()) | (set(self._probe.missing) if ownPython else set()))
        if not missing:
            return True
        plan = dependencies.install_plan(missing)
        if plan.refused:
            slicer.util.errorDisplay(f"Slicer's own Python lacks {', '.join(plan.refused)}: reinstall Slicer.",
                                     windowTitle="SegRap Segmenter")
            return False
        if not slicer.util.confirmOkCancelDisplay(
                "SegRap Segmenter needs Python packages that are not installed yet:\n\n"
                f"{plan.describe()}\n\nThey are downloaded from the Python Package Index (several GB for "
                "PyTorch with CUDA). Slicer's own packages (SimpleITK, numpy, vtk) are kept as they are. "
                "Slicer must be restarted afterwards. Install now?", windowTitle="SegRap Segmenter"):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the packages failed.", waitCursor=True):
            dependencies.install_in_slicer(plan, slicer.util.pip_install, tempfile.gettempdir())
            self._probe = None
            if slicer.util.confirmOkCancelDisplay("The packages were installed. Restart Slicer now?",
                                                  windowTitle="SegRap Segmenter"):
                slicer.util.restart()
        return False

    # -- running --------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling ..."
            self.ui.applyButton.enabled = False
            return
        p = self._parameterNode
        if not self._ensureDependencies():
            return
        tasks = [task for task, on in (("oar", p.segmentOars), ("gtv", p.segmentGtvs)) if on]
        self.logic.python = self._python()
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setValue(0)
        with slicer.util.tryWithErrorDisplay("SegRap segmentation could not start.", waitCursor=True):
            node = self.logic.segment(
                p.ctVolume, p.contrastCtVolume if p.segmentGtvs else None, p.outputSegmentation, tasks=tasks,
                structures=self.selectedStructures(), device=p.device, folds=p.folds or None,
                mirror=p.mirror, bundle=p.bundle or None, lowMemory=p.lowMemory, wait=False, progress=self._onEvent,
                finished=self._onFinished)
            p.outputSegmentation = node
            self._startElapsedTimer()
        self._updateApplyButton()

    def _onEvent(self, event: dict) -> None:
        """A worker event: progress bar, status line and log."""
        kind = event.get("event")
        if kind == "progress":
            self.ui.progressBar.setValue(int(100 * float(event.get("fraction", 0))))
            self.ui.statusLabel.text = str(event.get("message", ""))
            self.ui.logTextEdit.appendPlainText(f"[{event.get('stage')}] {event.get('message', '')}")
        elif kind == "warning":
            self.ui.logTextEdit.appendPlainText(f"WARNING: {event.get('message', '')}")
        elif kind in ("log", "start", "error"):
            self.ui.logTextEdit.appendPlainText(str(event.get("message", "") or f"worker started (pid {event.get('pid')})"))

    def _onFinished(self, run) -> None:
        self._stopElapsedTimer(run.elapsed_s)
        self._updateApplyButton()
        self.ui.applyButton.enabled = True
        self._onParameterNodeModified()
        if run.state == DONE:
            self.ui.progressBar.setValue(100)
            warned = f", {len(run.warnings)} warnings (see the log)" if run.warnings else ""
            self.ui.statusLabel.text = f"Done in {run.elapsed_s:.0f} s{warned}."
            self._parameterNode.outputSegmentation = run.segmentation_node
            self._parameterNode.exportSegmentation = run.segmentation_node
            if run.laterality_warnings:
                slicer.util.warningDisplay("Check left and right before using these contours:\n\n"
                                           + "\n".join(run.laterality_warnings), windowTitle="SegRap Segmenter")
        elif run.state == CANCELLED:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            if run.created_node:
                self._parameterNode.outputSegmentation = None
        else:
            self.ui.statusLabel.text = "Failed (see the message and the log)."
            self.ui.logTextEdit.appendPlainText(f"ERROR: {run.error}")
            slicer.util.errorDisplay(f"SegRap segmentation failed:\n{run.error}", windowTitle="SegRap Segmenter")

    def _startElapsedTimer(self) -> None:
        self._elapsedTimer = qt.QTimer()
        self._elapsedTimer.setInterval(1000)
        self._elapsedTimer.connect("timeout()", lambda: setattr(
            self.ui.elapsedTimeLabel, "text", f"{self.logic.run.elapsed_s:.0f} s" if self.logic.run else ""))
        self._elapsedTimer.start()

    def _stopElapsedTimer(self, elapsed: float) -> None:
        if self._elapsedTimer is not None:
            self._elapsedTimer.stop()
            self._elapsedTimer = None
        self.ui.elapsedTimeLabel.text = f"{elapsed:.0f} s"

    # -- models ---------------------------------------------------------------------------------

    def _fillBundles(self) -> None:
        combo = self.ui.modelBundleComboBox
        current = combo.currentText
        combo.clear()
        for ref in self.logic.bundleChoices():
            combo.addItem(ref)
        if current and combo.findText(current) >= 0:
            combo.setCurrentText(current)

    def _showBundle(self, ref: str) -> None:
        bundle = self.logic.bundleChoices().get(ref)
        self.ui.modelInfoLabel.text = (self.logic.describeBundle(bundle) if bundle else
                                       "No model bundle installed: install one from a file or a URL.")

    def _installModel(self, source: str) -> None:
        with slicer.util.tryWithErrorDisplay("Installing the model bundle failed.", waitCursor=True):
            bundle = self.logic.installModel(source)
            self._fillBundles()
            self.ui.modelBundleComboBox.setCurrentText(bundle.name)
            slicer.util.infoDisplay(f"Installed and verified {bundle.name} {bundle.version}.",
                                    windowTitle="SegRap Segmenter")

    def onInstallModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Install a SegRap model bundle", "",
                                              "Model bundle (*.zip segrap-model.json)")
        if path:
            self._installModel(os.path.dirname(path) if path.endswith("segrap-model.json") else path)

    def onInstallModelFromUrl(self) -> None:
        url = qt.QInputDialog.getText(None, "Install a SegRap model bundle",
                                      "URL of the bundle zip (downloaded now, checksums verified):")
        if url:
            self._installModel(url.strip())

    def onVerifyModel(self) -> None:
        ref = self.ui.modelBundleComboBox.currentText
        with slicer.util.tryWithErrorDisplay("The model bundle failed verification.", waitCursor=True):
            bundle = self.logic.verifyModel(ref or None)
            slicer.util.infoDisplay(f"{bundle.name} {bundle.version}: every file matches its checksum.",
                                    windowTitle="SegRap Segmenter")

    # -- export ---------------------------------------------------------------------------------

    def _exportInputs(self):
        p = self._parameterNode
        segmentation = p.exportSegmentation
        if segmentation is None:
            raise ValueError("Select the segmentation to export.")
        ct = segmentation.GetNodeReference(vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        return segmentation, ct or p.ctVolume

    def onExportToFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay("RTSTRUCT export failed.", waitCursor=True):
            folder = self.ui.exportFolderPathLineEdit.currentPath
            if not folder:
                raise ValueError("Choose the folder to write the RTSTRUCT in.")
            segmentation, ct = self._exportInputs()
            path = self.logic.exportRtStruct(segmentation, ct, folder)
            self.ui.statusLabel.text = f"RTSTRUCT written to {path}"

    def onExportToDatabase(self) -> None:
        with slicer.util.tryWithErrorDisplay("RTSTRUCT export to the DICOM database failed.", waitCursor=True):
            from DICOMLib import DICOMUtils

            segmentation, ct = self._exportInputs()
            with tempfile.TemporaryDirectory(prefix="segrap-rtstruct-") as folder:
                path = self.logic.exportRtStruct(segmentation, ct, folder)
                DICOMUtils.importDicom(folder, copyFiles=True)
            self.ui.statusLabel.text = f"RTSTRUCT {os.path.basename(str(path))} added to the DICOM database."


#
# Logic: the facade the GUI and the Python console use; the work is in SegRapSegmenterLib.slicer_bridge.logic
#


class SegRapSegmenterLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """``segment``, ``cancel``, ``exportRtStruct``, ``installModel``, ``verifyModel`` (see SegmentationLogic)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self)

    def getParameterNode(self) -> SegRapSegmenterParameterNode:
        return SegRapSegmenterParameterNode(super().getParameterNode())

    @staticmethod
    def structureGroups() -> dict[str, list[tuple[str, str]]]:
        """Catalogue structures by region group: {group: [(SegRap name, display name), ...]}."""
        from SegRapSegmenterLib.anatomy import structures

        groups: dict[str, list[tuple[str, str]]] = {}
        for s in structures.STRUCTURES:
            groups.setdefault(s.group, []).append((s.name, s.display_name))
        return groups

    @staticmethod
    def registerTerminology() -> str:
        """Load the SegRap terminology into Slicer; returns its context name."""
        return registerTerminology()


#
# Self-test (run in Slicer: Reload and Test, or ctest py_SegRapSegmenter)
#


class SegRapSegmenterTest(ScriptedLoadableModuleTest):
    """Terminology, panel, and the whole workflow: phantom CT -> demo bundle on CPU -> 47 segments -> RTSTRUCT."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_terminology_is_registered()
        self.setUp()
        self.test_panel_lists_every_structure()
        self.setUp()
        self.test_demo_bundle_end_to_end()

    def test_terminology_is_registered(self) -> None:
        self.delayDisplay("SegRap terminology in Slicer")
        from SegRapSegmenterLib.anatomy import structures, terminology

        name = SegRapSegmenterLogic.registerTerminology()
        self.assertEqual(name, terminology.CONTEXT_NAME)
        entry = slicer.vtkSlicerTerminologyEntry()
        terminologies = slicer.modules.terminologies.logic()
        self.assertTrue(terminologies.DeserializeTerminologyEntry(terminology.terminology_entry("Parotid_L"), entry))
        self.assertTrue(terminologies.UpdateEntryFromLoadedTerminologies(entry, [name], []))
        color = entry.GetTypeModifierObject().GetRecommendedDisplayRGBValue()
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

    def test_demo_bundle_end_to_end(self) -> None:
        """Phantom CT and contrast CT (as DICOM) -> demo bundle on CPU -> 47 segments -> RTSTRUCT read back."""
        self.delayDisplay("Demo bundle on a phantom case (CPU, a few minutes)")
        from SegRapSegmenterLib.anatomy import structures
        from SegRapSegmenterLib.formats import dicom, rtstruct
        from SegRapSegmenterLib.phantom import cases as phantom
        from SegRapSegmenterLib.phantom import dicom_series as phantom_dicom
        from SegRapSegmenterLib.slicer_bridge import scene

        with tempfile.TemporaryDirectory(prefix="segrap-selftest-") as tmp:
            case = phantom.make_case(0, seed=99, size="small")
            written = phantom_dicom.write_phantom_dicom(case, tmp)
            ctSeries = dicom.read_ct_series(written.ct_dir)
            ct = scene.add_volume_node(slicer.mrmlScene, ctSeries.image, "Phantom CT")
            ct.SetAttribute(scene.INSTANCE_UIDS_ATTRIBUTE, " ".join(s.sop_instance_uid for s in ctSeries.series.slices))
            contrast = scene.add_volume_node(slicer.mrmlScene, dicom.read_ct_series(written.contrast_dir).image,
                                             "Phantom contrast CT")
            logic = SegRapSegmenterLogic()
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

            self.delayDisplay("RTSTRUCT export and read-back")
            path = logic.exportRtStruct(segmentation, ct, os.path.join(tmp, "out"), dicomFolder=str(written.ct_dir))
            back = rtstruct.read_rtstruct(path, ctSeries)
            self.assertEqual(set(back), set(structures.STRUCTURE_NAMES))
            self.assertTrue((back["Lens_L"] == lens).all())
        self.delayDisplay("SegRap self-test passed")
