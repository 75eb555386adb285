"""SegRapSegmenter: the 3D Slicer module of SegRapExtension (metadata, a widget shell, the logic facade, the self-test entry).

Head-and-neck auto-contouring (45 organs at risk on CT, GTVp and GTVnd on contrast CT) with the DKFZ
nnU-Net method of the SegRap 2023 challenge. The work is done by the headless core package
``SegRapSegmenterLib`` next to this file, through its ``slicer_bridge``: ``widget`` (the panel),
``parameters`` (the parameter node), ``tasks`` (the panel's background tasks), ``logic`` (worker
runs, RTSTRUCT export, model store), ``scene``, ``dependencies`` and ``selftest``.

Slicer imports this file at every start, also a Slicer too old to run the module: so its top-level
imports are what Slicer 5.0 and later have (no ``slicer.parameterNodeWrapper`` before 5.4) and load
no numpy, SimpleITK, scipy or torch (Testing/Python/test_startup_imports.py). On a Slicer older than
5.10 the panel and the help text say so and nothing else is loaded (``slicer_bridge.compat``).
"""

from __future__ import annotations

import logging
import sys

import qt
import slicer
from SegRapSegmenterLib.slicer_bridge import compat
from SegRapSegmenterLib.slicer_bridge.logic import SegmentationLogic, register_terminology
from SegRapSegmenterLib.slicer_bridge.selftest import SelfTests
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

LIBRARY = "SegRapSegmenterLib"


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
        register_terminology()
    except Exception as exc:  # never block Slicer's start-up; the self-test reports it
        logging.warning(f"SegRapSegmenter: {exc}")


class SegRapSegmenterWidget(ScriptedLoadableModuleWidget):
    """The shell Slicer instantiates: the version check, then the panel (slicer_bridge.widget.SegRapPanel)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = compat.running_slicer_problem()
        if problem:  # an older Slicer: say so plainly, import nothing that would fail there
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        from SegRapSegmenterLib.slicer_bridge.widget import SegRapPanel

        self.panel = SegRapPanel(self, SegRapSegmenterLogic())

    def cleanup(self) -> None:
        """Module reload or Slicer exit: the panel stops the worker and its background task."""
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self) -> None:
        if self.panel is not None:
            self.panel.initializeParameterNode()

    def exit(self) -> None:
        # Stay connected: Slicer 5.10's disconnectGui leaves an observer behind (wrapper.py v5.10.0:256-260),
        # so connecting on every enter would pile them up; the binding ends when the scene closes.
        pass

    def onReload(self) -> None:
        """Reload the core package too, so edits to SegRapSegmenterLib take effect without a restart."""
        for name in [m for m in sys.modules if m == LIBRARY or m.startswith(LIBRARY + ".")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


class SegRapSegmenterLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """``segment``, ``cancel``, ``exportRtStruct``, ``installModel``, ``verifyModel`` (see slicer_bridge.logic)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self)

    def getParameterNode(self):
        """The scene's parameter node, wrapped (slicer_bridge.parameters; Slicer 5.10 or later)."""
        from SegRapSegmenterLib.slicer_bridge.parameters import SegRapSegmenterParameterNode

        return SegRapSegmenterParameterNode(super().getParameterNode())

    @staticmethod
    def registerTerminology() -> str:
        """Load the SegRap terminology into Slicer; returns its context name."""
        return register_terminology()


class SegRapSegmenterTest(SelfTests, ScriptedLoadableModuleTest):
    """The self-test (slicer_bridge.selftest): Slicer's test runner calls each test_* method, Reload and Test runTest."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.run_all()
