"""The module panel: loads the .ui, binds it to the parameter node, and starts the logic's work; no processing here.

Slicer 5.10 or later only (imported by the module file's widget after the version check). Nothing
slow runs on the GUI thread: the Python probe, package installs (pip and light-the-torch, as
subprocesses), model installs and verification, the RTSTRUCT export and DICOM sends run as
``tasks.PanelTasks`` background tasks polled by a qt timer, with progress and Cancel; the
segmentation runs in the worker process. What the widgets do can only be checked in Slicer (the
module's self-test, ``selftest``); everything below them is tested headless.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import qt
import slicer
import vtk
from slicer import vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin

from ..errors import Cancelled
from . import dependencies, parameters
from .logic import CANCELLED, DONE, default_python, qt_scheduler, register_terminology, structure_groups
from .tasks import PanelTasks, TaskView, install_call, probe_call

TITLE = "SegRap Segmenter"
LOW_MEMORY_NOTE = ("For GPUs with little memory: class scores and the image stay in CPU memory and only tiles go "
                   "to the GPU (slower). Running out of GPU memory switches to this by itself, with a warning.")
# ctkPathLineEdit signals currentPathChanged only for text its validator accepts, and with no name
# filters the validator is ".+", which rejects "" (docs/slicer-compatibility.md, "Clearing a path field"):
# clearing the field is heard through validInputChanged(bool) alone.
PATH_EDIT_SIGNALS = ("currentPathChanged(QString)", "validInputChanged(bool)")


def register_terminology_quietly() -> None:
    """Register the terminology, never blocking Slicer's start-up (the self-test reports a failure)."""
    try:
        register_terminology()
    except Exception as exc:  # noqa: BLE001
        logging.warning(f"SegRapSegmenter: {exc}")


