"""Which 3D Slicer releases the module supports, and the plain message an older one gets.

Standard library only and Python 3.9 syntax: the module file imports this at Slicer start-up,
also in a Slicer too old to run the rest. Sources of every figure: docs/slicer-compatibility.md.
"""

from __future__ import annotations

from dataclasses import dataclass

MINIMUM_SLICER = (5, 10)


@dataclass(frozen=True)
class SlicerRelease:
    """What one Slicer release bundles that the module depends on (from Slicer's SuperBuild files)."""

    version: str
    python: str
    pydicom: str
    numpy: str
    simpleitk: str
    scipy: str


SUPPORTED_RELEASES = (
    SlicerRelease("5.10", python="3.12.10", pydicom="2.4.4", numpy="2.0.2", simpleitk="2.5.2", scipy="1.13.1"),
    SlicerRelease("5.12", python="3.12.10", pydicom="3.0.2", numpy="2.4.6", simpleitk="2.5.5", scipy="1.17.1"),
)


def version_problem(major: int, minor: int) -> str | None:
    """Why this Slicer version cannot run the module (None when it can)."""
    if (int(major), int(minor)) >= MINIMUM_SLICER:
        return None
    need = ".".join(str(n) for n in MINIMUM_SLICER)
    return (f"SegRap Segmenter needs 3D Slicer {need} or later; this is Slicer {major}.{minor}. "
            f"Install a current Slicer from https://download.slicer.org and add the extension there.")


def running_slicer_version() -> tuple[int, int] | None:
    """(major, minor) of the running Slicer application, None outside the application."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return None
    return int(app.majorVersion), int(app.minorVersion)


def running_slicer_problem() -> str | None:
    """``version_problem`` for the running Slicer (None outside the application)."""
    version = running_slicer_version()
    return None if version is None else version_problem(*version)
