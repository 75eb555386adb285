"""The image at the network's spacing is bounded too (issue 20): nnU-Net resamples before anything else."""

from __future__ import annotations

import pytest
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.inference.predictor import check_network_grid


def test_coarse_voxels_that_resample_past_the_limit_are_refused():
    # 100^3 voxels of 10 mm (a 2 MB file) at a 1 mm network spacing: 10^9 voxels
    with pytest.raises(InputError, match=r"becomes \[1000, 1000, 1000\] = 1,000,000,000 voxels, over the limit"):
        check_network_grid([100, 100, 100], [10.0, 10.0, 10.0], [1.0, 1.0, 1.0], [64, 64, 64])


def test_a_thin_image_is_counted_padded_to_a_whole_tile(monkeypatch):
    monkeypatch.setenv("SEGRAP_MAX_VOXELS", str(8000 * 96 * 96 - 1))
    with pytest.raises(InputError, match=r"\[8000, 96, 96\]"):
        check_network_grid([8000, 2, 2], [3.0, 2.0, 2.0], [3.0, 2.0, 2.0], [16, 96, 96])


def test_a_full_size_ct_at_segraps_spacing_passes():
    check_network_grid([150, 512, 512], [3.0, 0.97, 0.97], [3.0, 0.54, 0.54], [28, 256, 224])
