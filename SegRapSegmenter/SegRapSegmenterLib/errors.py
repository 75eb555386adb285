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


class CaseBusyError(SegRapError):
    """Another run is writing the same case into the same output folder (its lock is held)."""


class WorkerError(SegRapError):
    """The worker process died or broke its protocol."""


class DicomNetworkError(SegRapError):
    """A DICOM peer cannot be reached, rejects the association or refuses a store."""


class InstallError(SegRapError):
    """Installing Python packages (pip, light-the-torch) into Slicer's Python failed."""


class DicomRefusedError(DicomNetworkError):
    """A DICOM peer refused for good (SOP class not accepted, AE title not recognised): retrying cannot help."""


class Cancelled(SegRapError):
    """The run was stopped on request (SIGTERM, SIGINT or the user's Cancel)."""


# Exit codes of the ``segrap`` command and of the worker process, one table for both: the worker reports
# an error by its class name and the caller maps that name back through ``exit_code_of_kind``.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_INPUT, EXIT_MODEL, EXIT_OUTPUT, EXIT_WORKER, EXIT_NETWORK, EXIT_BUSY = 3, 4, 5, 6, 7, 8

_EXIT_BY_CLASS: tuple[tuple[type[SegRapError], int], ...] = (
    (InputError, EXIT_INPUT), (GeometryError, EXIT_INPUT), (DicomError, EXIT_INPUT),
    (StructureNameError, EXIT_INPUT), (DecompositionConflictError, EXIT_INPUT),
    (ModelError, EXIT_MODEL), (OutputError, EXIT_OUTPUT), (WorkerError, EXIT_WORKER), (Cancelled, EXIT_INTERRUPTED),
    (DicomNetworkError, EXIT_NETWORK), (DicomRefusedError, EXIT_NETWORK), (CaseBusyError, EXIT_BUSY),
)


def exit_code(exc: BaseException) -> int:
    """The exit code of an error: 3 bad input, 4 bad model, 5 output not writable, 6 worker died, 7 DICOM network,
    8 the case is being written by another run, 1 other."""
    for cls, code in _EXIT_BY_CLASS:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


def exit_code_of_kind(kind: str | None) -> int:
    """The exit code of an error reported by class name (the worker's ``kind`` field); 1 for unknown kinds."""
    for cls, code in _EXIT_BY_CLASS:
        if cls.__name__ == kind:
            return code
    return EXIT_ERROR
