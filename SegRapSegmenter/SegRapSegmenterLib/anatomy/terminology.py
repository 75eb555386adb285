"""3D Slicer terminology for the 47 structures: the ``.term.json`` context and segment tags.

Both are generated from the catalogue in ``structures`` so they cannot drift from it:

- ``build_terminology()`` is the terminology context Slicer's Terminologies module loads
  (``SegmentationCategoryTypeContextName`` / ``@schema`` / ``SegmentationCodes.Category[].Type[]``,
  paired organs as one type with a Left and a Right ``Modifier``, each side with its own
  ``recommendedDisplayRGBValue``). The committed copy lives at
  ``SegRapSegmenter/Resources/SegRapSegmenter.term.json`` (``segrap terminology --write``).
- ``terminology_entry(structure)`` is the segment's ``TerminologyEntry`` tag in Slicer's serialized
  form: seven ``~``-separated fields, context name, category, type, type modifier, region context
  name, region, region modifier, each code written as ``scheme^value^meaning`` (``^^`` when empty).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError
from . import structures as S
from .structures import Code, Structure

CONTEXT_NAME = "Segmentation category and type - SegRap head and neck"
REGION_CONTEXT_NAME = "Anatomic codes - DICOM master list"  # Slicer's default anatomic context
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"
FILE_NAME = "SegRapSegmenter.term.json"

# Characters that delimit Slicer's serialized entry ("~", "^") and the .seg.nrrd tag list ("|", ":").
_RESERVED = ("~", "^", "|")

# Anatomical structures are themselves anatomy (no region selector in Slicer); tumours get a region.
_SHOW_ANATOMY = {S.ANATOMICAL_STRUCTURE: False, S.MORPHOLOGICALLY_ALTERED: True}


def default_path() -> Path | None:
    """Where the module's copy of the file lives in a source checkout, or None when not in one."""
    resources = Path(__file__).resolve().parents[2] / "Resources"
    return resources / FILE_NAME if resources.is_dir() else None


def _code_fields(code: Code) -> dict:
    return {"CodingSchemeDesignator": code.scheme, "CodeValue": code.value, "CodeMeaning": code.meaning}


def _base_label(structure: Structure) -> str:
    """Display name without the side word: the label of the shared type of a pair."""
    word = {"L": "Left ", "R": "Right "}.get(structure.laterality or "", "")
    name = structure.display_name
    return name[len(word):] if word and name.startswith(word) else name


def _type_entry(members: list[Structure]) -> dict:
    """One ``Type`` item: a single structure, or a left/right pair sharing the type code."""
    first = members[0]
    entry = _code_fields(first.type)
    if first.modifier is None:
        entry["recommendedDisplayRGBValue"] = list(first.color)
        entry["3dSlicerLabel"] = first.display_name
        return entry
    entry["3dSlicerLabel"] = _base_label(first)
    entry["Modifier"] = [
        {**_code_fields(s.modifier), "recommendedDisplayRGBValue": list(s.color), "3dSlicerLabel": s.display_name}
        for s in members
    ]
    return entry


def _grouped(structures: Iterable[Structure]) -> dict[Code, dict[tuple[Code, str], list[Structure]]]:
    """Structures by category, then by type code and region, in catalogue order."""
    out: dict[Code, dict[tuple[Code, str], list[Structure]]] = {}
    for s in structures:
        region = s.region.value if s.region else ""
        out.setdefault(s.category, {}).setdefault((s.type, region), []).append(s)
    return out


def build_terminology(structures: Iterable[Structure] = S.STRUCTURES) -> dict:
    """The Slicer terminology context for the catalogue (a JSON-ready dict)."""
    categories = []
    for category, types in _grouped(structures).items():
        for (code, _), members in types.items():
            sides = [m.laterality for m in members]
            if len(members) > 1 and sides not in (["L", "R"], ["R", "L"]):
                raise AssertionError(f"type {code.meaning} is shared by {[m.name for m in members]}, not a pair")
        categories.append({
            **_code_fields(category),
            "showAnatomy": _SHOW_ANATOMY.get(category, True),
            "Type": [_type_entry(members) for members in types.values()],
        })
    return {
        "SegmentationCategoryTypeContextName": CONTEXT_NAME,
        "@schema": SCHEMA,
        "SegmentationCodes": {"Category": categories},
    }


def terminology_json() -> str:
    """The terminology file's exact text (2-space indent, trailing newline), stable across runs."""
    return json.dumps(build_terminology(), indent=2, ensure_ascii=False) + "\n"


def write_terminology(path: str | Path | None = None) -> Path:
    """Write the terminology file (atomically); by default to the module's Resources folder."""
    target = Path(path) if path is not None else default_path()
    if target is None:
        raise InputError("No path given and no SegRapSegmenter/Resources folder next to the package: "
                         "pass the output path, e.g. `segrap terminology --write my.term.json`.")
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        target = target / FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        tmp.write_text(terminology_json(), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _serialize(code: Code | None) -> str:
    if code is None:
        return "^^"
    for part in (code.scheme, code.value, code.meaning):
        bad = [c for c in _RESERVED if c in part]
        if bad:
            raise AssertionError(f"code part {part!r} contains {bad}, which Slicer's entry format reserves")
    return f"{code.scheme}^{code.value}^{code.meaning}"


def terminology_entry(structure: Structure | str) -> str:
    """Slicer's serialized ``TerminologyEntry`` for a structure (a catalogue record or any spelling)."""
    s = structure if isinstance(structure, Structure) else S.get(structure)
    return "~".join((
        CONTEXT_NAME,
        _serialize(s.category),
        _serialize(s.type),
        _serialize(s.modifier),
        REGION_CONTEXT_NAME,
        _serialize(s.region),
        _serialize(None),  # region modifier: none in the catalogue
    ))
