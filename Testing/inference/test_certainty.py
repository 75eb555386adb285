"""The certainty tally: the same labels as the arg-max, the probability table by hand, the expected Dice per structure."""

from __future__ import annotations

import numpy as np
import torch
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.inference.certainty import ClassTally, expected_dice


def test_labels_equal_argmax_including_ties():
    torch.manual_seed(0)
    scores = torch.randn(55, 40, 30).half().float()  # float16-rounded values: ties happen
    scores[3, :5] = scores[7, :5]  # tied foreground classes: the first wins
    scores[0, 5:10] = scores[1:, 5:10].max(0).values  # background tied with the best foreground: background wins
    won, _ = ClassTally.labels(scores)
    assert torch.equal(won, scores.argmax(0))


def test_table_sums_each_voxels_probabilities_under_its_winner():
    scores = torch.tensor([[[5.0, 0.0, -20.0]], [[0.0, 5.0, -20.0]], [[0.0, 0.0, 20.0]]])  # C=3, 1 x 3 voxels
    tally = ClassTally(3)
    won, best = ClassTally.labels(scores)
    tally.add(scores, won, best)
    table = tally.table()
    probabilities = torch.softmax(scores.reshape(3, -1), 0).numpy()
    expected = np.zeros((3, 3))
    for v, w in enumerate(won.reshape(-1).tolist()):
        expected[w] += probabilities[:, v]
    assert np.allclose(table, expected, atol=1e-6)
    assert np.isclose(table.sum(), 3.0)  # every kept voxel's probabilities sum to one


def test_far_background_voxels_are_skipped():
    scores = torch.zeros(3, 1, 2)
    scores[0] = 30.0  # every foreground class 30 below background: far background
    scores[1, 0, 1] = 25.0  # within the gap of background: kept
    tally = ClassTally(3)
    tally.add(scores, *ClassTally.labels(scores))
    assert np.isclose(tally.table().sum(), 1.0)


def test_expected_dice_is_one_when_certain_and_falls_with_doubt():
    table = np.zeros((3, 3))
    table[1, 1] = 100.0  # GTVp: 100 voxels won with certainty
    table[2, 2], table[2, 0] = 60.0, 40.0  # GTVnd: 100 voxels won at p = 0.6
    table[0, 2] = 30.0  # and 30 voxels' worth of GTVnd probability outside its contour
    dice = expected_dice("gtv", table)
    assert dice["GTVp"] == 1.0
    assert dice["GTVnd"] == round(2 * 60 / (100 + 90), 4)


def test_an_oar_sums_over_the_classes_that_cover_it():
    table = np.zeros((S.NUM_CLASSES + 1,) * 2)
    eye = list(S.OAR_CLASSES["Eye_L"])  # the eye's own class and the lens class inside it
    assert len(eye) >= 2
    table[eye[0], eye[1]] = table[eye[1], eye[0]] = 10.0  # the network torn between eye and lens: the eye is sure
    assert expected_dice("oar", table)["Eye_L"] == 1.0
    assert expected_dice("oar", table)["Lens_L"] < 1.0
