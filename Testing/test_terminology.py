"""The Slicer terminology file and segment tags agree with the structure catalogue and Slicer's format."""

from __future__ import annotations

import json

import pytest
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.anatomy import terminology as T
from slicerio import segmentation as slicerio_segmentation

COMMITTED = T.default_path()

# Schema URLs Slicer's terminology loader accepts for a category/type context (vtkSlicerTerminologiesModuleLogic).
ACCEPTED_SCHEMAS = {
    "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
    "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#",
}
CODE_KEYS = ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")
OPTIONAL_CONCEPT_KEYS = {"recommendedDisplayRGBValue", "3dSlicerLabel", "cid", "contextGroupName",
                         "UMLSConceptUID", "SNOMEDCTConceptID"}
CATEGORY_KEYS = set(CODE_KEYS) | OPTIONAL_CONCEPT_KEYS | {"showAnatomy", "Type"}
TYPE_KEYS = set(CODE_KEYS) | OPTIONAL_CONCEPT_KEYS | {"Modifier"}
MODIFIER_KEYS = set(CODE_KEYS) | OPTIONAL_CONCEPT_KEYS


@pytest.fixture(scope="module")
def committed() -> dict:
    assert COMMITTED is not None and COMMITTED.is_file(), "run `segrap terminology --write`"
    return json.loads(COMMITTED.read_text(encoding="utf-8"))


def _leaves(doc: dict) -> dict[tuple[str, str, str | None], dict]:
    """Every selectable entry of the file: (category, type, modifier) code values -> the item carrying its color."""
    out = {}
    for category in doc["SegmentationCodes"]["Category"]:
        for typ in category["Type"]:
            for modifier in typ.get("Modifier", [None]):
                key = (category["CodeValue"], typ["CodeValue"], modifier["CodeValue"] if modifier else None)
                assert key not in out, f"duplicate terminology entry {key}"
                out[key] = {"category": category, "type": typ, "modifier": modifier}
    return out


def _check_code(item: dict, where: str) -> None:
    for key in CODE_KEYS:
        assert isinstance(item.get(key), str) and item[key], f"{where}: {key} missing or empty"
    assert len(item["CodingSchemeDesignator"]) <= 16 and len(item["CodeValue"]) <= 16, where  # DICOM SH
    assert len(item["CodeMeaning"]) <= 64, where  # DICOM LO
    if "recommendedDisplayRGBValue" in item:
        rgb = item["recommendedDisplayRGBValue"]
        assert isinstance(rgb, list) and len(rgb) == 3, where
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in rgb), where
    if "3dSlicerLabel" in item:
        assert isinstance(item["3dSlicerLabel"], str) and item["3dSlicerLabel"], where


def test_committed_file_is_generated_from_the_catalogue():
    assert COMMITTED.read_text(encoding="utf-8") == T.terminology_json(), "run `segrap terminology --write`"


def test_file_has_the_structure_slicer_loads(committed):
    assert set(committed) == {"SegmentationCategoryTypeContextName", "@schema", "SegmentationCodes"}
    assert committed["@schema"] in ACCEPTED_SCHEMAS
    assert committed["SegmentationCategoryTypeContextName"] == T.CONTEXT_NAME
    categories = committed["SegmentationCodes"]["Category"]
    assert isinstance(categories, list) and categories
    for category in categories:
        where = f"category {category.get('CodeMeaning')}"
        assert set(category) <= CATEGORY_KEYS, f"{where}: unexpected keys {set(category) - CATEGORY_KEYS}"
        _check_code(category, where)
        assert isinstance(category["showAnatomy"], bool)
        assert isinstance(category["Type"], list) and category["Type"], where
        for typ in category["Type"]:
            where_t = f"{where} / type {typ.get('CodeMeaning')}"
            assert set(typ) <= TYPE_KEYS, f"{where_t}: unexpected keys {set(typ) - TYPE_KEYS}"
            _check_code(typ, where_t)
            if "Modifier" not in typ:
                assert "recommendedDisplayRGBValue" in typ, where_t
                continue
            assert isinstance(typ["Modifier"], list) and typ["Modifier"], where_t
            for modifier in typ["Modifier"]:
                assert set(modifier) <= MODIFIER_KEYS, f"{where_t}: unexpected modifier keys"
                _check_code(modifier, f"{where_t} / modifier {modifier.get('CodeMeaning')}")
                assert "recommendedDisplayRGBValue" in modifier, where_t


