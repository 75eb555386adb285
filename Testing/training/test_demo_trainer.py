"""The demo trainer's pieces: the warm-up + cosine schedule, and whole-volume batches that never flip left and right."""

from __future__ import annotations

import numpy as np
import pytest
from SegRapSegmenterLib.training import demo_trainer as T


def test_schedule_warms_up_peaks_and_decays_to_one_percent():
    peak = 3e-3
    assert T.lr_at(0.0, peak) < 0.1 * peak
    assert T.lr_at(T.WARMUP_FRACTION / 2, peak) == pytest.approx(peak / 2)
    assert T.lr_at(T.WARMUP_FRACTION, peak) == pytest.approx(peak)
    values = [T.lr_at(p, peak) for p in np.linspace(T.WARMUP_FRACTION, 1.0, 50)]
    assert values == sorted(values, reverse=True)
    assert T.lr_at(1.0, peak) == pytest.approx(T.FINAL_LR_FRACTION * peak)


class _Dataset:
    """Cases whose left half (high x index) is labelled 1 and right half 2."""

    def load_case(self, key):
        seg = np.zeros((1, 8, 16, 24), np.int16)
        seg[..., 12:] = 1
        seg[..., :12] = 2
        seg[0, 0, 0, 0] = -1  # nnU-Net's "outside the crop" label
        return seg.astype(np.float32) * 10.0, seg, None, {}


def test_whole_volume_batches_keep_laterality_and_carry_every_deep_supervision_scale():
    loader = T.WholeVolumeLoader(_Dataset(), ["a", "b"], 2, [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]],
                                 augment=True, seed=0, patch_size=[8, 16, 24])
    for _ in range(10):
        batch = next(loader)
        assert tuple(batch["data"].shape) == (2, 1, 8, 16, 24)
        assert [tuple(t.shape[2:]) for t in batch["target"]] == [(8, 16, 24), (8, 8, 12), (4, 4, 6)]
        seg = batch["target"][0].numpy()
        assert seg.min() >= 0
        # shifts of at most 4 voxels (edges filled with background): the patient's left (high x) stays 1,
        # the right stays 2; a flip would put 2 on the left
        assert not (seg[..., 16:] == 2).any() and not (seg[..., :8] == 1).any()
        assert (seg[..., 4:12, 16:20] == 1).all() and (seg[..., 4:12, 4:8] == 2).all()


def test_fit_centre_crops_and_pads():
    a = np.arange(2 * 5 * 6, dtype=np.float32).reshape(1, 2, 5, 6)
    fitted = T._fit(a, (4, 3, 6), edge=True)
    assert fitted.shape == (1, 4, 3, 6)
    assert np.array_equal(fitted[0, 1], a[0, 0, 1:4])


def test_class_weights_favour_rare_classes_within_the_cap():
    seg = np.zeros((1, 10, 10, 10), np.int16)
    seg[0, :5] = 1          # 500 voxels
    seg[0, 5:, :5] = 2      # 250 voxels
    seg[0, 9, 9, 9] = 3     # 1 voxel
    weights = T.class_weights([seg, seg], num_classes=5, cap=4.0)
    assert weights.shape == (5,) and weights.dtype == np.float32
    assert weights[0] == 1.0                      # background
    assert weights[1] == 1.0 and weights[2] == pytest.approx(1.0)  # the median class and larger ones
    assert weights[3] == 4.0                      # rare: sqrt(250 / 1) clipped to the cap
    assert weights[4] == 4.0                      # absent from the training cases: the cap as well
    assert 1.0 <= T.class_weights([seg], 5)[3] <= T.CE_WEIGHT_CAP
