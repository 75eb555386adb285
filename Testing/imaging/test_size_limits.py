"""Image size bombs (issue 20): the declared size is refused before memory is spent on it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.formats.imaging import read_volume



def _nrrd_header(path, size, encoding="raw", data=b""):
    path.write_bytes(("NRRD0004\ntype: short\ndimension: 3\nsizes: " + " ".join(map(str, size)) +
                      f"\nencoding: {encoding}\nendian: little\n\n").encode() + data)
    return path


def test_a_85_byte_nrrd_declaring_4_gib_is_refused_before_reading(tmp_path, rss_growth):
    path = _nrrd_header(tmp_path / "bomb.nrrd", (2048, 2048, 512))
    assert path.stat().st_size < 100
    rc, err, growth = rss_growth("from SegRapSegmenterLib.formats.imaging import read_volume",
                                 f"read_volume({str(path)!r})")
    assert rc != 0 and "bomb.nrrd" in err and "2048 x 2048 x 512" in err and "SEGRAP_MAX_VOXELS" in err
    assert growth < 50, f"peak RSS grew by {growth:.0f} MiB"


def test_a_gzip_nrrd_bomb_is_refused_from_its_header(tmp_path):
    import gzip

    data = gzip.compress(b"\0" * (64 << 20), 1)
    path = _nrrd_header(tmp_path / "gz.nrrd", (4096, 4096, 2000), "gzip", data)
    with pytest.raises(InputError, match=r"gz.nrrd: declares 4096 x 4096 x 2000"):
        read_volume(path)


@pytest.mark.parametrize("size", [(2, 2, 1_000_000), (20000, 4, 4)])
def test_an_axis_too_long_for_a_ct_is_refused(tmp_path, size):
    path = _nrrd_header(tmp_path / "long.nrrd", size)
    with pytest.raises(InputError, match=r"long.nrrd: declares .* an axis of more than"):
        read_volume(path)
    if size[0] == 2:  # through the whole command once: exit 3 and an empty output folder
        out = tmp_path / "out"
        rc = cli.main(["segment", "--ct", str(path), "--out", str(out), "--bundle", "demo", "--tasks", "oar"])
        assert rc == cli.EXIT_INPUT
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_the_limit_reads_nifti_and_metaimage_headers(tmp_path, monkeypatch, suffix):
    image = sitk.GetImageFromArray(np.full((8, 16, 16), -1000, np.int16))
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    monkeypatch.setenv("SEGRAP_MAX_VOXELS", str(8 * 16 * 16 - 1))
    with pytest.raises(InputError, match=r"declares 16 x 16 x 8 = 2,048 voxels, over the limit of 2,047"):
        read_volume(tmp_path / f"ct{suffix}")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
@pytest.mark.parametrize("spacing, shown", [((2e-7, 2e-7, 2.0), "2e-07 mm along x"),
                                            ((0.5, 0.5, 80.0), "80 mm along z")])
def test_an_image_with_an_absurd_spacing_is_refused_from_its_header(tmp_path, suffix, spacing, shown):
    """A 52 KB CT of 2e-7 mm pixels cost the worker 2.7 GB once resampled to the network's millimetres."""
    image = sitk.Image(16, 16, 4, sitk.sitkInt16)
    image.SetSpacing(spacing)
    path = tmp_path / f"tiny{suffix}"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match=rf"CT {path}: a voxel spacing of {shown} is not a CT's"):
        read_volume(path)


def test_the_network_grid_check_refuses_an_absurd_spacing_of_an_image_in_memory():
    """Slicer hands volumes over without a file: the spacing is checked again before nnU-Net resamples."""
    from SegRapSegmenterLib.inference.predictor import check_network_grid

    with pytest.raises(InputError, match=r"a voxel spacing of 2e-07 mm along axis 1"):
        check_network_grid([4, 256, 256], [2.0, 2e-7, 2e-7], [3.0, 2.0, 2.0], [32, 64, 64])
    check_network_grid([4, 256, 256], [2.0, 0.5, 0.5], [3.0, 2.0, 2.0], [32, 64, 64])  # a real CT passes
