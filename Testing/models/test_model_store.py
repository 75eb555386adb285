"""Model bundles and the store: install from folder, zip and URL; checksums; refusals; labels."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from bundle_helpers import rewrite_checksums
from SegRapSegmenterLib.anatomy import structures as S
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference import bundles as M


def _zip(folder: Path, target: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return target


def test_store_location_follows_segrap_home(store, tmp_path):
    assert store == tmp_path / "home" / "models"


def test_demo_bundle_is_valid_small_and_verified():
    bundle = M.load_bundle(M.DEMO_BUNDLE_PATH)
    M.verify_bundle(bundle)
    assert set(bundle.tasks) == {"oar", "gtv"}
    assert bundle.tasks["oar"].labels == dict(zip(S.CLASS_NAMES, range(55)))
    assert bundle.tasks["oar"].input == "ct" and bundle.tasks["gtv"].input == "contrast_ct"
    size = sum(p.stat().st_size for p in M.DEMO_BUNDLE_PATH.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    plans = json.loads((bundle.result_path("oar") / "plans.json").read_text())
    assert plans["configurations"][bundle.tasks["oar"].configuration]["spacing"] == [3.0, 2.0, 2.0]
    assert bundle.tasks["oar"].orientation == "LPS" and bundle.tasks["oar"].training_mirroring == "none"


def test_install_list_verify_remove_from_folder(store, bundle_copy, capsys):
    from SegRapSegmenterLib import cli

    assert cli.main(["models", "install", str(bundle_copy)]) == 0
    installed = M.list_bundles()
    assert [b.name for b in installed] == ["segrap-demo"] and installed[0].root == store / "segrap-demo"
    assert M.resolve_bundle(None).name == "segrap-demo"
    assert cli.main(["models", "list"]) == 0 and "segrap-demo" in capsys.readouterr().out
    assert cli.main(["models", "verify"]) == 0
    assert cli.main(["models", "install", str(bundle_copy)]) == cli.EXIT_MODEL  # already there
    assert "already installed" in capsys.readouterr().err
    assert cli.main(["models", "install", str(bundle_copy), "--force"]) == 0
    assert cli.main(["models", "remove", "segrap-demo"]) == 0
    assert M.list_bundles() == []
    assert cli.main(["models", "remove", "segrap-demo"]) == cli.EXIT_MODEL


def test_install_from_zip_and_from_local_http_and_file_urls(store, bundle_copy, tmp_path):
    archive = _zip(bundle_copy, tmp_path / "demo.zip")
    assert M.install_bundle(archive).name == "segrap-demo"
    M.remove_bundle("segrap-demo")
    assert M.install_bundle(archive.as_uri()).name == "segrap-demo"
    M.remove_bundle("segrap-demo")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/demo.zip"
        bundle = M.install_bundle(url, allow_http=True)  # plain http only when asked
        M.verify_bundle(bundle)
        with pytest.raises(ModelError, match="download failed"):
            M.install_bundle(f"http://127.0.0.1:{server.server_address[1]}/missing.zip", allow_http=True)
    finally:
        server.shutdown()
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_changed_file_fails_install_and_verify(store, bundle_copy):
    plans = bundle_copy / "oar" / "plans.json"
    plans.write_text(plans.read_text() + " ")
    with pytest.raises(ModelError, match=r"oar/plans.json: checksum differs"):
        M.install_bundle(bundle_copy)
    assert M.list_bundles() == []
    plans.write_text(plans.read_text()[:-1])
    bundle = M.install_bundle(bundle_copy)
    checkpoint = bundle.checkpoint_path("gtv", "all")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    with pytest.raises(ModelError, match="gtv/fold_all/checkpoint_final.pth: checksum differs"):
        M.verify_bundle(M.resolve_bundle("segrap-demo"))


@pytest.mark.parametrize("entry", ["../evil.txt", "/etc/evil.txt", "bundle/../../evil.txt"])
def test_zip_with_escaping_paths_is_refused(store, bundle_copy, tmp_path, entry):
    archive = _zip(bundle_copy, tmp_path / "bad.zip", {entry: b"x"})
    with pytest.raises(ModelError, match="outside the bundle|not a plain relative path"):
        M.install_bundle(archive)
    assert not (tmp_path / "evil.txt").exists() and M.list_bundles() == []


def test_zip_with_a_link_is_refused(store, bundle_copy, tmp_path):
    archive = _zip(bundle_copy, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("bundle/oar/escape")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ModelError, match="link"):
        M.install_bundle(archive)


def test_folder_with_a_link_outside_is_refused(store, bundle_copy, tmp_path):
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", bundle_copy / "oar" / "escape.txt")
    with pytest.raises(ModelError, match="a link inside the bundle folder"):
        M.install_bundle(bundle_copy)


def test_wrong_labels_name_the_file_and_the_difference(store, bundle_copy):
    dataset = bundle_copy / "oar" / "dataset.json"
    original = dataset.read_text()
    data = json.loads(original)
    data["labels"]["Parotid_Left"] = data["labels"].pop("Parotid_L")
    dataset.write_text(json.dumps(data))
    with pytest.raises(ModelError) as err:
        M.load_bundle(bundle_copy)
    assert str(dataset) in str(err.value) and "missing Parotid_L=40" in str(err.value)
    assert "unexpected Parotid_Left=40" in str(err.value)
    dataset.write_text(original)
    manifest = json.loads((bundle_copy / M.MANIFEST_NAME).read_text())
    manifest["tasks"]["gtv"]["labels"] = {"background": 0, "GTVnd": 1, "GTVp": 2}
    (bundle_copy / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="wrong values"):
        M.load_bundle(bundle_copy)


def test_manifest_orientation_contradicting_the_training_dataset_is_refused(store, bundle_copy):
    dataset_path = bundle_copy / "oar" / "dataset.json"
    dataset = json.loads(dataset_path.read_text())
    dataset[M.DATASET_ORIENTATION_KEY] = "LPS"  # what the conversion writes
    dataset_path.write_text(json.dumps(dataset))
    assert M.load_bundle(bundle_copy).tasks["oar"].orientation == "LPS"  # agreeing: accepted
    manifest = json.loads((bundle_copy / M.MANIFEST_NAME).read_text())
    manifest["tasks"]["oar"]["orientation"] = "RPS"
    (bundle_copy / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError) as err:
        M.load_bundle(bundle_copy)
    assert "'RPS'" in str(err.value) and "'LPS'" in str(err.value) and str(dataset_path) in str(err.value)
    assert "left and right could come out swapped" in str(err.value)
    rewrite_checksums(bundle_copy)
    with pytest.raises(ModelError, match="left and right could come out swapped"):
        M.install_bundle(bundle_copy)
    assert M.list_bundles() == []


def test_truncated_checkpoint_is_a_model_error(tmp_path, bundle_copy):
    checkpoint = bundle_copy / "gtv" / "fold_all" / M.CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated or damaged"):
        M.load_checkpoint(checkpoint)


class _Payload:
    """Stands for any Python object a malicious checkpoint could carry."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "extra": _Payload()}, path)
    with pytest.raises(ModelError, match="could run code"):
        M.load_checkpoint(path)


def test_bundle_not_installed_lists_the_installed_ones(store, bundle_copy):
    with pytest.raises(ModelError, match=r"not installed .*: none"):
        M.resolve_bundle("clinical-v2")
    with pytest.raises(ModelError, match="No model bundle is installed"):
        M.resolve_bundle(None)
    M.install_bundle(bundle_copy)
    with pytest.raises(ModelError, match="installed in .*segrap-demo"):
        M.resolve_bundle("clinical-v2")
    assert M.resolve_bundle("demo").root == M.DEMO_BUNDLE_PATH
