"""A bundle's training statistics: written from training labels into the manifest's checksums, read back by the
pipeline, and turned into a plausibility reason for a volume far outside the training range."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference.bundles import DEMO_BUNDLE_PATH, load_bundle, verify_bundle
from SegRapSegmenterLib.inference.statistics import STATS_NAME, load_statistics, summarize, volume_range
from SegRapSegmenterLib.phantom import cases as phantom
from SegRapSegmenterLib.training import statistics as T


def test_summary_ranges_leave_out_cases_without_the_structure():
    stats = summarize([{"GTVnd": 0.0, "Brain": 1000.0}, {"GTVnd": 3.0, "Brain": 1200.0}, {"GTVnd": 5.0}], "test")
    assert stats["structures"]["GTVnd"] == {"volume_ml": [3.0, 4.0, 5.0], "cases": 2}
    assert volume_range(stats, "Brain") == (1000.0, 1200.0) and volume_range(stats, "Lens_L") is None
    assert volume_range(None, "Brain") is None


def test_labels_folder_statistics_recompose_the_54_classes(tmp_path):
    labels = tmp_path / "labelsTr"
    labels.mkdir()
    expected = []
    for index in range(2):
        case = phantom.make_case(index, seed=5, size="small")
        sitk.WriteImage(case.label_image(case.labelmap), str(labels / f"segrap_{index:04d}.nii.gz"))
        voxel_ml = float(np.prod(case.ct.GetSpacing())) / 1000.0
        expected.append(float(case.oar_masks()["Eye_L"].sum()) * voxel_ml)
    volumes = T.labels_folder_volumes(labels, "oar")
    assert [v["Eye_L"] for v in volumes] == pytest.approx(expected)
    assert set(volumes[0]) == set(S.OAR_NAMES)


def test_written_statistics_are_checksummed_and_loaded(tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE_PATH, bundle_dir)
    (bundle_dir / STATS_NAME).unlink(missing_ok=True)
    manifest = json.loads((bundle_dir / "segrap-model.json").read_text())
    manifest["files"].pop(STATS_NAME, None)
    (bundle_dir / "segrap-model.json").write_text(json.dumps(manifest))
    assert load_statistics(load_bundle(bundle_dir)) is None
    assert T.main([str(bundle_dir), "--phantom-cohort", "2", "--seed", "5"]) == 0
    bundle = load_bundle(bundle_dir)
    verify_bundle(bundle, record=False)  # the manifest lists it with its sha256
    stats = load_statistics(bundle)
    assert stats["cases"] == 2 and volume_range(stats, "Brain")[0] > 0
    (bundle_dir / STATS_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ModelError, match="failed verification"):
        verify_bundle(load_bundle(bundle_dir), record=False)
    with pytest.raises(ModelError, match="not a segrap-structure-stats/1 file"):
        load_statistics(load_bundle(bundle_dir))


def test_the_two_tasks_label_maps_of_one_case_count_as_one_case(tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE_PATH, bundle_dir)
    folders = {task: tmp_path / task / "labelsTr" for task in ("oar", "gtv")}
    for index in range(2):
        case = phantom.make_case(index, seed=5, size="small")
        for task, folder in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            labels = case.labelmap if task == "oar" else case.gtv_labelmap
            sitk.WriteImage(case.label_image(labels), str(folder / f"segrap_{index:04d}.nii.gz"))
    assert T.main([str(bundle_dir), "--labels", str(folders["oar"]), "--task", "oar", "--labels", str(folders["gtv"]),
                   "--task", "gtv"]) == 0
    stats = load_statistics(load_bundle(bundle_dir))
    assert stats["cases"] == 2 and "(2 label maps)" in stats["source"]
    assert stats["structures"]["Brain"]["cases"] == 2 and stats["structures"]["GTVp"]["cases"] == 2