class SegRapPanel(VTKObservationMixin):
    """The panel inside the module widget ``host`` (a ScriptedLoadableModuleWidget), driving ``logic``."""

    def __init__(self, host, logic) -> None:
        VTKObservationMixin.__init__(self)
        self.host = host
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncingWidgets = False  # True while the hand-synced widgets are set from the parameter node
        self._probe = None  # dependencies.PythonProbe of the selected Python, once known
        self._elapsedTimer = None
        self.uiWidget = slicer.util.loadUI(host.resourcePath("UI/SegRapSegmenter.ui"))
        host.layout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)
        self.tasks = PanelTasks(TaskView(self._setStatus, self._setProgress, self._setBusy, self._showError),
                                lambda poll: qt_scheduler(poll, interval_ms=100),
                                other_work=lambda: "segmentation" if self.logic.running else None)
        try:
            self._fillStructureTree()
            self._fillBundles()
        except ImportError as exc:  # a broken install: Apply offers to install what is missing
            logging.warning(f"SegRapSegmenter: {exc}; press Apply to install the missing packages.")
        register_terminology_quietly()  # also when the module is loaded after start-up or reloaded
        self._connect()
        self.initializeParameterNode()
        self._showBundle(self.ui.modelBundleComboBox.currentText)

    def _connect(self) -> None:
        ui = self.ui
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        ui.subsetStructuresRadioButton.connect("toggled(bool)", ui.structuresTreeWidget.setEnabled)
        ui.selectAllStructuresButton.connect("clicked(bool)", lambda: self.checkAllStructures(True))
        ui.clearStructuresButton.connect("clicked(bool)", lambda: self.checkAllStructures(False))
        ui.modelBundleComboBox.connect("currentTextChanged(QString)", self._onBundleChosen)
        ui.installModelFromFileButton.connect("clicked(bool)", self.onInstallModelFromFile)
        ui.installModelFromUrlButton.connect("clicked(bool)", self.onInstallModelFromUrl)
        ui.verifyModelButton.connect("clicked(bool)", self.onVerifyModel)
        ui.exportRtStructToFolderButton.connect("clicked(bool)", self.onExportToFolder)
        ui.exportRtStructToDatabaseButton.connect("clicked(bool)", self.onExportToDatabase)
        ui.sendRtStructButton.connect("clicked(bool)", self.onSendRtStruct)
        ui.reviewListWidget.connect("itemClicked(QListWidgetItem*)", self._onReviewItemClicked)
        for signal in PATH_EDIT_SIGNALS:
            ui.pythonExecutablePathLineEdit.connect(signal, self._onPythonPathEdited)
        ui.lowMemoryCheckBox.toolTip = LOW_MEMORY_NOTE
        ui.sendDestinationLineEdit.text = str(qt.QSettings().value(parameters.SEND_DESTINATION_SETTING) or "")
        ui.progressBar.setValue(0)
        ui.statusLabel.text = ""
        ui.deviceInfoLabel.text = "Checked when you first press Apply."

    def cleanup(self) -> None:
        """Module reload or Slicer exit: stop the worker and any background task, drop observers."""
        self.tasks.cancel()
        if self._elapsedTimer is not None:
            self._elapsedTimer.stop()
            self._elapsedTimer = None
        self.logic.stop()  # waits for the worker: nothing is left running on the GPU
        self.removeObservers()
        self._disconnectParameterNode()

    # -- parameter node -----------------------------------------------------------------------

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.running:
            self.logic.cancel()
        if self.tasks.current is not None and self.tasks.current.name in ("probe", "export", "send"):
            self.tasks.cancel()  # they belong to this scene
        self._disconnectParameterNode()
        self._parameterNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.host.parent.isEntered:
            self.initializeParameterNode()

    def _boundWidgets(self) -> dict:
        """Parameter name -> widget for every .ui widget with a SlicerParameterName (the hand-synced have none)."""
        bound = {}
        for widget in self.uiWidget.findChildren(qt.QWidget):
            name = widget.property(parameters.PARAMETER_NAME_PROPERTY)
            if name:
                bound[str(name)] = widget
        return bound

    def initializeParameterNode(self) -> None:
        """Bind the panel to the scene's parameter node (one not yet set up starts from the saved settings).

        The node is a singleton that survives Close Scene, reset to its defaults (vtkMRMLScene::Clear):
        so after a close the same node is bound again, and the reset has removed SETTINGS_APPLIED.
        """
        p = self.logic.getParameterNode()
        if self._parameterNode is not None and self._parameterNode.parameterNode is p.parameterNode:
            self._onParameterNodeModified()
            return
        self._disconnectParameterNode()
        self._parameterNode = p
        if not p.parameterNode.GetAttribute(parameters.SETTINGS_APPLIED):
            parameters.apply_settings(p)
        if not p.ctVolume:
            p.ctVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not p.bundle or self.ui.modelBundleComboBox.findText(p.bundle) < 0:
            p.bundle = self.ui.modelBundleComboBox.currentText
        # connectParametersToGui returns the tag in every Slicer (connectGui only from 5.10: wrapper.py v5.10.0:253)
        self._parameterNodeGuiTag = p.connectParametersToGui(self._boundWidgets())
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
        self._syncHandWidgets(p)
        parameters.save_settings(p)
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

    def _onPythonPathEdited(self, *args) -> None:
        """The path field changed (also when cleared: PATH_EDIT_SIGNALS); read its text, not the signal's argument."""
        path = self.ui.pythonExecutablePathLineEdit.currentPath.strip()
        if self._parameterNode is not None and not self._syncingWidgets and path != self._parameterNode.pythonExecutable:
            self._parameterNode.pythonExecutable = path
        if self._probe is not None and self._probe.executable != self._python():
            self._probe = None
            self.ui.deviceInfoLabel.text = "Checked when you next press Apply."

    # -- what the tasks show ---------------------------------------------------------------------

    def _setStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message

    def _setProgress(self, fraction) -> None:
        if fraction is None:
            self.ui.progressBar.setRange(0, 0)  # busy until the task reports a fraction
        else:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(int(100 * fraction))

    def _setBusy(self, busy: bool) -> None:
        for button in (self.ui.installModelFromFileButton, self.ui.installModelFromUrlButton,
                       self.ui.verifyModelButton, self.ui.exportRtStructToFolderButton,
                       self.ui.exportRtStructToDatabaseButton, self.ui.sendRtStructButton):
            button.enabled = not busy
        if busy:
            self._startElapsedTimer()
        else:
            self._stopElapsedTimer(0.0)
        self._updateApplyButton()

    @staticmethod
    def _showError(message: str) -> None:
        slicer.util.errorDisplay(message, windowTitle=TITLE)

    def _updateApplyButton(self) -> None:
        p = self._parameterNode
        if self.logic.running or self.tasks.busy:  # Apply is Cancel: nothing else starts while one thing runs
            self.ui.applyButton.text, self.ui.applyButton.enabled = "Cancel", True
            self.ui.applyButton.toolTip = ("Stop the running segmentation; the scene stays as it was." if self.logic.running
                                           else f"Stop: {self.ui.statusLabel.text}")
            return
        ready = bool(p and (p.segmentOars and p.ctVolume or p.segmentGtvs and p.contrastCtVolume))
        self.ui.applyButton.text, self.ui.applyButton.enabled = "Apply", ready
        self.ui.applyButton.toolTip = ("Segment the selected structures." if ready else
                                       "Select a CT for the organs at risk or a contrast CT for the GTVs.")

    def _startElapsedTimer(self) -> None:
        if self._elapsedTimer is None:
            self._elapsedTimer = qt.QTimer()
            self._elapsedTimer.setInterval(1000)
            self._elapsedTimer.connect("timeout()", lambda: setattr(self.ui.elapsedTimeLabel, "text", self._elapsed()))
        self._elapsedTimer.start()

    def _stopElapsedTimer(self, elapsed: float) -> None:
        if self._elapsedTimer is not None:
            self._elapsedTimer.stop()
        if elapsed:
            self.ui.elapsedTimeLabel.text = f"{elapsed:.0f} s"

    def _elapsed(self) -> str:
        source = self.logic.run if self.logic.running else self.tasks.current
        return f"{source.elapsed_s:.0f} s" if source is not None else ""

    # -- structures ---------------------------------------------------------------------------

    def _fillStructureTree(self) -> None:
        """One checkable item per structure, under one parent item per region."""
        tree = self.ui.structuresTreeWidget
        tree.clear()
        for group, members in structure_groups().items():
            parent = qt.QTreeWidgetItem(tree, [group])
            parent.setFlags(parent.flags() | qt.Qt.ItemIsAutoTristate | qt.Qt.ItemIsUserCheckable)
            for name, displayName in members:
                child = qt.QTreeWidgetItem(parent, [displayName])
                child.setData(0, qt.Qt.UserRole, name)
                child.setFlags(child.flags() | qt.Qt.ItemIsUserCheckable)
                child.setCheckState(0, qt.Qt.Checked)

    def checkAllStructures(self, checked: bool) -> None:
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
        return (self._parameterNode.pythonExecutable if self._parameterNode else "") or default_python()

    def _missingForRun(self) -> list[str] | None:
        """What Slicer's Python must install before the run (None: cannot run, the user was told why)."""
        python = self._probe.executable
        ownPython = not (self._parameterNode and self._parameterNode.pythonExecutable)
        if self._probe.error:
            self._showError(f"Cannot use the Python executable {python}:\n{self._probe.error}")
            return None
        if not ownPython and self._probe.missing:
            plan = dependencies.install_plan(self._probe.missing, into_slicer=False)
            self._showError(f"The Python environment {python} lacks: {', '.join(self._probe.missing)}.\n\nInstall "
                            f"them there, for example:\n{dependencies.manual_command(python, plan)}")
            return None
        # Slicer's own process needs only IN_PROCESS_IMPORTS when the worker runs in another Python
        return sorted(set(dependencies.missing_here()) | (set(self._probe.missing) if ownPython else set()))

    def _installThen(self, missing: list, then, where: str = "Slicer's Python", discard=None) -> None:
        """Offer a pinned install of ``missing`` into Slicer's Python, run it in the background, then ``then()``.

        ``discard()`` when ``then`` will not be called (refused, declined, failed, cancelled, restart needed).
        """
        if not missing:
            then()
            return
        plan = dependencies.install_plan(missing)
        if plan.refused:
            self._showError(f"Slicer's own Python lacks {', '.join(plan.refused)}: reinstall Slicer.")
            if discard is not None:
                discard()
            return
        if not slicer.util.confirmOkCancelDisplay(
                f"SegRap Segmenter needs Python packages that are not installed in {where} yet:\n\n"
                f"{plan.describe()}\n\nThey are downloaded from the Python Package Index"
                + (" (several GB for PyTorch with CUDA)" if plan.torch else "")
                + ". Slicer's own packages (SimpleITK, numpy, scipy, vtk, pydicom) and an installed PyTorch are kept "
                "as they are. The panel shows pip's progress; Cancel stops it. Install now?", windowTitle=TITLE):
            if discard is not None:
                discard()
            return

        def installed(still: list) -> None:
            self._probe = None
            if not still:
                then()  # new packages import at once: no restart
                return
            if discard is not None:
                discard()
            if slicer.util.confirmOkCancelDisplay(
                    f"The packages were installed, but {', '.join(still)} can be used only after a restart. "
                    "Restart Slicer now?", windowTitle=TITLE):
                slicer.util.restart()

        def install(report=None, should_stop=None) -> list:
            try:
                return call(report=report, should_stop=should_stop)
            except BaseException:
                if discard is not None:
                    discard()
                raise

        call = install_call(plan, default_python(), tempfile.gettempdir())
        if self.tasks.start("install", install, f"Installing {plan.describe()} ...", installed,
                            controllable=True) is None and discard is not None:
            discard()

    # -- running --------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.running:
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling ..."
            self.ui.applyButton.enabled = False
            return
        if self.tasks.busy:
            self.tasks.cancel()
            return
        python = self._python()
        if self._probe is not None and self._probe.executable == python:
            self._prepareRun()
            return
        self.tasks.start("probe", probe_call(python), f"Checking the Python environment {python} ...", self._onProbed)

    def _onProbed(self, probe) -> None:
        self._probe = probe
        self.ui.deviceInfoLabel.text = probe.device_text()
        if self._parameterNode is None or probe.executable != self._python():
            return  # the scene was closed, or another Python chosen, while the probe ran
        self._prepareRun()

    def _prepareRun(self) -> None:
        missing = self._missingForRun()
        if missing is None:
            return
        ownPython = not (self._parameterNode and self._parameterNode.pythonExecutable)
        where = "Slicer's Python" + ("" if ownPython else " (for starting and following the run; the worker uses "
                                                          f"{self._probe.executable})")
        self._installThen(missing, self._startSegmentation, where)

    def _startSegmentation(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        tasks = [task for task, on in (("oar", p.segmentOars), ("gtv", p.segmentGtvs)) if on]
        self.logic.python = self._python()
        self.ui.logTextEdit.clear()
        self._setProgress(0.0)
        try:  # not slicer.util.tryWithErrorDisplay: it raises again after its dialog (util.py v5.10.0:3409, v5.12.0:3589)
            node = self.logic.segment(
                p.ctVolume, p.contrastCtVolume if p.segmentGtvs else None, p.outputSegmentation, tasks=tasks,
                structures=self.selectedStructures(), device=p.device, folds=p.folds or None,
                mirror=p.mirror, bundle=p.bundle or None, lowMemory=p.lowMemory, wait=False, progress=self._onEvent,
                finished=self._onFinished)
        except Exception as exc:  # noqa: BLE001 - said once, in a dialog
            logging.exception("SegRapSegmenter")
            self._showError(f"SegRap segmentation could not start.\n\n{exc}")
        else:
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
            self.showReview(run.segmentation_node)
            if run.laterality_warnings:
                slicer.util.warningDisplay("Check left and right before using these contours:\n\n"
                                           + "\n".join(run.laterality_warnings), windowTitle=TITLE)
        elif run.state == CANCELLED:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            if run.created_node and p is not None:
                p.outputSegmentation = None
        else:
            self.ui.statusLabel.text = "Failed (see the message and the log)."
            self.ui.logTextEdit.appendPlainText(f"ERROR: {run.error}")
            self._showError(f"SegRap segmentation failed:\n{run.error}")
        self._onParameterNodeModified()

    def showReview(self, segmentationNode) -> list:
        """List the segments the run flagged for review (least confident first); returns them."""
        from . import scene as SC

        listing = self.ui.reviewListWidget
        listing.clear()
        self._reviewed = (segmentationNode, SC.flagged_segments(segmentationNode) if segmentationNode else [])
        for flagged in self._reviewed[1]:
            listing.addItem(f"{flagged.name} (confidence {flagged.confidence:.2f}): {flagged.reasons}")
        if segmentationNode is not None and not self._reviewed[1]:
            listing.addItem("No structure flagged for review (still review every contour before use).")
        self.ui.reviewCollapsibleButton.collapsed = False
        return self._reviewed[1]

    def _onReviewItemClicked(self, item) -> None:
        """Centre the slice views on the clicked flagged segment (vtkSlicerMarkupsLogic::JumpSlicesToLocation,
        vtkSlicerMarkupsLogic.h:121 at v5.10.0 and v5.12.0)."""
        from . import scene as SC

        node, flagged = getattr(self, "_reviewed", (None, []))
        row = self.ui.reviewListWidget.row(item)
        if node is None or not 0 <= row < len(flagged):
            return
        center = SC.segment_center_ras(node, flagged[row].segment_id)
        if center is None:
            self._setStatus(f"{flagged[row].name} is empty: nothing to show; contour it by hand if it is there.")
            return
        slicer.modules.markups.logic().JumpSlicesToLocation(*center, True)

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

        def done(bundle) -> None:
            self._fillBundles()
            self.ui.modelBundleComboBox.setCurrentText(bundle.name)
            slicer.util.infoDisplay(f"Installed and verified {bundle.name} {bundle.version}.", windowTitle=TITLE)

        self.tasks.start("install-model", lambda report, should_stop: logic.installModel(
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

        def done(bundle) -> None:
            slicer.util.infoDisplay(f"{bundle.name} {bundle.version}: every file matches its checksum.",
                                    windowTitle=TITLE)

        self.tasks.start("verify", lambda: self.logic.verifyModel(ref or None),
                         f"Checking every file of {ref or 'the model bundle'} against its checksum ...", done)

    # -- export ---------------------------------------------------------------------------------

    def _exportCall(self, folder: str):
        """Read the selected segmentation now (GUI thread); the returned call writes the RTSTRUCT in ``folder``."""
        p = self._parameterNode
        segmentation = p.exportSegmentation if p is not None else None
        if segmentation is None:
            raise ValueError("Select the segmentation to export.")
        ct = segmentation.GetNodeReference(vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        return self.logic.exportRtStructCall(segmentation, ct or p.ctVolume, folder)

    def _startExport(self, folder: str, what: str, done, discard=None) -> None:
        """Export in the background, then ``done(path)``; ``discard()`` when no RTSTRUCT comes of it (refused, failed, cancelled)."""
        call = None
        try:
            call = self._exportCall(folder)  # copies from the scene: on the GUI thread
        except Exception as exc:  # noqa: BLE001 - said once, in a dialog
            logging.exception("SegRapSegmenter")
            self._showError(f"RTSTRUCT export {what} failed.\n\n{exc}")

        def write(report=None, should_stop=None):
            try:
                path = call(report=report, should_stop=should_stop)
                if should_stop():  # cancelled while the file was written: its result is dropped
                    raise Cancelled("The RTSTRUCT export was cancelled.")
                return path
            except BaseException:
                if discard is not None:
                    discard()
                raise

        if call is None or self.tasks.start("export", write, f"Writing the RTSTRUCT {what} ...", done,
                                            controllable=True) is None:
            if discard is not None:
                discard()

    def onExportToFolder(self) -> None:
        folder = self.ui.exportFolderPathLineEdit.currentPath
        if not folder:
            self._showError("Choose the folder to write the RTSTRUCT in.")
            return
        self._startExport(folder, "to the folder", lambda path: self._setStatus(f"RTSTRUCT written to {path}"))

    def onExportToDatabase(self) -> None:
        folder = tempfile.mkdtemp(prefix="segrap-rtstruct-")

        def remove() -> None:
            shutil.rmtree(folder, ignore_errors=True)

        def imported(path) -> None:
            from DICOMLib import DICOMUtils

            try:
                # importDicom returns False instead of raising (Modules/Scripted/DICOMLib/DICOMUtils.py v5.10.0:494-500)
                if not DICOMUtils.importDicom(folder, copyFiles=True):
                    raise RuntimeError(f"Slicer's DICOM database did not take {os.path.basename(str(path))} "
                                       "(see the application log for why).")
            finally:
                remove()
            self._setStatus(f"RTSTRUCT {os.path.basename(str(path))} added to the DICOM database.")

        self._startExport(folder, "for the DICOM database", imported, discard=remove)

    def onSendRtStruct(self) -> None:
        """Install pynetdicom if needed, export the RTSTRUCT and send it to AE@HOST:PORT, each in the background."""
        destination = self.ui.sendDestinationLineEdit.text.strip()
        if not destination:
            self._showError("Enter the destination as AE@HOST:PORT, e.g. PACS@pacs.example.org:104.")
            return
        qt.QSettings().setValue(parameters.SEND_DESTINATION_SETTING, destination)
        folder = tempfile.mkdtemp(prefix="segrap-send-")

        def remove() -> None:
            shutil.rmtree(folder, ignore_errors=True)

        def send(path) -> None:
            def sent():
                try:
                    return self.logic.sendRtStruct(path, destination)
                finally:
                    remove()  # also when the task was cancelled and its result dropped

            if self.tasks.start("send", sent, f"Sending the RTSTRUCT to {destination} ...",
                                lambda _report: self._setStatus(f"RTSTRUCT {os.path.basename(str(path))} sent to "
                                                                f"{destination}.")) is None:
                remove()

        # the DICOM client runs in Slicer's process, which may not have pynetdicom yet (Slicer does not ship it)
        self._installThen(dependencies.missing_here(dependencies.SEND_IMPORTS),
                          lambda: self._startExport(folder, "for sending", send, discard=remove), discard=remove)
