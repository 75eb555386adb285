"""pydicom 2.4 and 3.x behind one small interface: the only calls whose API differs between them.

Slicer 5.10 bundles pydicom 2.4.4 and Slicer 5.12 bundles 3.0.2, and Slicer's own DICOM plugins
import it, so the core never upgrades it: every version-dependent call goes through this module,
which detects the features it needs (not version numbers) once.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian

try:  # pydicom >= 3: one decoder registry per transfer syntax
    from pydicom.pixels import get_decoder as _get_decoder
except ImportError:  # pydicom 2.x: a list of pixel-data handler modules
    _get_decoder = None

_ENFORCE_FILE_FORMAT = "enforce_file_format" in inspect.signature(Dataset.save_as).parameters  # pydicom >= 3


def save_file(ds: Dataset, path: str | Path) -> None:
    """Write ``ds`` as a DICOM file (preamble, file meta) in the transfer syntax its file meta names."""
    if _ENFORCE_FILE_FORMAT:
        ds.save_as(path, enforce_file_format=True)
        return
    syntax = ds.file_meta.TransferSyntaxUID  # pydicom 2 encodes by these two flags, not by the file meta
    ds.is_implicit_VR = syntax == ImplicitVRLittleEndian
    ds.is_little_endian = syntax != ExplicitVRBigEndian
    ds.save_as(path, write_like_original=False)


def original_encoding(ds: Dataset) -> tuple[bool | None, bool | None]:
    """(implicit VR, little endian) of a dataset as it was read; None where unknown."""
    if hasattr(type(ds), "original_encoding"):
        return ds.original_encoding
    return ds.read_implicit_vr, ds.read_little_endian


def decoder_problem(uid: str) -> str | None:
    """Why pixel data in the compressed transfer syntax ``uid`` cannot be decoded here, or None when it can.

    The reason is "unsupported" when no pydicom plugin handles the syntax at all, else the missing
    packages of the plugins that would.
    """
    uid = UID(uid)
    if _get_decoder is not None:
        try:
            decoder = _get_decoder(uid)
        except NotImplementedError:
            return "unsupported"
        if decoder.is_available:
            return None
        return "; ".join(str(d) for d in decoder.missing_dependencies) or "no plugin available"
    handlers = [h for h in pydicom.config.pixel_data_handlers if h.supports_transfer_syntax(uid)]
    if not handlers:
        return "unsupported"
    if any(_handler_decodes(h, uid) for h in handlers):
        return None
    return "; ".join(f"the {h.HANDLER_NAME} handler, which is not installed or lacks a plugin" for h in handlers)


def _handler_decodes(handler, uid: UID) -> bool:
    """pydicom 2: whether a pixel-data handler is installed and, for pylibjpeg, has the plugin for ``uid``."""
    if not handler.is_available():
        return False
    if getattr(handler, "HANDLER_NAME", "") != "pylibjpeg":
        return True
    try:
        from pylibjpeg.utils import get_pixel_data_decoders
    except ImportError:
        return False
    return uid in get_pixel_data_decoders()


def save_bare_dataset(ds: Dataset, path: str | Path, *, implicit_vr: bool = True) -> None:
    """Write ``ds`` without preamble or file meta, as some old archives hold it (little endian)."""
    if _ENFORCE_FILE_FORMAT:
        ds.save_as(path, implicit_vr=implicit_vr, little_endian=True)
        return
    ds.is_implicit_VR, ds.is_little_endian = implicit_vr, True
    ds.save_as(path, write_like_original=True)
