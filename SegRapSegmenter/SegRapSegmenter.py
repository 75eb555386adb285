"""SegRapSegmenter: the 3D Slicer module of SegRapExtension (thin: metadata, panel wiring, logic facade, self-test).

Head-and-neck auto-contouring (45 organs at risk on CT, GTVp and GTVnd on contrast CT) with the DKFZ
nnU-Net method of the SegRap 2023 challenge. All the work is done by the headless core package
``SegRapSegmenterLib`` next to this file, through its ``slicer_bridge``: ``logic`` (runs the worker
process, polls it from a qt timer, cancel, RTSTRUCT export, model store), ``scene`` (volume and
segmentation nodes <-> files) and ``dependencies`` (what the worker's Python needs, pinned installs). This file only wires the
panel to them; it does no image processing (a packaging test checks that it imports no numpy,
SimpleITK or scipy).

Slicer 5.10 or later (``slicer_bridge.compat``; on an older Slicer the panel says so and does
nothing else). Slicer imports this file at every start: its top-level imports of the core load no
numpy, SimpleITK, scipy or torch (Testing/Python/test_startup_imports.py). Nothing slow runs on the
GUI thread: the Python probe, model installs and downloads, verification and DICOM sends run as
``slicer_bridge.background`` tasks polled by a qt timer, the segmentation in the worker process.

What only real Slicer can check (headless tests cover everything below the widgets, and the
contract test checks the .ui bindings against Slicer's connectors): the panel wiring, the qt
timers, the consent dialogs and ``slicer.util.pip_install``, the DICOM database import of an
exported RTSTRUCT. The self-test covers the panel binding inside Slicer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated

import qt
import slicer
import vtk
from SegRapSegmenterLib.slicer_bridge import compat
from SegRapSegmenterLib.slicer_bridge.logic import CANCELLED, DONE, SegmentationLogic
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
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
SEND_DESTINATION_SETTING = SETTINGS_PREFIX + "sendDestination"  # the RTSTRUCT export's "Send to" AE@HOST:PORT
# Parameter node fields that no Slicer GUI connector can bind (a combo of installed bundles that
# changes at run time; a path where "" means Slicer's own Python, which pathlib cannot express):
# field -> widget, kept in step by the widget class. Their widgets carry no SlicerParameterName.
HAND_SYNCED = {"bundle": "modelBundleComboBox", "pythonExecutable": "pythonExecutablePathLineEdit"}
PARAMETER_NAME_PROPERTY = "SlicerParameterName"
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
        problem = compat.running_slicer_problem()
        if problem:  # say it where users look, and do nothing else
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText
            logging.error(f"SegRapSegmenter: {problem}")
            return
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
    """GUI state: bound to the .ui widget whose SlicerParameterName is the field name, or kept in step by hand (HAND_SYNCED).

    Only (widget, type) pairs Slicer has connectors for are bound: nodes, bools, a Choice-annotated
    str on a combo box, str on a line edit (Testing/Python/test_parameter_binding.py).
    """

    ctVolume: vtkMRMLScalarVolumeNode
    contrastCtVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    exportSegmentation: vtkMRMLSegmentationNode
    segmentOars: bool = True
    segmentGtvs: bool = True
    bundle: str = ""  # hand-synced with modelBundleComboBox
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    folds: str = ""
    mirror: bool = False
    lowMemory: bool = False
    pythonExecutable: str = ""  # hand-synced with pythonExecutablePathLineEdit; "" means Slicer's own


#
# Widget
#

class SegRapSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Loads the panel and connects it to the parameter node and the logic; no processing here."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._versionProblem = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingWidgets = False  # True while the hand-synced widgets are set from the parameter node
        self._probe = None  # dependencies.PythonProbe of the selected Python, once known
        self._task = None  # the background.BackgroundTask running now (probe, model install, send), if any
        self._elapsedTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self._versionProblem = compat.running_slicer_problem()
        if self._versionProblem:  # an older Slicer: say so plainly, build nothing that would fail later
            label = qt.QLabel(self._versionProblem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        self.uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegRapSegmenter.ui"))
        self.layout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegRapSegmenterLogic()
        try:
            self._fillStructureTree()
            self._fillBundles()
        except ImportError as exc:  # a broken install: Apply offers to install what is missing
            logging.warning(f"SegRapSegmenter: {exc}; press Apply to install the missing packages.")
        _registerTerminologyQuietly()  # also when the module is loaded after start-up or reloaded

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.subsetStructuresRadioButton.connect("toggled(bool)", self.ui.structuresTreeWidget.setEnabled)
        self.ui.selectAllStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(True))
        self.ui.clearStructuresButton.connect("clicked(bool)", lambda: self._checkAllStructures(False))
        self.ui.modelBundleComboBox.connect("currentTextChanged(QString)", self._onBundleChosen)
        self.ui.installModelFromFileButton.connect("clicked(bool)", self.onInstallModelFromFile)
        self.ui.installModelFromUrlButton.connect("clicked(bool)", self.onInstallModelFromUrl)
        self.ui.verifyModelButton.connect("clicked(bool)", self.onVerifyModel)
        self.ui.exportRtStructToFolderButton.connect("clicked(bool)", self.onExportToFolder)
        self.ui.exportRtStructToDatabaseButton.connect("clicked(bool)", self.onExportToDatabase)
        self.ui.sendRtStructButton.connect("clicked(bool)", self.onSendRtStruct)
        self.ui.pythonExecutablePathLineEdit.connect("currentPathChanged(QString)", self._onPythonChosen)
        self.ui.lowMemoryCheckBox.toolTip = LOW_MEMORY_NOTE
        self.ui.sendDestinationLineEdit.text = str(qt.QSettings().value(SEND_DESTINATION_SETTING) or "")
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self.ui.deviceInfoLabel.text = "Checked when you first press Apply."

        self.initializeParameterNode()
        self._showBundle(self.ui.modelBundleComboBox.currentText)

    def cleanup(self) -> None:
        """Module reload or Slicer exit: stop the worker and any background task, drop observers."""
        if self._versionProblem or self.logic is None:
            return
        self._cancelTask()
        if self._elapsedTimer is not None:
            self._elapsedTimer.stop()
            self._elapsedTimer = None
        self.logic.stop()  # waits for the worker: nothing is left running on the GPU
        self.removeObservers()
        self._disconnectParameterNode()

    def enter(self) -> None:
        if not self._versionProblem:
            self.initializeParameterNode()

    def exit(self) -> None:
        # Stay connected: Slicer 5.10's disconnectGui leaves an observer behind (wrapper.py v5.10.0:256-260),
        # so connecting on every enter would pile them up; the binding ends when the scene closes.
        pass

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.running:
            self.logic.cancel()
        if self._task is not None and self._task.name in ("probe", "send"):  # they belong to this scene
            self._task.cancel()
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

    def _boundWidgets(self) -> dict:
        """Parameter name -> widget for every .ui widget with a SlicerParameterName (the hand-synced have none)."""
        bound = {}
        for widget in self.uiWidget.findChildren(qt.QWidget):
            name = widget.property(PARAMETER_NAME_PROPERTY)
            if name:
                bound[str(name)] = widget
        return bound

    def initializeParameterNode(self) -> None:
        """Bind the panel to the scene's parameter node (new ones start from the saved settings)."""
        p = self.logic.getParameterNode()
        if self._parameterNode is not None and self._parameterNode.parameterNode is p.parameterNode:
            self._onParameterNodeModified()
            return
        self._disconnectParameterNode()
        self._parameterNode = p
        if not p.parameterNode.GetAttribute("SegRapSegmenter.SettingsApplied"):
            self._applySettings(p)
            p.parameterNode.SetAttribute("SegRapSegmenter.SettingsApplied", "1")
        if not p.ctVolume:
            p.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.bundle or self.ui.modelBundleComboBox.findText(p.bundle) < 0:
            p.bundle = self.ui.modelBundleComboBox.currentText
        # connectParametersToGui returns the tag in every Slicer (connectGui only from 5.10: wrapper.py v5.10.0:253)
        self._parameterNodeGuiTag = p.connectParametersToGui(self._boundWidgets())
        self.addObserver(p, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    @staticmethod
    def _applySettings(p) -> None:
        """The saved panel settings into a new parameter node; a value that no longer fits is skipped."""
        settings = qt.QSettings()
        for key in PERSISTENT:
            value = settings.value(SETTINGS_PREFIX + key)
            if value is None:
                continue
            try:
                setattr(p, key, slicer.util.toBool(value) if isinstance(getattr(p, key), bool) else str(value))
            except (ValueError, TypeError) as exc:  # e.g. a device name this version does not offer
                logging.warning(f"SegRapSegmenter: saved setting {key}={value!r} ignored ({exc})")

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
        self._syncHandWidgets(p)
        settings = qt.QSettings()
        for key in PERSISTENT:
            settings.setValue(SETTINGS_PREFIX + key, getattr(p, key))
        self._updateApplyButton()

    def _syncHandWidgets(self, p) -> None:
        """Parameter node -> the widgets no connector binds (HAND_SYNCED), without echoing back."""
        self._syncingWidgets = True
        try:
            combo = self.ui.modelBundleComboBox
            if p.bundle and p.bundle != combo.currentText and combo.findText(p.bundle) >= 0:
                combo.setCurrentText(p.bundle)
                self._showBundle(p.bundle)
            path = self.ui.pythonExecutablePathLineEdit
            if os.path.normpath(path.currentPath or ".") != os.path.normpath(p.pythonExecutable or "."):
                path.currentPath = p.pythonExecutable
        finally:
            self._syncingWidgets = False

    def _onBundleChosen(self, ref: str) -> None:
        self._showBundle(ref)
        if self._parameterNode is not None and not self._syncingWidgets and ref:
            self._parameterNode.bundle = ref

    def _onPythonChosen(self, path: str) -> None:
        if self._parameterNode is not None and not self._syncingWidgets:
            self._parameterNode.pythonExecutable = path
        if self._probe is not None and self._probe.executable != self._python():
            self._forgetProbe()

    def _updateApplyButton(self) -> None:
        p = self._parameterNode
        if self.logic.running or self._task is not None:
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Cancel", True
            self.ui.applyButton.toolTip = ("Stop the running segmentation; the scene stays as it was." if self.logic.running
                                           else f"Stop: {self.ui.statusLabel.text}")
            return
        ready = bool(p and (p.segmentOars and p.ctVolume or p.segmentGtvs and p.contrastCtVolume))
        self.ui.applyButton.text, self.ui.applyButton.enabled = "Apply", ready
        self.ui.applyButton.toolTip = ("Segment the selected structures." if ready else
                                       "Select a CT for the organs at risk or a contrast CT for the GTVs.")

    # -- background tasks ----------------------------------------------------------------------

    def _startTask(self, name: str, call, message: str, done, controllable: bool = False) -> None:
        """Run ``call`` off the GUI thread with progress in the panel; ``done(task)`` on the GUI thread after."""
        from SegRapSegmenterLib.slicer_bridge.background import BackgroundTask
        from SegRapSegmenterLib.slicer_bridge.logic import qt_scheduler

        if self._task is not None or self.logic.running:  # one thing at a time owns the progress bar and Cancel
            slicer.util.errorDisplay("Wait for the running " + (f"task ({self._task.name})" if self._task else
                                                                 "segmentation") + " or cancel it first.",
                                     windowTitle="SegRap Segmenter")
            return

        def finished(task) -> None:
            self._task = None
            self._stopElapsedTimer(task.elapsed_s)
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(0)
            self._setModelButtonsEnabled(True)
            self._updateApplyButton()
            if task.cancelled:
                self.ui.statusLabel.text = f"Cancelled: {message}"
                return
            self.ui.statusLabel.text = ""
            try:
                done(task)
            except Exception as exc:  # noqa: BLE001 - shown, never lost in a timer callback
                logging.exception("SegRapSegmenter")
                slicer.util.errorDisplay(str(exc), windowTitle="SegRap Segmenter")

        task = BackgroundTask(name, call, done=finished, progress=self._onTaskProgress, passes_control=controllable)
        self._task = task
        self.ui.statusLabel.text = message
        self.ui.progressBar.setRange(0, 0)  # busy until the task reports a fraction
        self._setModelButtonsEnabled(False)
        task.start()
        task.scheduler_handle = qt_scheduler(task.poll, interval_ms=100)
        self._startElapsedTimer()
        self._updateApplyButton()

    def _onTaskProgress(self, message: str, fraction) -> None:
        self.ui.statusLabel.text = message
        if fraction is None:
            self.ui.progressBar.setRange(0, 0)
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(int(100 * fraction))

    def _cancelTask(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task.poll()  # finishes it at once (a call that cannot stop runs out on its thread, ignored)

    def _setModelButtonsEnabled(self, enabled: bool) -> None:
        for button in (self.ui.installModelFromFileButton, self.ui.installModelFromUrlButton,
                       self.ui.verifyModelButton, self.ui.exportRtStructToFolderButton,
                       self.ui.exportRtStructToDatabaseButton):
            button.enabled = enabled
        self.ui.sendRtStructButton.enabled = enabled

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
        """With the worker's Python probed: offer a pinned install into Slicer's Python of what is missing. True when ready."""
        from SegRapSegmenterLib.slicer_bridge import dependencies

        python = self._probe.executable
        ownPython = not (self._parameterNode and self._parameterNode.pythonExecutable)
        if self._probe.error:
            slicer.util.errorDisplay(f"Cannot use the Python executable {python}:\n{self._probe.error}",
                                     windowTitle="SegRap Segmenter")
            return False
        if not ownPython and self._probe.missing:
            plan = dependencies.install_plan(self._probe.missing, into_slicer=False)
            slicer.util.errorDisplay(
                f"The Python environment {python} lacks: {', '.join(self._probe.missing)}.\n\nInstall them there, "
                f"for example:\n{dependencies.manual_command(python, plan)}", windowTitle="SegRap Segmenter")
            return False
        # Slicer's own process needs only IN_PROCESS_IMPORTS when the worker runs in another Python
        missing = sorted(set(dependencies.missing_here()) | (set(self._probe.missing) if ownPython else set()))
        return self._installInSlicer(missing, ownPython, python)

    def _installInSlicer(self, missing: list, ownPython: bool = True, python: str = "") -> bool:
        """Offer a pinned install of ``missing`` into Slicer's Python (never replacing Slicer's own packages). True when ready."""
        from SegRapSegmenterLib.slicer_bridge import dependencies

        if not missing:
            return True
        plan = dependencies.install_plan(missing)
        if plan.refused:
            slicer.util.errorDisplay(f"Slicer's own Python lacks {', '.join(plan.refused)}: reinstall Slicer.",
                                     windowTitle="SegRap Segmenter")
            return False
        where = "Slicer's Python" + ("" if ownPython else " (for starting and following the run; the worker uses "
                                                           f"{python})")
        if not slicer.util.confirmOkCancelDisplay(
                f"SegRap Segmenter needs Python packages that are not installed in {where} yet:\n\n"
                f"{plan.describe()}\n\nThey are downloaded from the Python Package Index"
                + (" (several GB for PyTorch with CUDA)" if plan.torch else "")
                + ". Slicer's own packages (SimpleITK, numpy, vtk, pydicom) and an installed PyTorch are kept as they "
                "are. Install now?", windowTitle="SegRap Segmenter"):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the packages failed.", waitCursor=True):
            still = dependencies.install_in_slicer(plan, slicer.util.pip_install, tempfile.gettempdir())
            self._probe = None
            if not still:
                return True  # new packages import at once: no restart
            if slicer.util.confirmOkCancelDisplay(
                    f"The packages were installed, but {', '.join(still)} can be used only after a restart. "
                    "Restart Slicer now?", windowTitle="SegRap Segmenter"):
                slicer.util.restart()
        return False

    # -- running --------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling ..."
            self.ui.applyButton.enabled = False
            return
        if self._task is not None:
            self._cancelTask()
            return
        python = self._python()
        if self._probe is not None and self._probe.executable == python:
            self._startSegmentation()
            return
        from SegRapSegmenterLib.slicer_bridge import dependencies

        self._startTask("probe", lambda: dependencies.probe_python(python),
                        f"Checking the Python environment {python} ...", self._onProbed)

    def _onProbed(self, task) -> None:
        if task.error is not None:
            raise task.error
        self._probe = task.result
        self.ui.deviceInfoLabel.text = self._probe.device_text()
        if self._parameterNode is None or self._probe.executable != self._python():
            return  # the scene was closed, or another Python chosen, while the probe ran
        self._startSegmentation()

    def _startSegmentation(self) -> None:
        p = self._parameterNode
        if p is None or not self._ensureDependencies():
            return
        tasks = [task for task, on in (("oar", p.segmentOars), ("gtv", p.segmentGtvs)) if on]
        self.logic.python = self._python()
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setRange(0, 100)
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
        p = self._parameterNode  # None when the scene was closed while the run went on
        if run.state == DONE:
            self.ui.progressBar.setValue(100)
            warned = f", {len(run.warnings)} warnings (see the log)" if run.warnings else ""
            self.ui.statusLabel.text = f"Done in {run.elapsed_s:.0f} s{warned}."
            if p is not None:
                p.outputSegmentation = run.segmentation_node
                p.exportSegmentation = run.segmentation_node
            if run.laterality_warnings:
                slicer.util.warningDisplay("Check left and right before using these contours:\n\n"
                                           + "\n".join(run.laterality_warnings), windowTitle="SegRap Segmenter")
        elif run.state == CANCELLED:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            if run.created_node and p is not None:
                p.outputSegmentation = None
        else:
            self.ui.statusLabel.text = "Failed (see the message and the log)."
            self.ui.logTextEdit.appendPlainText(f"ERROR: {run.error}")
            slicer.util.errorDisplay(f"SegRap segmentation failed:\n{run.error}", windowTitle="SegRap Segmenter")
        self._onParameterNodeModified()

    def _elapsed(self) -> str:
        source = self.logic.run if self.logic.running else self._task
        return f"{source.elapsed_s:.0f} s" if source is not None else ""

    def _startElapsedTimer(self) -> None:
        if self._elapsedTimer is None:
            self._elapsedTimer = qt.QTimer()
            self._elapsedTimer.setInterval(1000)
            self._elapsedTimer.connect("timeout()", lambda: setattr(self.ui.elapsedTimeLabel, "text", self._elapsed()))
        self._elapsedTimer.start()

    def _stopElapsedTimer(self, elapsed: float) -> None:
        if self._elapsedTimer is not None:
            self._elapsedTimer.stop()
        self.ui.elapsedTimeLabel.text = f"{elapsed:.0f} s"

    # -- models ---------------------------------------------------------------------------------

    def _fillBundles(self) -> None:
        combo = self.ui.modelBundleComboBox
        current = combo.currentText
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for ref in self.logic.bundleChoices():
                combo.addItem(ref)
            if current and combo.findText(current) >= 0:
                combo.setCurrentText(current)
        finally:
            combo.blockSignals(wasBlocked)
        self._onBundleChosen(combo.currentText)

    def _showBundle(self, ref: str) -> None:
        bundle = self.logic.bundleChoices().get(ref) if ref else None
        self.ui.modelInfoLabel.text = (self.logic.describeBundle(bundle) if bundle else
                                       "No model bundle installed: install one from a file or a URL.")

    def _installModel(self, source: str) -> None:
        """Install a bundle in the background (a URL is downloaded with progress); Cancel stops it."""
        logic = self.logic

        def done(task) -> None:
            if task.error is not None:
                raise task.error
            bundle = task.result
            self._fillBundles()
            self.ui.modelBundleComboBox.setCurrentText(bundle.name)
            slicer.util.infoDisplay(f"Installed and verified {bundle.name} {bundle.version}.",
                                    windowTitle="SegRap Segmenter")

        self._startTask("install", lambda report, should_stop: logic.installModel(
            source, report=report, should_stop=should_stop), f"Installing the model bundle {source} ...", done,
            controllable=True)

    def onInstallModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Install a SegRap model bundle", "",
                                              "Model bundle (*.zip segrap-model.json)")
        if path:
            self._installModel(os.path.dirname(path) if path.endswith("segrap-model.json") else path)

    def onInstallModelFromUrl(self) -> None:
        url = qt.QInputDialog.getText(None, "Install a SegRap model bundle",
                                      "URL of the bundle zip (downloaded in the background, checksums verified):")
        if url:
            self._installModel(url.strip())

    def onVerifyModel(self) -> None:
        ref = self.ui.modelBundleComboBox.currentText

        def done(task) -> None:
            if task.error is not None:
                raise task.error
            bundle = task.result
            slicer.util.infoDisplay(f"{bundle.name} {bundle.version}: every file matches its checksum.",
                                    windowTitle="SegRap Segmenter")

        self._startTask("verify", lambda: self.logic.verifyModel(ref or None),
                        f"Checking every file of {ref or 'the model bundle'} against its checksum ...", done)

    # -- export ---------------------------------------------------------------------------------

    def _exportInputs(self):
        p = self._parameterNode
        segmentation = p.exportSegmentation if p is not None else None
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
                # importDicom returns False instead of raising (Modules/Scripted/DICOMLib/DICOMUtils.py v5.10.0:494-500)
                if not DICOMUtils.importDicom(folder, copyFiles=True):
                    raise RuntimeError(f"Slicer's DICOM database did not take {os.path.basename(str(path))} "
                                       "(see the application log for why).")
            self.ui.statusLabel.text = f"RTSTRUCT {os.path.basename(str(path))} added to the DICOM database."

    def onSendRtStruct(self) -> None:
        """Export the RTSTRUCT and send it to the DICOM destination AE@HOST:PORT, in the background."""
        destination = self.ui.sendDestinationLineEdit.text.strip()
        if not destination:
            slicer.util.errorDisplay("Enter the destination as AE@HOST:PORT, e.g. PACS@pacs.example.org:104.",
                                     windowTitle="SegRap Segmenter")
            return
        qt.QSettings().setValue(SEND_DESTINATION_SETTING, destination)
        from SegRapSegmenterLib.slicer_bridge import dependencies

        # the DICOM client runs in Slicer's process, which may not have pynetdicom yet (Slicer does not ship it)
        if not self._installInSlicer(dependencies.missing_here(dependencies.SEND_IMPORTS)):
            return
        folder = tempfile.mkdtemp(prefix="segrap-send-")
        path = None
        with slicer.util.tryWithErrorDisplay("RTSTRUCT export for sending failed.", waitCursor=True):
            segmentation, ct = self._exportInputs()
            path = self.logic.exportRtStruct(segmentation, ct, folder)
        if path is None:
            shutil.rmtree(folder, ignore_errors=True)
            return

        def done(task) -> None:
            shutil.rmtree(folder, ignore_errors=True)
            if task.error is not None:
                raise task.error
            self.ui.statusLabel.text = f"RTSTRUCT {os.path.basename(str(path))} sent to {destination}."

        def sent() -> object:
            try:
                return self.logic.sendRtStruct(path, destination)
            finally:
                shutil.rmtree(folder, ignore_errors=True)  # also when the task was cancelled and its result dropped

        self._startTask("send", sent, f"Sending the RTSTRUCT to {destination} ...", done)


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


# Packages the inference part needs in Slicer's Python; Slicer's extension build servers have none of
# them, so there the other parts run and this one is skipped with the reason.
INFERENCE_PACKAGES = ("torch", "nnunetv2", "scipy", "nrrd")


class SegRapSegmenterTest(ScriptedLoadableModuleTest):
    """Version check, terminology and panel (always); the whole workflow with the demo bundle when torch is there."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_slicer_version_is_supported()
        self.setUp()
        self.test_terminology_is_registered()
        self.setUp()
        self.test_panel_lists_every_structure()
        self.setUp()
        self.test_panel_binds_the_parameter_node()
        reason = self.inferenceUnavailable()
        if reason:
            logging.warning(f"SegRapSegmenter self-test: inference part skipped: {reason}")
            self.delayDisplay(f"Inference part skipped: {reason}")
            return
        self.setUp()
        self.test_demo_bundle_end_to_end()

    @staticmethod
    def inferenceUnavailable() -> str | None:
        """Why the inference part cannot run in this Slicer (None when it can)."""
        missing = [name for name in INFERENCE_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            return f"{', '.join(missing)} not importable in Slicer's Python (as on Slicer's extension build servers)"
        return None

    def test_slicer_version_is_supported(self) -> None:
        self.delayDisplay("Slicer version")
        self.assertIsNone(compat.running_slicer_problem())
        self.assertIn("5.10", compat.version_problem(5, 8))

    def test_terminology_is_registered(self) -> None:
        self.delayDisplay("SegRap terminology in Slicer")
        from SegRapSegmenterLib.anatomy import structures, terminology

        name = SegRapSegmenterLogic.registerTerminology()
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

    def test_panel_binds_the_parameter_node(self) -> None:
        """Widgets -> parameter node and back, for the connector-bound and the hand-synced fields."""
        self.delayDisplay("Panel <-> parameter node")
        settings = qt.QSettings()
        saved = {key: settings.value(SETTINGS_PREFIX + key) for key in PERSISTENT}
        widget = slicer.modules.segrapsegmenter.widgetRepresentation().self()
        try:
            widget.initializeParameterNode()
            p, ui = widget._parameterNode, widget.ui
            self.assertIsNotNone(widget._parameterNodeGuiTag)
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
            ui.pythonExecutablePathLineEdit.currentPath = ""
            self.assertEqual(p.pythonExecutable, "")
            if ui.modelBundleComboBox.count:
                ui.modelBundleComboBox.currentIndex = ui.modelBundleComboBox.count - 1
                self.assertEqual(p.bundle, ui.modelBundleComboBox.currentText)
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Bound CT")
            p.ctVolume = volume
            self.assertIs(ui.ctVolumeSelector.currentNode(), volume)
            before = p.parameterNode
            slicer.mrmlScene.Clear()  # as Close Scene: the panel lets go of the node (and binds the new one if shown)
            if widget.parent.isEntered:
                self.assertIsNot(widget._parameterNode.parameterNode, before)
            else:
                self.assertIsNone(widget._parameterNode)
        finally:
            for key, value in saved.items():
                if value is None:
                    settings.remove(SETTINGS_PREFIX + key)
                else:
                    settings.setValue(SETTINGS_PREFIX + key, value)

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
