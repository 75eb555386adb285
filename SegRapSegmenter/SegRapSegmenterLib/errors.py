"""The one exception hierarchy of SegRapSegmenterLib: every message names the file or item and the fix."""

from __future__ import annotations


class SegRapError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(SegRapError):
    """An input file or argument is missing, unreadable or not what the pipeline needs."""


class GeometryError(SegRapError):
    """Images or masks do not share the geometry they must share."""


class StructureNameError(SegRapError, KeyError):
    """A structure name matches no entry of the catalogue."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class DecompositionConflictError(SegRapError):
    """Voxels are covered by a combination of structures that none of the 54 classes represents."""

    def __init__(self, message: str, conflicts: list) -> None:
        super().__init__(message)
        self.conflicts = conflicts


class ModelError(SegRapError):
    """A model bundle is missing, corrupt or does not match what the pipeline expects."""


class DicomError(SegRapError):
    """A DICOM input cannot be read or does not form a usable series."""


class OutputError(SegRapError):
    """An output folder or file cannot be written."""


class WorkerError(SegRapError):
    """The worker process died or broke its protocol."""


class Cancelled(SegRapError):
    """The run was stopped on request (SIGTERM, SIGINT or the user's Cancel)."""
