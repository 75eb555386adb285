"""Test-time mirroring keeps left and right apart: flipped predictions get their paired classes swapped."""

from __future__ import annotations

import torch
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.inference.predictor import mirrored_sum, plan_mirroring

LEFT, RIGHT = 40, 41  # Parotid_L, Parotid_R


class PositionNet(torch.nn.Module):
    """Stands in for a network that learned laterality from position: it calls the +x half (patient's
    left in LPS storage) Parotid_L and the other half Parotid_R, whatever the image shows."""

    def forward(self, x):
        n, _, z, y, w = x.shape
        logits = torch.zeros(n, 55, z, y, w)
        logits[:, LEFT, :, :, w // 2:] = 2.0
        logits[:, RIGHT, :, :, : w // 2] = 2.0
        return logits


def test_left_right_flip_with_swap_keeps_laterality():
    net = PositionNet()
    x = torch.randn(1, 1, 2, 3, 8)
    plain = net(x)
    permutation = list(S.class_mirror_permutation())
    swapped = mirrored_sum(net, x, (2,), 2, permutation)
    assert torch.allclose(swapped, plain)
    assert (swapped.argmax(1)[..., 4:] == LEFT).all() and (swapped.argmax(1)[..., :4] == RIGHT).all()


def test_stock_mirroring_blurs_left_and_right():
    net = PositionNet()
    x = torch.randn(1, 1, 2, 3, 8)
    blurred = mirrored_sum(net, x, (2,), 2, None)
    assert torch.allclose(blurred[:, LEFT], blurred[:, RIGHT])  # the network can no longer tell them apart


def test_flips_along_other_axes_are_not_swapped():
    net = PositionNet()
    x = torch.randn(1, 1, 2, 4, 8)
    assert torch.allclose(mirrored_sum(net, x, (0, 1), 2, list(S.class_mirror_permutation())), net(x))


def test_mirroring_matrix():
    # (training, requested, allowed axes, lr axis, paired classes) -> (axes, swap)
    assert plan_mirroring("none", False, (0, 1, 2), 2, True) == ((), False)
    assert plan_mirroring("none", True, None, 2, True) == ((2,), True)
    assert plan_mirroring("none", True, None, None, True) == ((), False)  # orientation unknown: no flips
    assert plan_mirroring("laterality-aware", True, (0, 1, 2), 2, True) == ((0, 1, 2), True)
    assert plan_mirroring("plain", True, (0, 1, 2), 2, True) == ((0, 1, 2), False)
    assert plan_mirroring("laterality-aware", True, (0, 1, 2), 2, False) == ((0, 1, 2), False)  # GTVs
