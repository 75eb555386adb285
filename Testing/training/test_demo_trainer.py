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


def test_small_axes_are_padded_and_larger_ones_kept_for_windowing():
    a = np.arange(2 * 5 * 6, dtype=np.float32).reshape(1, 2, 5, 6)
    padded = T._pad_to(a, (4, 3, 6), edge=True)
    assert padded.shape == (1, 4, 5, 6)  # z padded from 2 to 4; y (5 > 3) kept whole for the windows
    assert np.array_equal(padded[0, 1], a[0, 0]) and np.array_equal(padded[0, 0], a[0, 0])


class _FullFieldDataset:
    """A case larger than the patch (a full-size field of view): x index + 100 * y index + 10000 * z index."""

    def load_case(self, key):
        z, y, x = np.meshgrid(np.arange(12), np.arange(20), np.arange(30), indexing="ij")
        data = (x + 100 * y + 10000 * z).astype(np.float32)[None]
        seg = np.where(x >= 15, 1, 2).astype(np.int16)[None]  # left half (high x) 1, right half 2
        return data, seg, None, {}


def test_larger_cases_give_random_patches_in_training_and_the_central_one_in_validation():
    patch = (8, 16, 24)
    train = T.WholeVolumeLoader(_FullFieldDataset(), ["a"], 1, [[1, 1, 1]], augment=False, seed=0, patch_size=patch)
    train.augment = True
    origins = set()
    for _ in range(40):
        data, seg = train._window(*train.cases[0])
        assert data.shape[1:] == patch and seg.shape[1:] == patch
        corner = int(data[0, 0, 0, 0])
        origins.add(corner)
        z0, y0, x0 = corner // 10000, corner // 100 % 100, corner % 100
        # the window is a contiguous cut of the case, labels cut with it (sides kept)
        assert np.array_equal(seg[0] == 1, (x0 + np.arange(24) >= 15)[None, None, :].repeat(8, 0).repeat(16, 1))
        assert 0 <= z0 <= 4 and 0 <= y0 <= 4 and 0 <= x0 <= 6
    assert len(origins) > 10  # the whole field of view is visited, not one place
    val = T.WholeVolumeLoader(_FullFieldDataset(), ["a"], 1, [[1, 1, 1]], augment=False, seed=0, patch_size=patch)
    data, _ = val._sample()
    assert int(data[0, 0, 0, 0]) == 2 * 10000 + 2 * 100 + 3  # the central window, every time
    assert next(val)["data"].shape == (1, 1, *patch)


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


class _RareClassDataset:
    """A case larger than the patch with one voxel of a rare class (3) in a corner, a block of class 2."""

    def load_case(self, key):
        seg = np.zeros((1, 12, 40, 60), np.int16)
        seg[0, 4:10, 10:30, 20:50] = 2
        seg[0, 1, 2, 3] = 3
        return seg.astype(np.float32), seg, None, {}


def test_windows_of_a_larger_case_are_centred_on_its_classes_often_enough_to_hold_a_rare_one(monkeypatch):
    patch = (8, 16, 24)
    loader = T.WholeVolumeLoader(_RareClassDataset(), ["a"], 1, [[1, 1, 1]], augment=True, seed=0, patch_size=patch)
    assert [len(v) for v in loader.class_voxels[0]] == [T.CLASS_VOXELS_KEPT, 1]  # classes 2 and 3
    draws = [loader._window(*loader.cases[0], loader.class_voxels[0], loader.class_odds[0]) for _ in range(400)]
    assert all(d.shape[1:] == patch and np.array_equal(d, s.astype(np.float32)) for d, s in draws)
    rare = sum(int((s == 3).any()) for _, s in draws)
    # a random window holds the corner voxel with probability 2/5 * 3/25 * 4/37 (~2 in 400); 60% of the windows are
    # class-centred and those pick class 3 (1 voxel) over class 2 (3600) with odds 1 : 1/60, so about 236 of 400
    assert T.CLASS_CENTRED_FRACTION == 0.6 and T.RARITY_EXPONENT == 0.5
    assert loader.class_odds[0] == pytest.approx([1 / 61, 60 / 61])
    assert 190 <= rare <= 280
    monkeypatch.setattr(T, "RARITY_EXPONENT", 0.0)  # a uniform pick: half of the centred windows, about 120
    uniform = T.WholeVolumeLoader(_RareClassDataset(), ["a"], 1, [[1, 1, 1]], augment=True, seed=0, patch_size=patch)
    assert 80 <= sum(int((uniform._window(*uniform.cases[0], uniform.class_voxels[0], uniform.class_odds[0])[1]
                          == 3).any()) for _ in range(400)) <= 165
    monkeypatch.setattr(T, "CLASS_CENTRED_FRACTION", 0.0)
    assert sum(int((loader._window(*loader.cases[0], loader.class_voxels[0])[1] == 3).any()) for _ in range(400)) <= 12


class _TwoKindDataset:
    """Case "big" larger than the patch, case "small" the patch's size."""

    def load_case(self, key):
        seg = np.zeros((1, 12, 40, 60) if key == "big" else (1, 8, 16, 24), np.int16)
        seg[0, 2:6, 4:12, 4:20] = 1
        return seg.astype(np.float32), seg, None, {}


def test_training_windows_come_from_larger_cases_at_their_share_whatever_the_case_count():
    patch = (8, 16, 24)
    loader = T.WholeVolumeLoader(_TwoKindDataset(), ["big", "small", "small", "small"], 1, [[1, 1, 1]],
                                 augment=True, seed=0, patch_size=patch)
    assert loader.larger == [0] and loader.patch_sized == [1, 2, 3]
    picked = []
    loader._window = lambda data, seg, voxels, odds: (picked.append(len(voxels) > 0), (data, seg))[1]
    for _ in range(1000):
        loader._sample()
    assert abs(sum(picked) / 1000 - T.LARGER_CASE_SHARE) < 0.05  # a uniform draw over cases would give 0.25
