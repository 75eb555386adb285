"""The structure catalogue: official order and names, spellings, colors, codes, relations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import StructureNameError

# The official channel order of the Task 1 output (SEGRAP.md), written out independently of the code.
OFFICIAL_OARS = """Brain BrainStem Chiasm TemporalLobe_L TemporalLobe_R Hippocampus_L Hippocampus_R Eye_L Eye_R
Lens_L Lens_R OpticNerve_L OpticNerve_R MiddleEar_L MiddleEar_R IAC_L IAC_R TympanicCavity_L TympanicCavity_R
VestibulSemi_L VestibulSemi_R Cochlea_L Cochlea_R ETbone_L ETbone_R Pituitary OralCavity Mandible_L Mandible_R
Submandibular_L Submandibular_R Parotid_L Parotid_R Mastoid_L Mastoid_R TMjoint_L TMjoint_R SpinalCord Esophagus
Larynx Larynx_Glottic Larynx_Supraglot PharynxConst Thyroid Trachea""".split()

TG263 = {"BrainStem": "Brainstem", "Chiasm": "OpticChiasm", "TemporalLobe_L": "Lobe_Temporal_L",
         "OpticNerve_R": "OpticNrv_R", "MiddleEar_L": "Ear_Middle_L", "OralCavity": "Cavity_Oral",
         "Submandibular_R": "Glnd_Submand_R", "Mastoid_L": "Bone_Mastoid_L", "TMjoint_R": "Joint_TM_R",
         "Larynx_Glottic": "Glottis", "Larynx_Supraglot": "Larynx_SG", "PharynxConst": "Musc_Constrict",
         "Thyroid": "Glnd_Thyroid", "GTVnd": "GTVn"}


def test_catalogue_order_and_names_equal_the_official_list():
    assert list(S.OAR_NAMES) == OFFICIAL_OARS
    assert [s.index for s in S.OARS] == list(range(45))
    assert list(S.GTV_NAMES) == ["GTVp", "GTVnd"]
    assert [s.label for s in S.GTVS] == [1, 2]
    assert len(S.STRUCTURES) == 47


def test_tg263_names_follow_the_standard():
    for segrap, tg in TG263.items():
        assert S.get(segrap).tg263 == tg
    assert not S.get("IAC_L").tg263_standard and S.get("IAC_L").tg263 == "Canal_IAC_L"
    assert S.get("Parotid_L").tg263_standard


@pytest.mark.parametrize("spelling, name", [
    ("Brainstem", "BrainStem"), ("brainstem", "BrainStem"), ("BRAINSTEM", "BrainStem"), ("Len_L", "Lens_L"),
    ("len_r", "Lens_R"), ("PharynxCont", "PharynxConst"), ("PharynxConstr", "PharynxConst"),
    ("Oral cavity", "OralCavity"), ("Cavity_Oral", "OralCavity"), ("Glottis", "Larynx_Glottic"),
    ("OpticNrv_L", "OpticNerve_L"), ("Left parotid gland", "Parotid_L"), ("GTVn", "GTVnd"),
    ("Bone_Mandible_R", "Mandible_R"), ("Lobe_Temporal_R", "TemporalLobe_R"),
])
def test_known_spellings_resolve(spelling, name):
    assert S.get(spelling).name == name


def test_every_alias_of_every_structure_resolves_to_it():
    for s in S.STRUCTURES:
        for spelling in s.spellings:
            assert S.get(spelling) is s, spelling
            assert S.get(spelling.upper()) is s


def test_unknown_name_lists_the_closest_matches():
    with pytest.raises(StructureNameError) as err:
        S.get("Parotd_L")
    assert "Parotid_L" in str(err.value)
    with pytest.raises(KeyError):  # also usable where a KeyError is expected
        S.get("Spleen")


def test_colors_are_unique_and_neighbours_distinguishable():
    colors = [s.color for s in S.STRUCTURES]
    assert len(set(colors)) == len(colors)
    assert all(0 <= c <= 255 for rgb in colors for c in rgb)
    dist = lambda a, b: float(np.linalg.norm(np.subtract(S.get(a).color, S.get(b).color)))  # noqa: E731
    # any two structures: clearly different; overlapping or left/right partners: far apart
    assert min(dist(a.name, b.name) for a, b in itertools.combinations(S.STRUCTURES, 2)) >= 25
    close_pairs = list(S.overlap_pairs()) + [(s.name, s.partner) for s in S.OARS if s.laterality == "L"]
    assert min(dist(a, b) for a, b in close_pairs) >= 60


def test_codes_laterality_and_types():
    for s in S.OARS:
        assert s.category.value == "123037004" and s.rt_type == "ORGAN" and s.task == "oar"
        assert s.type.scheme == "SCT" and s.type.value.isdigit()
        if s.name.endswith("_L"):
            assert s.laterality == "L" and s.modifier.value == "7771000" and s.partner == s.name[:-1] + "R"
        elif s.name.endswith("_R"):
            assert s.laterality == "R" and s.modifier.value == "24028007"
        else:
            assert s.laterality is None and s.modifier is None
    assert S.get("BrainStem").type.value == "15926001"
    assert S.get("VestibulSemi_L").type.value == "22945000"
    assert S.get("GTVp").type.value == "86049000" and S.get("GTVp").region.value == "360955006"
    assert S.get("GTVnd").type.value == "14799000" and S.get("GTVnd").region.value == "81105003"
    assert all(s.rt_type == "GTV" and s.category.value == "49755003" for s in S.GTVS)


def test_nsd_tolerances():
    special = {"Larynx": 2.0, "OralCavity": 3.0}
    for s in S.STRUCTURES:
        assert s.nsd_tolerance_mm == special.get(s.name, 1.0)


def test_select_keeps_catalogue_order_and_resolves_spellings():
    chosen = S.select(["Parotid_R", "brainstem", "GTVn"])
    assert [s.name for s in chosen] == ["BrainStem", "Parotid_R", "GTVnd"]
    assert [s.name for s in S.select(None, task="gtv")] == ["GTVp", "GTVnd"]
