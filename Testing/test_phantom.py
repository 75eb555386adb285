"""The synthetic head-and-neck phantom: layout, geometry, laterality, intensities, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.phantom import cases as phantom


def _read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_release_layout_files_read_back_with_stated_geometry(written_case):
    files = [written_case.ct, written_case.contrast_ct, written_case.task001, written_case.task002]
    files += [written_case.structure(n) for n in S.STRUCTURE_NAMES]
    for path in files:
        img = _read(path)
        assert img.GetSize() == (96, 96, 48), path
        assert img.GetSpacing() == pytest.approx((2.0, 2.0, 3.0)), path
        assert img.GetDirection() == pytest.approx(tuple(np.eye(3).ravel())), path
    assert _read(written_case.ct).GetPixelID() == sitk.sitkInt16
    leftovers = [p.name for p in written_case.folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_task001_map_equals_decomposition_of_the_45_files(written_case):
    masks = {n: sitk.GetArrayFromImage(_read(written_case.structure(n))) > 0 for n in S.OAR_NAMES}
    task001 = sitk.GetArrayFromImage(_read(written_case.task001))
    assert np.array_equal(S.decompose(masks), task001)
    task002 = sitk.GetArrayFromImage(_read(written_case.task002))
    gtvp = sitk.GetArrayFromImage(_read(written_case.structure("GTVp"))) > 0
    assert np.array_equal(task002 == 1, gtvp) and (task002 == 2).any()


def _centroids_lps(case: phantom.PhantomCase) -> dict[str, np.ndarray]:
    """Physical (LPS) centroid of every OAR, through SimpleITK's index-to-point mapping."""
    masks = case.oar_masks()
    out = {}
    for name in S.OAR_NAMES:
        zyx = np.argwhere(masks[name]).mean(axis=0)
        out[name] = np.array(case.ct.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))
    return out


@pytest.mark.parametrize("direction", ["identity", "flipped", "rotated", "oblique"])
def test_left_structures_lie_on_the_patients_left(direction):
    case = phantom.make_case(2, seed=1, size="small", direction=direction)
    assert np.allclose(np.array(case.ct.GetDirection()).reshape(3, 3), phantom.DIRECTIONS[direction])
    centroids = _centroids_lps(case)
    for s in S.OARS:
        if s.laterality == "L":
            left, right = centroids[s.name], centroids[s.partner]
            assert left[0] > 0 > right[0], (s.name, left, right)
    # anatomy, not storage, decides: superior and posterior relations hold for every direction
    assert centroids["Brain"][2] > centroids["Larynx"][2] > centroids["Trachea"][2]
    assert centroids["SpinalCord"][1] > centroids["Esophagus"][1] > centroids["Trachea"][1]
    assert centroids["Eye_L"][1] < centroids["BrainStem"][1]


def test_non_identity_direction_stores_the_same_anatomy(small_case):
    flipped = phantom.make_case(0, seed=0, size="small", direction="flipped")
    # resampling the flipped storage onto the identity grid gives back the identity case's classes
    back = sitk.Resample(flipped.label_image(flipped.labelmap), small_case.ct, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    agree = np.mean(sitk.GetArrayFromImage(back) == small_case.labelmap)
    assert agree > 0.999


def test_cases_are_deterministic_per_seed():
    a = phantom.make_case(1, seed=11, size="small")
    b = phantom.make_case(1, seed=11, size="small")
    c = phantom.make_case(1, seed=12, size="small")
    assert np.array_equal(a.labelmap, b.labelmap) and np.array_equal(a.gtv_labelmap, b.gtv_labelmap)
    assert np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct))
    assert not np.array_equal(a.labelmap, c.labelmap)


def test_intensities_are_ct_like_and_tumours_enhance(small_case):
    ct = sitk.GetArrayFromImage(small_case.ct).astype(float)
    ce = sitk.GetArrayFromImage(small_case.contrast_ct).astype(float)
    masks = small_case.oar_masks()
    mean = lambda img, m: float(img[m].mean())  # noqa: E731
    assert mean(ct, np.zeros_like(masks["Brain"]) | (ct < -900)) < -950  # air around the patient
    assert 20 < mean(ct, masks["Brain"] & ~masks["BrainStem"]) < 50
    assert mean(ct, masks["Mandible_L"]) > 500 and mean(ct, masks["Trachea"]) < -500
    assert -150 < mean(ct, masks["Parotid_R"]) < 20
    any_gtv = small_case.gtv_labelmap > 0
    for name, gtv in small_case.gtv_masks().items():
        # soft tissue near the tumour (within 2 cm; not air, fat or bone, nor an organ or tumour)
        near = ndimage.binary_dilation(gtv, iterations=10) & ~any_gtv & (small_case.labelmap == 0)
        around = near & (ct > 15) & (ct < 90)
        plain_contrast = np.median(ct[gtv]) - np.median(ct[around])
        enhanced_contrast = np.median(ce[gtv]) - np.median(ce[around])
        assert abs(plain_contrast) < 20, (name, plain_contrast)
        assert enhanced_contrast > 35, (name, enhanced_contrast)


