"""Plain helpers of the training tests: a tiny nnU-Net plan, the dataset.json of a task, a planned dataset copied."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from SegRapSegmenterLib.anatomy import structures as S

PLANNED_DATASET = 701  # the id of conftest's planned_oar

TINY_ARCH = {
    "n_stages": 3,
    "features_per_stage": [2, 4, 8],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1],
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


def tiny_plans(dataset_name: str = "Dataset999_Tiny", patch=(8, 16, 16)) -> dict:
    """An nnU-Net plans dict with one tiny PlainConvUNet configuration (what nnUNetv2_plan_experiment writes)."""
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 2.0, 2.0], "original_median_shape_after_transp": [48, 96, 96],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [48.0, 96.0, 96.0],
            "spacing": [3.0, 2.0, 2.0], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": copy.deepcopy(TINY_ARCH),
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": True}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3000.0, "mean": 40.0, "median": 40.0, "min": -1000.0, "percentile_00_5": -1000.0,
            "percentile_99_5": 1500.0, "std": 200.0}},
    }


def dataset_json(task: str = "oar") -> dict:
    """The dataset.json the conversion writes, for a task."""
    labels = S.class_labels() if task == "oar" else S.gtv_class_labels()
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 3, "file_ending": ".nii.gz"}


def planned_copy(planned: tuple[Path, Path, str], tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A test's own copy of ``planned_oar`` (its plans edits stay its own) with an empty nnUNet_results, set in the
    environment with a SEGRAP_HOME of its own; nnU-Net's three folders by name."""
    raw, preprocessed, name = planned
    dirs = {"nnUNet_raw": tmp_path / "nnUNet_raw", "nnUNet_preprocessed": tmp_path / "nnUNet_preprocessed",
            "nnUNet_results": tmp_path / "nnUNet_results"}
    shutil.copytree(raw / name, dirs["nnUNet_raw"] / name)
    shutil.copytree(preprocessed / name, dirs["nnUNet_preprocessed"] / name)
    dirs["nnUNet_results"].mkdir()
    for key, path in dirs.items():
        monkeypatch.setenv(key, str(path))
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")  # one export/metrics worker in nnU-Net's validation
    # set, then removed: monkeypatch then also undoes the folder that an in-process `segrap train run` registers there
    monkeypatch.setenv("nnUNet_extTrainer", "")
    monkeypatch.delenv("nnUNet_extTrainer")
    return dirs
