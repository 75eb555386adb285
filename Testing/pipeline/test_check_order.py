"""Issue 31: a plain CT alone contours the OARs; cheap checks (paths, headers, device) come before the model bundle;
a cohort hashes the bundle once, not per case."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.inference import bundles as M


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A SEGRAP_HOME of the test's own: no record of an earlier bundle check."""
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def broken_bundle(tmp_path):
    """A copy of the demo bundle whose checkpoint no longer matches its checksum."""
    bundle = tmp_path / "broken"
    shutil.copytree(M.DEMO_BUNDLE_PATH, bundle)
    with open(bundle / "gtv" / "fold_all" / M.CHECKPOINT_NAME, "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return bundle


def test_a_plain_ct_alone_contours_the_oars_and_says_the_gtvs_need_the_contrast_ct(heldout_case, home, tmp_path,
                                                                                    capsys):
    _, paths = heldout_case
    out = tmp_path / "out"
    rc = cli.main(["segment", "--ct", str(paths.ct), "--out", str(out), "--bundle", "demo", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_OK, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "the tumour volumes (GTVp, GTVnd) need the contrast CT" in notes[0]
    provenance = json.loads((out / f"{paths.folder.name}.provenance.json").read_text())
    assert provenance["tasks"] == ["oar"] and "Parotid_L" in provenance["structures"]
    # named tasks stay as named: the GTVs without a contrast CT are an error
    assert cli.main(["segment", "--ct", str(paths.ct), "--tasks", "gtv", "--out", str(tmp_path / "x"),
                     "--bundle", "demo", "--device", "cpu"]) == cli.EXIT_INPUT
    assert "give --contrast-ct" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_mistyped_input_is_reported_before_the_bundle_is_checked(heldout_case, broken_bundle, home, tmp_path,
                                                                   capsys):
    _, paths = heldout_case
    args = ["segment", "--out", str(tmp_path / "out"), "--bundle", str(broken_bundle), "--device", "cpu"]
    assert cli.main([*args, "--ct", str(paths.ct), "--tasks", "gtv", "--contrast-ct",
                     str(paths.contrast_ct) + "x"]) == cli.EXIT_INPUT
    assert "no such file or folder" in capsys.readouterr().err
    not_an_image = tmp_path / "ct.txt"
    not_an_image.write_text("not an image")
    assert cli.main([*args, "--ct", str(not_an_image)]) == cli.EXIT_INPUT
    assert "unsupported file type" in capsys.readouterr().err
    # and the bundle is indeed refused once the inputs are right
    assert cli.main([*args, "--contrast-ct", str(paths.contrast_ct)]) == cli.EXIT_MODEL
    assert "checksum differs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_reported_before_the_bundle_is_checked(heldout_case, broken_bundle, home, tmp_path,
                                                                    capsys):
    _, paths = heldout_case
    for device in ("cuda", "cuda:1"):
        rc = cli.main(["segment", "--contrast-ct", str(paths.contrast_ct), "--out", str(tmp_path / "out"),
                       "--bundle", str(broken_bundle), "--device", device])
        assert rc == cli.EXIT_INPUT
        assert f"--device {device}: no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a device name that is none is argparse's usage error
        cli.main(["segment", "--ct", str(paths.ct), "--out", str(tmp_path / "out"), "--device", "gpu1"])
    assert "cuda:N" in capsys.readouterr().err


def test_a_cohort_hashes_the_bundle_once_and_says_which_task_each_case_lacks(heldout_case, home, tmp_path, capsys):
    _, paths = heldout_case
    bundle = tmp_path / "bundle"  # a folder no earlier check has recorded
    shutil.copytree(M.DEMO_BUNDLE_PATH, bundle)
    cohort = tmp_path / "cohort"
    for name in ("p1", "p2"):
        (cohort / name).mkdir(parents=True)
        shutil.copy(paths.contrast_ct, cohort / name / "image_contrast.nii.gz")
    rc = cli.main(["segment", "--input-dir", str(cohort), "--out", str(tmp_path / "out"), "--bundle", str(bundle),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_OK, err
    assert sum("no plain CT (image.*, ct.*) in" in line for line in err.splitlines()) == 2
    checks = [json.loads((tmp_path / "out" / n / f"{n}.provenance.json").read_text())["bundle"]["verification"]
              for n in ("p1", "p2")]
    files = len(M.load_bundle(bundle).files)
    assert (checks[0]["hashed"], checks[1]["hashed"]) == (files, 0)
    assert checks[1]["unchanged_since_full_check"] == files