def _bone_dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayFromImage(a) > 400, sitk.GetArrayFromImage(b) > 400
    return 2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def test_shifted_contrast_ct_moves_the_patient_by_the_recorded_motion():
    case = phantom.make_case(0, seed=0, size="small", contrast="shifted")
    motion = case.info["contrast_motion"]
    transform = sitk.AffineTransform(3)  # maps CT points to contrast-CT points
    transform.SetMatrix(motion["rotation"])
    transform.SetTranslation(motion["translation_mm"])
    aligned = sitk.Resample(case.contrast_ct, case.ct, transform, sitk.sitkLinear, -1000.0)
    unaligned = sitk.Resample(case.contrast_ct, case.ct, sitk.Transform(), sitk.sitkLinear, -1000.0)
    assert _bone_dice(case.ct, aligned) > 0.65
    assert _bone_dice(case.ct, aligned) > _bone_dice(case.ct, unaligned) + 0.15


def test_resampled_contrast_ct_lies_on_another_grid_but_is_aligned():
    case = phantom.make_case(0, seed=0, size="small", contrast="resampled")
    assert case.contrast_ct.GetSize() != case.ct.GetSize()
    assert case.contrast_ct.GetSpacing() != case.ct.GetSpacing()
    on_ct_grid = sitk.Resample(case.contrast_ct, case.ct, sitk.Transform(), sitk.sitkLinear, -1000.0)
    assert _bone_dice(case.ct, on_ct_grid) > 0.65


@pytest.fixture(scope="module")
def full_case() -> phantom.PhantomCase:
    """A full-size case (126 x 512 x 512): a minute to make under load, so made once for the tests that need one."""
    return phantom.make_case(0, seed=0, size="full")


def test_full_size_case_has_segrap_geometry_and_all_classes(full_case):
    case = full_case
    assert case.ct.GetSize() == (512, 512, 126)
    assert case.ct.GetSpacing() == pytest.approx((0.54, 0.54, 3.0))
    counts = np.bincount(case.labelmap.ravel(), minlength=55)
    assert (counts[1:] > 0).all()


def test_cli_writes_a_cohort(tmp_path, capsys):
    rc = cli.main(["phantom", "--out", str(tmp_path), "--cases", "2", "--seed", "5", "--size", "small"])
    assert rc == 0
    folders = sorted(p.name for p in (tmp_path / phantom.CASES_DIR).iterdir())
    assert folders == ["segrap_0000", "segrap_0001"]
    assert len(list((tmp_path / phantom.CASES_DIR / "segrap_0001").glob("*.nii.gz"))) == 49
    assert (tmp_path / phantom.ONEHOT_DIR / "Task001" / "segrap_0001.nii.gz").is_file()
    assert cli.main(["phantom", "--out", str(tmp_path), "--cases", "0"]) == cli.EXIT_INPUT
    assert "at least 1" in capsys.readouterr().err


def test_a_scanner_shifts_blurs_and_adds_noise_and_the_default_is_the_phantoms_own():
    base = phantom.make_case(3, seed=8, size="small")
    assert phantom.make_case(3, seed=8, size="small", scanner=phantom.Scanner()).info["scanner"] == {
        "offset_hu": 0.0, "blur_mm": 0.7, "noise_hu": None}
    shifted = phantom.make_case(3, seed=8, size="small", scanner=phantom.Scanner(offset_hu=20.0))
    a, b = sitk.GetArrayFromImage(base.ct).astype(float), sitk.GetArrayFromImage(shifted.ct).astype(float)
    inside = (a > -900) & (a < 2000)  # away from the clip limits
    assert np.mean(b[inside] - a[inside]) == pytest.approx(20.0, abs=0.5)  # same noise draw, offset added
    brain = base.labelmap == 1
    quiet = phantom.make_case(3, seed=8, size="small", scanner=phantom.Scanner(blur_mm=0.4, noise_hu=5.0))
    noisy = phantom.make_case(3, seed=8, size="small", scanner=phantom.Scanner(blur_mm=0.4, noise_hu=30.0))
    interior = ndimage.binary_erosion(brain, iterations=2)
    std = [sitk.GetArrayFromImage(c.ct)[interior].std() for c in (quiet, noisy)]
    assert std[0] < 8 and 25 < std[1] < 35, std
    drawn = phantom.Scanner.draw(np.random.default_rng(1))
    assert -25 <= drawn.offset_hu <= 25 and 0.4 <= drawn.blur_mm <= 1.4 and 5 <= drawn.noise_hu <= 30


def test_the_full_size_anatomy_renders_at_any_spacing_on_the_same_field_of_view(full_case):
    spec = phantom.full_size_grid((3.0, 2.0, 2.0))
    assert spec.shape == (126, 138, 138)  # 378 x 276 x 276 mm, as the full phantom
    assert phantom.full_size_grid((3.0, 0.54, 0.54)) == phantom.SIZES["full"]
    case = phantom.make_case(0, seed=0, size=spec)  # full_case's seed: the same anatomy on another grid
    assert case.ct.GetSize() == (138, 138, 126) and case.info["size"] == {"shape": [126, 138, 138],
                                                                         "spacing": [3.0, 2.0, 2.0]}
    full = full_case
    # the same anatomy, not the small phantom's compressed one: the brain's extent in mm matches the full size
    def extent_mm(c, spacing):
        z = np.nonzero((c.labelmap == 1).any(axis=(1, 2)))[0]
        return (z[-1] - z[0] + 1) * spacing
    assert extent_mm(case, 3.0) == pytest.approx(extent_mm(full, 3.0), abs=6.0)
    assert len(np.unique(case.labelmap)) >= 50  # at 2 mm the thinnest classes may lose a few voxels, not the head
