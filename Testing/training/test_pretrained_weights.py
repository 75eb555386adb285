"""Pre-trained weights: matched by name and shape, heads kept or re-initialised by class count, all reported."""

from __future__ import annotations

import copy
import fractions
import json

import pytest
import torch
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.training.pretrained import check_pretrained, is_head, load_pretrained, network_from_plans
from training_helpers import dataset_json, tiny_plans


@pytest.fixture
def plan_files(tmp_path):
    """Plans and dataset.json files of the tiny plan, for Task 1 (55 outputs) and Task 2 (3 outputs)."""
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(tiny_plans()))
    files = {}
    for task in ("oar", "gtv"):
        files[task] = tmp_path / f"dataset_{task}.json"
        files[task].write_text(json.dumps(dataset_json(task)))
    return plans, files


def _network(plan_files, task, seed):
    torch.manual_seed(seed)
    plans, files = plan_files
    return network_from_plans(plans, files[task], "3d_fullres")


def test_other_class_count_loads_the_body_and_reinitialises_the_heads(plan_files, tmp_path):
    source = _network(plan_files, "gtv", seed=1)  # 3 classes: "pre-training" on another task
    ckpt = tmp_path / "pretrained.pth"
    torch.save({"network_weights": source.state_dict(), "current_epoch": 1000}, ckpt)
    target = _network(plan_files, "oar", seed=2)  # 55 classes
    fresh = copy.deepcopy(target.state_dict())

    report = load_pretrained(target, ckpt)
    after = target.state_dict()
    heads = [n for n in after if is_head(n)]
    assert heads and not report.heads_loaded
    assert sorted(n for n, _, _ in report.shape_mismatch) == sorted(heads) and not report.missing
    assert set(report.loaded) == set(after) - set(heads)
    for name in report.loaded:
        assert torch.equal(after[name], source.state_dict()[name]), name
    for name in heads:
        assert torch.equal(after[name], fresh[name]), name  # left as freshly initialised
        assert after[name].shape[0] == 55
    text = report.summary()
    assert f"{len(report.loaded)} of {len(after)} tensors loaded" in text and "re-initialised" in text
    assert "decoder.seg_layers.0.weight: checkpoint (3," in text


def test_same_class_count_loads_the_heads_too_and_strips_wrapper_prefixes(plan_files, tmp_path):
    source = _network(plan_files, "oar", seed=3)
    ckpt = tmp_path / "ddp_compiled.pth"
    torch.save({"network_weights": {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    target = _network(plan_files, "oar", seed=4)
    report = load_pretrained(target, ckpt)
    assert report.heads_loaded and not report.skipped and not report.unused
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value)


def test_partly_matching_checkpoint_is_refused_unless_partial_loading_is_asked_for_then_reported(plan_files, tmp_path):
    state = _network(plan_files, "oar", seed=5).state_dict()
    first = next(n for n in state if n.endswith("weight") and not is_head(n))
    state[first] = torch.zeros(7, 1, 1, 1, 1)  # wrong shape
    dropped = next(n for n in state if n.endswith("bias") and not is_head(n))
    del state[dropped]
    state["extra.head.weight"] = torch.zeros(2)
    ckpt = tmp_path / "partial.pth"
    torch.save(state, ckpt)  # a bare state dict, as converted MultiTalent-style weights may be
    with pytest.raises(ModelError, match=r"refused: its architecture differs .*\(2 tensors outside the segmentation"):
        load_pretrained(_network(plan_files, "oar", seed=6), ckpt)  # by default another body is refused
    report = load_pretrained(_network(plan_files, "oar", seed=6), ckpt, allow_partial=True)
    assert (first, [7, 1, 1, 1, 1], list(_network(plan_files, "oar", 0).state_dict()[first].shape)) \
        in [tuple(x) for x in report.shape_mismatch]
    assert report.missing == [dropped] and report.unused == ["extra.head.weight"]
    assert f"skipped {dropped}: not in the checkpoint" in report.summary()


def test_foreign_architecture_and_pickled_objects_are_refused(plan_files, tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"network_weights": {"backbone.layer1.weight": torch.zeros(3)}}, foreign)
    with pytest.raises(ModelError, match="no tensor of the network matches"):
        load_pretrained(_network(plan_files, "oar", 0), foreign)
    pickled = tmp_path / "pickled.pth"
    torch.save({"network_weights": {}, "trainer": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ModelError, match="refused"):
        load_pretrained(_network(plan_files, "oar", 0), pickled)


def test_nnunet_checkpoint_with_numpy_scalars_in_its_log_loads(plan_files, tmp_path):
    import numpy as np

    source = _network(plan_files, "oar", seed=8)
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": source.state_dict(), "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.6)]},
                "current_epoch": np.int64(1000)}, ckpt)
    assert load_pretrained(_network(plan_files, "oar", seed=9), ckpt).heads_loaded


def test_check_pretrained_reports_without_training(plan_files, tmp_path):
    plans, files = plan_files
    ckpt = tmp_path / "gtv.pth"
    torch.save({"network_weights": _network(plan_files, "gtv", 7).state_dict()}, ckpt)
    report = check_pretrained(ckpt, plans, files["oar"], "3d_fullres")
    assert report.loaded and not report.heads_loaded


def test_other_input_channels_are_adapted_and_the_checksum_recorded(plan_files, tmp_path):
    import hashlib

    plans, files = plan_files
    two = json.loads(files["gtv"].read_text())
    two["channel_names"] = {"0": "CT", "1": "PET"}  # a pre-training with two input channels
    two_path = tmp_path / "two_channels.json"
    two_path.write_text(json.dumps(two))
    torch.manual_seed(11)
    source = network_from_plans(plans, two_path, "3d_fullres").state_dict()
    ckpt = tmp_path / "two_channels.pth"
    torch.save({"network_weights": source}, ckpt)
    target = _network(plan_files, "oar", seed=12)
    report = load_pretrained(target, ckpt)
    first = next(n for n, t in source.items() if t.dim() == 5)
    assert (first, list(source[first].shape), [source[first].shape[0], 1, *source[first].shape[2:]]) in \
        [tuple(a) for a in report.adapted]
    # one channel now answers a constant input as the two did together
    assert torch.allclose(target.state_dict()[first][:, 0], source[first].mean(dim=1))
    assert not report.heads_loaded and not [n for n, _, _ in report.shape_mismatch if not is_head(n)]
    assert report.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert "input channels adapted" in report.summary() and report.sha256[:16] in report.summary()


def test_a_deeper_encoder_is_refused_naming_both_architectures(plan_files, tmp_path):
    plans, files = plan_files
    deeper = json.loads(plans.read_text())
    arch = deeper["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["n_conv_per_stage"] = [1, 2, 2]  # one more convolution in two stages
    deeper_path = tmp_path / "deeper.json"
    deeper_path.write_text(json.dumps(deeper))
    ckpt = tmp_path / "deeper.pth"
    torch.save({"network_weights": network_from_plans(deeper_path, files["oar"], "3d_fullres").state_dict()}, ckpt)
    with pytest.raises(ModelError) as refused:
        check_pretrained(ckpt, plans, files["oar"], "3d_fullres")
    message = str(refused.value)
    assert "in the checkpoint, not in the network" in message
    assert "Checkpoint encoder: 3 stages, features [2, 4, 8], convolutions per stage [1, 2, 2]" in message
    assert "the plans' network: 3 stages, features [2, 4, 8], convolutions per stage [1, 1, 1]" in message
