"""Plans and checkpoint values that cost memory or time before the weights are checked (issue 28, item 14c).

Sizes in a plans file are bounded at install, verify and load; a network whose plans do not fit the
checkpoint is refused from a build on torch's ``meta`` device (no memory), before the real network
is allocated; the checkpoint's mirroring axes must be distinct axes among 0, 1, 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_helpers import edit_plans, rewrite_checksums
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference import bundles as M


def _predictor_code(root: Path) -> str:
    return ("from SegRapSegmenterLib.inference import bundles as M\n"
            "from SegRapSegmenterLib.inference.predictor import TaskPredictor\n"
            f"TaskPredictor(M.load_bundle({str(root)!r}), 'oar')")


@pytest.mark.parametrize("changes, named", [
    ({"features_per_stage": [1_000_000] * 5}, "features_per_stage"),
    ({"n_stages": 5000}, "n_stages 5000"),
    ({"kernel_sizes": [[3, 3, 301]] * 5}, "kernel_sizes"),
    ({"n_conv_per_stage": [1, 2, 2, 2, 10_000]}, "n_conv_per_stage"),
    ({"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, True]]}, "strides"),
])
def test_plans_sizes_out_of_bounds_are_refused_at_install_and_load(store, bundle_copy, capsys, changes, named):
    """One feature count of a million would allocate terabytes once nnU-Net builds the network."""
    edit_plans(bundle_copy, **changes)
    assert cli.main(["models", "install", str(bundle_copy)]) == cli.EXIT_MODEL
    err = capsys.readouterr().err
    assert f"{bundle_copy}/oar/plans.json: refused: {named}" in err, err
    with pytest.raises(ModelError, match=f"refused: {named}"):
        M.load_bundle(bundle_copy)


def test_plans_that_do_not_fit_the_weights_are_refused_before_the_network_is_allocated(bundle_copy, rss_growth):
    """512 features per stage (inside the bounds): ~400 MiB of network that the 0.5 MB weights cannot fill."""
    edit_plans(bundle_copy, features_per_stage=[512] * 5)
    rc, err, growth = rss_growth("import torch\nfrom SegRapSegmenterLib.inference import predictor",
                                 _predictor_code(bundle_copy))
    assert rc != 0 and "ModelError" in err and "does not fit the weights of" in err, err[-2000:]
    assert "oar/fold_all/checkpoint_final.pth" in err and "plans (512, 1, 3, 3, 3), checkpoint (16, 1, 3, 3, 3)" in err
    assert growth < 150, f"peak RSS grew by {growth:.0f} MiB"


def test_the_demo_bundle_still_loads_with_the_shape_check(bundle_copy):
    from SegRapSegmenterLib.inference.predictor import TaskPredictor

    predictor = TaskPredictor(M.load_bundle(bundle_copy), "oar")
    assert predictor is not None


@pytest.mark.parametrize("axes", [[0, 1, 2] * 8, [0, 3], [0, 0], ["0"]])
def test_checkpoint_mirroring_axes_must_be_distinct_axes_among_0_1_2(bundle_copy, axes):
    """24 mirroring axes meant 2**24 network passes per tile."""
    import torch
    from SegRapSegmenterLib.inference.predictor import TaskPredictor

    path = bundle_copy / "oar" / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["inference_allowed_mirroring_axes"] = axes
    torch.save(checkpoint, path)
    rewrite_checksums(bundle_copy)
    with pytest.raises(ModelError, match=r"checkpoint_final.pth: refused: mirroring axes .* are not distinct axes"):
        TaskPredictor(M.load_bundle(bundle_copy), "oar")
