"""Plans edits: a configuration inheriting the planned one, the poster's patch, and checks against the network."""

from __future__ import annotations

import json

import pytest
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import InputError
from SegRapSegmenterLib.training.plans import POSTER_PATCH, add_configuration
from training_helpers import tiny_plans

RESENC_LIKE_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]


@pytest.fixture
def plans_file(tmp_path):
    path = tmp_path / "nnUNetResEncUNetLPlans_40G.json"
    plans = tiny_plans(patch=(32, 128, 128))
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs.update(n_stages=7, strides=RESENC_LIKE_STRIDES, features_per_stage=[2] * 7,
                  kernel_sizes=[[3, 3, 3]] * 7, n_conv_per_stage=[1] * 7, n_conv_per_stage_decoder=[1] * 6)
    path.write_text(json.dumps(plans))
    return path


def test_poster_patch_becomes_a_configuration_nnunet_resolves(plans_file):
    edit = add_configuration(plans_file, "3d_fullres_p32x320x256", patch_size=POSTER_PATCH, batch_size=2)
    assert edit.divisors == (8, 64, 64) and edit.patch_size == (32, 320, 256) and edit.batch_size == 2
    plans = json.loads(plans_file.read_text())
    assert plans["configurations"]["3d_fullres_p32x320x256"] == {
        "inherits_from": "3d_fullres", "patch_size": [32, 320, 256], "batch_size": 2}
    manager = PlansManager(plans)
    conf, base = manager.get_configuration("3d_fullres_p32x320x256"), manager.get_configuration("3d_fullres")
    assert conf.patch_size == [32, 320, 256] and conf.batch_size == 2
    assert conf.data_identifier == base.data_identifier  # the base's preprocessed data is reused
    assert conf.network_arch_init_kwargs == base.network_arch_init_kwargs  # same network: pre-training fits


def test_patch_that_the_network_cannot_halve_is_refused(plans_file):
    with pytest.raises(InputError, match=r"300 \(axis 1\) is not a multiple of 64"):
        add_configuration(plans_file, "bad", patch_size=(32, 300, 256))
    with pytest.raises(InputError, match="needs 3 values"):
        add_configuration(plans_file, "bad", patch_size=(32, 320))
    add_configuration(plans_file, "p", patch_size=POSTER_PATCH)
    with pytest.raises(InputError, match="exists already"):
        add_configuration(plans_file, "p", patch_size=POSTER_PATCH)
    add_configuration(plans_file, "p", batch_size=4, overwrite=True)


def test_network_settings_override_a_copy_of_the_architecture(plans_file):
    add_configuration(plans_file, "wide", arch_kwargs={"features_per_stage": [4] * 7})
    manager = PlansManager(json.loads(plans_file.read_text()))
    assert manager.get_configuration("wide").network_arch_init_kwargs["features_per_stage"] == [4] * 7
    assert manager.get_configuration("3d_fullres").network_arch_init_kwargs["features_per_stage"] == [2] * 7
    with pytest.raises(InputError, match="Unknown network setting"):
        add_configuration(plans_file, "typo", arch_kwargs={"feature_per_stage": [4] * 7})


def test_cli_edit_plans(plans_file, capsys):
    code = cli.main(["train", "edit-plans", str(plans_file), "--name", "3d_fullres_poster", "--patch-size", "32", "320",
                     "256", "--batch-size", "3", "--arch", "features_per_stage=[3,3,3,3,3,3,3]"])
    out = capsys.readouterr().out
    assert code == 0 and "patch [32, 320, 256], batch size 3, network downsampling [8, 64, 64]" in out
    assert "-p nnUNetResEncUNetLPlans_40G" in out
    assert cli.main(["train", "edit-plans", str(plans_file), "--name", "x", "--arch", "features_per_stage"]) == 3
