"""The demo recipe's training cohort: small and full-size phantoms, with scanners, written straight into both
raw datasets (images on their own grids for nnU-Net to resample as inference does), resumable."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from SegRapSegmenterLib.training import demo_bundle as D


def test_the_cohort_fills_both_datasets_on_each_groups_grid_and_a_second_run_keeps_what_is_there(tmp_path):
    cohort = (D.CohortGroup("small", "small", 0, 2, False), D.CohortGroup("fovcoarse", (3.0, 4.0, 4.0), 100, 1, True))
    raw = tmp_path / "raw"
    D.write_cohort_datasets(raw, cohort, seed=7)
    for task, dataset_id in D.DATASETS.items():
        folder = raw / D.dataset_folder_name(dataset_id, task)
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["numTraining"] == 3 and dataset["segrap_orientation"] == "LPS"
        image = sitk.ReadImage(str(folder / "imagesTr" / "fovcoarse_0100_0000.nii.gz"))
        labels = sitk.ReadImage(str(folder / "labelsTr" / "fovcoarse_0100.nii.gz"))
        assert image.GetSpacing() == (4.0, 4.0, 3.0) and image.GetSize() == (69, 69, 126)  # the full field of view
        assert labels.GetSize() == image.GetSize()
        classes = np.unique(sitk.GetArrayFromImage(labels))
        assert (classes.max() == 54) if task == "oar" else set(classes) <= {0, 1, 2}
    small = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "Dataset601_SegRapOAR" / "imagesTr" / "small_0000_0000.nii.gz")))
    from SegRapSegmenterLib.phantom import cases as phantom
    assert np.array_equal(small, sitk.GetArrayFromImage(phantom.make_case(0, seed=7, size="small").ct))  # default scanner

    written = {p: p.stat().st_mtime_ns for p in raw.rglob("*.nii.gz")}
    D.write_cohort_datasets(raw, cohort, seed=7)
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*.nii.gz")} == written  # nothing rendered again
