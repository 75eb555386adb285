"""The panel's state: the parameter node (saved with the scene) and the settings that outlive it.

Slicer 5.10 or later only: ``slicer.parameterNodeWrapper`` does not exist before 5.4 (no
``Base/Python/slicer/parameterNodeWrapper`` at v5.2.2), so this module is imported after the
version check (``widget``, the module file's logic), never when Slicer discovers the module.
Only (widget, type) pairs Slicer has connectors for are bound: nodes, bools, a Choice-annotated
str on a combo box, str on a line edit (SegRapSegmenter/Testing/Python/test_parameter_binding.py).
"""

from __future__ import annotations

from typing import Annotated

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

SETTINGS_PREFIX = "SegRapSegmenter/"
PERSISTENT = ("bundle", "device", "folds", "mirror", "lowMemory", "pythonExecutable")  # kept in the application settings
SEND_DESTINATION_SETTING = SETTINGS_PREFIX + "sendDestination"  # the RTSTRUCT export's "Send to" AE@HOST:PORT
SETTINGS_APPLIED = "SegRapSegmenter.SettingsApplied"  # attribute: this node started from the saved settings
# Parameter node fields that no Slicer GUI connector can bind (a combo of installed bundles that
# changes at run time; a path where "" means Slicer's own Python, which pathlib cannot express):
# field -> widget, kept in step by the panel. Their widgets carry no SlicerParameterName.
HAND_SYNCED = {"bundle": "modelBundleComboBox", "pythonExecutable": "pythonExecutablePathLineEdit"}
PARAMETER_NAME_PROPERTY = "SlicerParameterName"


@parameterNodeWrapper
class SegRapSegmenterParameterNode:
    """GUI state: bound to the .ui widget whose SlicerParameterName is the field name, or kept in step by hand (HAND_SYNCED)."""

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


def apply_settings(p: SegRapSegmenterParameterNode) -> None:
    """The saved panel settings into a parameter node that has not had them (new, or reset by Close Scene)."""
    import logging

    import qt
    import slicer

    settings = qt.QSettings()
    for key in PERSISTENT:
        value = settings.value(SETTINGS_PREFIX + key)
        if value is None:
            continue
        try:
            setattr(p, key, slicer.util.toBool(value) if isinstance(getattr(p, key), bool) else str(value))
        except (ValueError, TypeError) as exc:  # e.g. a device name this version does not offer
            logging.warning(f"SegRapSegmenter: saved setting {key}={value!r} ignored ({exc})")
    p.parameterNode.SetAttribute(SETTINGS_APPLIED, "1")


def save_settings(p: SegRapSegmenterParameterNode) -> None:
    """The persistent fields into the application settings (the next scene and the next start begin from them)."""
    import qt

    settings = qt.QSettings()
    for key in PERSISTENT:
        settings.setValue(SETTINGS_PREFIX + key, getattr(p, key))