def test_every_structure_has_exactly_one_entry_with_its_codes_name_and_color(committed):
    leaves = _leaves(committed)
    assert len(leaves) == len(S.STRUCTURES) == 47
    for s in S.STRUCTURES:
        key = (s.category.value, s.type.value, s.modifier.value if s.modifier else None)
        assert key in leaves, f"{s.name} has no entry {key}"
        found = leaves.pop(key)
        for item, code in ((found["category"], s.category), (found["type"], s.type), (found["modifier"], s.modifier)):
            if code is None:
                assert item is None, s.name
                continue
            assert (item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"]) == \
                   (code.scheme, code.value, code.meaning), s.name
        leaf = found["modifier"] or found["type"]
        assert tuple(leaf["recommendedDisplayRGBValue"]) == s.color, s.name
        assert leaf["3dSlicerLabel"] == s.display_name, s.name
    assert not leaves, f"entries without a catalogue structure: {list(leaves)}"


def test_paired_organs_share_one_type_with_a_colored_modifier_per_side(committed):
    leaves = _leaves(committed)
    parotid_l, parotid_r = S.get("Parotid_L"), S.get("Parotid_R")
    left = leaves[(parotid_l.category.value, parotid_l.type.value, S.LEFT.value)]
    right = leaves[(parotid_r.category.value, parotid_r.type.value, S.RIGHT.value)]
    assert left["type"] is right["type"]
    assert [m["CodeMeaning"] for m in left["type"]["Modifier"]] == ["Left", "Right"]
    assert left["modifier"]["recommendedDisplayRGBValue"] != right["modifier"]["recommendedDisplayRGBValue"]
    assert left["type"]["3dSlicerLabel"] == "parotid gland"


def test_tumours_are_morphologically_altered_structures_with_anatomy_shown(committed):
    by_code = {c["CodeValue"]: c for c in committed["SegmentationCodes"]["Category"]}
    assert by_code[S.ANATOMICAL_STRUCTURE.value]["showAnatomy"] is False
    tumours = by_code[S.MORPHOLOGICALLY_ALTERED.value]
    assert tumours["showAnatomy"] is True
    assert [t["CodeValue"] for t in tumours["Type"]] == [s.type.value for s in S.GTVS]


@pytest.mark.parametrize("name", S.STRUCTURE_NAMES)
def test_segment_tag_parses_as_slicer_entry_that_resolves_in_the_file(name, committed):
    s = S.get(name)
    entry = T.terminology_entry(s)
    fields = entry.split("~")
    assert len(fields) == 7 and all(len(f.split("^")) == 3 for f in fields[1:4] + fields[5:7])
    parsed = slicerio_segmentation.terminology_entry_from_string(entry)
    assert parsed["contextName"] == committed["SegmentationCategoryTypeContextName"]
    assert parsed["category"] == [s.category.scheme, s.category.value, s.category.meaning]
    assert parsed["type"] == [s.type.scheme, s.type.value, s.type.meaning]
    modifier = [s.modifier.scheme, s.modifier.value, s.modifier.meaning] if s.modifier else None
    assert parsed.get("typeModifier") == modifier
    region = [s.region.scheme, s.region.value, s.region.meaning] if s.region else None
    assert parsed.get("anatomicRegion") == region
    assert parsed["anatomicContextName"] == T.REGION_CONTEXT_NAME
    assert slicerio_segmentation.terminology_entry_to_string(parsed) == entry
    key = (s.category.value, s.type.value, s.modifier.value if s.modifier else None)
    assert key in _leaves(committed)


def test_segment_tag_accepts_any_spelling():
    assert T.terminology_entry("Len_L") == T.terminology_entry(S.get("Lens_L"))
    assert T.terminology_entry("glnd_submand_r") == T.terminology_entry("Submandibular_R")


def test_cli_check_passes_on_the_committed_file_and_fails_on_a_stale_one(tmp_path, capsys):
    assert cli.main(["terminology", "--check"]) == cli.EXIT_OK
    written = tmp_path / "out.term.json"
    assert cli.main(["terminology", "--write", str(written)]) == cli.EXIT_OK
    assert written.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")
    doc = json.loads(written.read_text(encoding="utf-8"))
    doc["SegmentationCodes"]["Category"][0]["Type"][0]["recommendedDisplayRGBValue"] = [0, 0, 0]
    written.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    assert cli.main(["terminology", "--check", str(written)]) == cli.EXIT_ERROR
    assert "out of date" in capsys.readouterr().err


def test_slicer_terminology_logic_loads_the_file_and_resolves_every_segment_tag():
    import slicer  # slicer-core: Slicer's own terminology parser, headless

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    name = logic.LoadTerminologyFromFile(str(COMMITTED))
    assert name == T.CONTEXT_NAME
    assert logic.GetNumberOfCategoriesInTerminology(name) == 2
    for s in S.STRUCTURES:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(T.terminology_entry(s), entry), s.name
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [name], []), s.name
        assert entry.GetTerminologyContextName() == name
        assert entry.GetTypeObject().GetCodeValue() == s.type.value, s.name
        leaf = entry.GetTypeModifierObject() if s.modifier else entry.GetTypeObject()
        if s.modifier:
            assert leaf.GetCodeValue() == s.modifier.value, s.name
        assert tuple(leaf.GetRecommendedDisplayRGBValue()) == s.color, s.name
        assert leaf.GetSlicerLabel() == s.display_name, s.name
        assert logic.SerializeTerminologyEntry(entry) == T.terminology_entry(s), s.name
