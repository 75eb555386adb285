"""The exact 45 <-> 54 decomposition: round trips, overlap relations, conflicts, permutations."""

from __future__ import annotations

import numpy as np
import pytest
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import DecompositionConflictError, InputError

# Relations stated in SEGRAP.md's prose, checked against the code's table and the phantom.
CONTAINS = [("Brain", n) for n in ("BrainStem", "Chiasm", "TemporalLobe_L", "TemporalLobe_R", "Hippocampus_L",
                                   "Hippocampus_R")] + [
    ("Eye_L", "Lens_L"), ("Eye_R", "Lens_R"), ("MiddleEar_L", "IAC_L"), ("MiddleEar_L", "Cochlea_L"),
    ("MiddleEar_R", "IAC_R"), ("MiddleEar_R", "Cochlea_R"), ("Larynx", "Larynx_Glottic"),
    ("Larynx", "Larynx_Supraglot")]
PARTIAL_OVERLAPS = [("TemporalLobe_L", "Hippocampus_L"), ("TemporalLobe_R", "Hippocampus_R"),
                    ("MiddleEar_L", "TympanicCavity_L"), ("MiddleEar_L", "VestibulSemi_L"),
                    ("MiddleEar_L", "ETbone_L"), ("MiddleEar_R", "TympanicCavity_R"),
                    ("MiddleEar_R", "VestibulSemi_R"), ("MiddleEar_R", "ETbone_R"), ("Larynx", "PharynxConst")]


def test_relations_of_the_table():
    for outer, inner in CONTAINS:
        assert S.contains(outer, inner) and not S.contains(inner, outer)
    for a, b in PARTIAL_OVERLAPS:
        assert S.overlaps(a, b) and not S.contains(a, b) and not S.contains(b, a)
    expected = {tuple(sorted(p)) for p in CONTAINS + PARTIAL_OVERLAPS}
    assert {tuple(sorted(p)) for p in S.overlap_pairs()} == expected
    assert S.CLASS_REGIONS[6] == {"Brain", "TemporalLobe_L", "Hippocampus_L"}
    assert S.CLASS_REGIONS[51] == {"Larynx", "PharynxConst"}


def test_class_names_are_unique_and_named_after_their_structures():
    assert len(set(S.CLASS_NAMES)) == 55
    assert S.CLASS_NAMES[0] == "background" and S.CLASS_NAMES[2] == "BrainStem"
    assert S.CLASS_NAMES[6] == "TemporalLobe_Hippocampus_L" and S.CLASS_NAMES[51] == "Larynx_PharynxConst"
    assert S.class_labels()["Trachea"] == 54 and S.gtv_class_labels() == {"background": 0, "GTVp": 1, "GTVnd": 2}


def test_phantom_has_all_54_classes(small_cases):
    for case in small_cases:
        counts = np.bincount(case.labelmap.ravel(), minlength=55)
        assert counts.size == 55 and (counts[1:] > 0).all(), [S.CLASS_NAMES[i] for i in np.flatnonzero(counts == 0)]


def test_recompose_of_decompose_is_identity_on_phantom_cases(small_cases):
    for case in small_cases:
        masks = {n: m.copy() for n, m in case.oar_masks().items()}
        labelmap = S.decompose(masks)
        assert np.array_equal(labelmap, case.labelmap)
        again = S.recompose(labelmap)
        for name in S.OAR_NAMES:
            assert np.array_equal(again[name], masks[name]), name


def test_overlap_relations_hold_on_recomposed_masks(small_cases):
    for case in small_cases:
        masks = case.oar_masks()
        for outer, inner in CONTAINS:
            assert masks[inner].any() and not (masks[inner] & ~masks[outer]).any(), (outer, inner)
            assert (masks[outer] & ~masks[inner]).any()
        for a, b in PARTIAL_OVERLAPS:
            both = masks[a] & masks[b]
            assert both.any() and (masks[a] & ~masks[b]).any() and (masks[b] & ~masks[a]).any(), (a, b)
        allowed = {tuple(sorted(p)) for p in S.overlap_pairs()}
        stack = masks.stack()
        coverage = stack.sum(axis=0)
        assert coverage.max() == 3  # Brain + temporal lobe + hippocampus is the deepest stack
        for i, a in enumerate(S.OAR_NAMES):
            for b in S.OAR_NAMES[i + 1:]:
                if tuple(sorted((a, b))) not in allowed:
                    assert not (stack[i] & stack[S.get(b).index]).any(), (a, b)


def test_stack_and_mapping_views_agree(small_case):
    masks = small_case.oar_masks()
    stack = masks.stack()
    assert stack.shape == (45, *small_case.labelmap.shape)
    for k, name in enumerate(S.OAR_NAMES):
        assert np.array_equal(stack[k], masks[name])
        assert masks.voxel_count(name) == int(stack[k].sum())
    assert np.array_equal(S.decompose(stack), small_case.labelmap)
    assert np.array_equal(S.decompose(masks), small_case.labelmap)
    assert np.array_equal(masks["len_l"], masks["Lens_L"])


def _conflicting_masks(case):
    masks = {n: m.copy() for n, m in case.oar_masks().items()}
    # a parotid painted into the mandible: a combination no class represents
    mandible = np.argwhere(masks["Mandible_L"])[:5]
    for z, y, x in mandible:
        masks["Parotid_L"][z, y, x] = True
    # a lens outside its eye
    brain_voxel = tuple(np.argwhere(masks["Brain"] & ~masks["BrainStem"] & ~masks["Chiasm"]
                                    & ~masks["TemporalLobe_L"] & ~masks["TemporalLobe_R"]
                                    & ~masks["Hippocampus_L"] & ~masks["Hippocampus_R"])[0])
    masks["Lens_R"][brain_voxel] = True
    return masks, mandible, brain_voxel


def test_conflicting_input_is_reported_with_the_structures_named(small_case):
    masks, mandible, brain_voxel = _conflicting_masks(small_case)
    with pytest.raises(DecompositionConflictError) as err:
        S.decompose(masks)
    text = str(err.value)
    assert "Mandible_L + Parotid_L: 5 voxels" in text
    assert "Brain + Lens_R: 1 voxels" in text
    by_combo = {c.structures: c for c in err.value.conflicts}
    lens = by_combo[("Brain", "Lens_R")]
    assert lens.example == tuple(int(v) for v in brain_voxel) and lens.voxels == 1
    parotid = by_combo[("Mandible_L", "Parotid_L")]  # catalogue order
    assert parotid.bbox[0] == (int(mandible[:, 0].min()), int(mandible[:, 0].max()))


def test_conflict_policies_are_explicit(small_case):
    masks, mandible, brain_voxel = _conflicting_masks(small_case)
    dropped, conflicts = S.decompose_with_conflicts(masks, on_conflict="background")
    assert {c.resolved_to for c in conflicts} == {0}
    assert dropped[brain_voxel] == 0 and all(dropped[tuple(v)] == 0 for v in mandible)
    nearest = S.decompose(masks, on_conflict="nearest")
    # {Brain, Lens_R} is one structure away from Brain alone (1) and from Eye_R + Lens_R (13): tie -> lower label
    assert nearest[brain_voxel] == 1
    # {Parotid_L, Mandible_L}: one away from either; the lower label (Mandible_L, 36) wins the tie
    assert all(nearest[tuple(v)] == 36 for v in mandible)
    untouched = np.ones(nearest.shape, bool)
    untouched[brain_voxel] = False
    untouched[tuple(mandible.T)] = False
    assert np.array_equal(nearest[untouched], small_case.labelmap[untouched])
    with pytest.raises(ValueError):
        S.decompose(masks, on_conflict="guess")


def test_decompose_requires_all_45_oars_and_rejects_gtvs(small_case):
    masks = dict(small_case.oar_masks().items())
    masks.pop("Trachea")
    with pytest.raises(InputError, match="missing: Trachea"):
        S.decompose(masks)
    masks["Trachea"] = np.zeros(small_case.labelmap.shape, bool)
    masks["GTVp"] = masks["Trachea"]
    with pytest.raises(InputError, match="Task 2"):
        S.decompose(masks)


def test_recompose_rejects_values_outside_the_54_classes():
    lm = np.zeros((2, 3, 4), dtype=np.int16)
    lm[0, 0, 0] = 55
    with pytest.raises(InputError, match="0..54"):
        S.recompose(lm)
    with pytest.raises(InputError, match="3D"):
        S.recompose(np.zeros((3, 4), np.uint8))


def test_recompose_of_empty_classes_gives_empty_masks():
    masks = S.recompose(np.zeros((4, 5, 6), np.uint8))
    assert all(not masks[n].any() for n in S.OAR_NAMES) and masks["Brain"].shape == (4, 5, 6)


def test_left_right_permutations_are_derived_involutions():
    perm = S.class_mirror_permutation()
    assert all(perm[perm[i]] == i for i in range(55))
    moved = {i for i in range(55) if perm[i] != i}
    paired = {i for i, region in enumerate(S.CLASS_REGIONS) if any(S.get(n).laterality for n in region)}
    assert moved == paired and len(moved) == 40  # classes 4-33 and 36-45
    assert perm[4] == 5 and perm[6] == 7 and perm[30] == 31 and perm[51] == 51
    sperm = S.structure_mirror_permutation()
    assert all(sperm[sperm[i]] == i for i in range(45))
    assert S.OAR_NAMES[sperm[S.get("Parotid_L").index]] == "Parotid_R"
    # flipping a label map left-right and permuting its classes equals decomposing the mirrored masks
    lm = np.zeros((1, 1, 55), np.uint8)
    lm[0, 0, :] = np.arange(55)
    flipped_masks = S.recompose(np.asarray(perm, np.uint8)[lm])
    direct = S.recompose(lm)
    for name in S.OAR_NAMES:
        partner = S.get(name).partner or name
        assert np.array_equal(flipped_masks[name], direct[partner])
