"""Hostile model bundles (issue 20): each is the demo bundle with one crafted change and valid checksums.

Nothing in them may run (a marker file is never created), nothing outside the store may change,
memory and disk stay bounded, and the error names what was refused (exit 4 from the CLI).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
from bundle_helpers import edit_plans, rewrite_checksums
from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import ModelError
from SegRapSegmenterLib.inference import bundles as M
from SegRapSegmenterLib.inference import unpack


@pytest.fixture()
def bundle(bundle_copy) -> Path:
    """The writable demo bundle every hostile case starts from (conftest's ``bundle_copy``)."""
    return bundle_copy


def install_exit(source, capsys, *extra) -> tuple[int, str]:
    rc = cli.main(["models", "install", str(source), *extra])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Finding 1 and 2b: plans name code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, refused", [
    ({"nonlin": "os.system", "nonlin_kwargs": {"command": "touch {marker}"}}, "os.system"),
    ({"nonlin": "subprocess.getoutput", "nonlin_kwargs": {"cmd": "touch {marker}"}}, "subprocess.getoutput"),
    ({"nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"command": "touch {marker}"}}, "'command'"),
    ({"norm_op": "torch.load", "norm_op_kwargs": {"f": "{marker}.pkl", "weights_only": False}}, "torch.load"),
    ({"nonlin": "torch.nn.NoSuchReLU"}, "torch.nn.NoSuchReLU"),  # nnU-Net would drop it and build no nonlinearity
])
def test_plans_naming_code_are_refused_at_install_verify_and_load(store, bundle, tmp_path, capsys, change, refused):
    marker = tmp_path / "ran"
    edit_plans(bundle, **{k: json.loads(json.dumps(v).replace("{marker}", str(marker))) for k, v in change.items()})
    rc, err = install_exit(bundle, capsys)
    assert rc == cli.EXIT_MODEL and refused in err and "refused" in err
    assert not any(store.iterdir()) if store.exists() else True
    with pytest.raises(ModelError, match="refused"):
        M.load_bundle(bundle)  # what `models verify FOLDER` and `segment --bundle FOLDER` start with
    assert cli.main(["models", "verify", str(bundle)]) == cli.EXIT_MODEL
    from SegRapSegmenterLib.inference.predictor import TaskPredictor

    with pytest.raises(ModelError, match="refused"):
        TaskPredictor(M.Bundle(bundle, "x", "1", "x", "", {"oar": M.load_bundle(M.DEMO_BUNDLE_PATH).tasks["oar"]}),
                      "oar")
    assert not marker.exists()


def test_network_class_outside_the_allow_list_is_refused(bundle, capsys, store):
    path = bundle / "oar" / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "builtins.exec"
    path.write_text(json.dumps(plans))
    rewrite_checksums(bundle)
    rc, err = install_exit(bundle, capsys)
    assert rc == cli.EXIT_MODEL and "builtins.exec" in err


def test_resampling_function_outside_nnunet_is_refused(bundle, capsys, store):
    path = bundle / "gtv" / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["resampling_fn_data"] = "load_pickle"
    path.write_text(json.dumps(plans))
    rewrite_checksums(bundle)
    rc, err = install_exit(bundle, capsys)
    assert rc == cli.EXIT_MODEL and "load_pickle" in err


def test_the_network_is_built_from_the_allow_list_only(bundle):
    """The demo network comes out of the allow-list with its LeakyReLUs (nnU-Net's pydoc path is not used)."""
    import torch
    from SegRapSegmenterLib.inference.architecture import build_network

    plans = json.loads((bundle / "oar" / "plans.json").read_text())
    network = build_network(plans, "3d_fullres", 1, 55, "plans.json")
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in network.modules()) > 0


# --------------------------------------------------------------------------------------------
# Findings 4 and 5: sizes, links, manifest paths
# --------------------------------------------------------------------------------------------


def _zip_bundle(folder: Path, target: Path, extra=None) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"{folder.name}/{p.relative_to(folder).as_posix()}")
        for name, size in (extra or {}).items():
            with zf.open(f"{folder.name}/{name}", "w", force_zip64=True) as fh:
                block = b"\0" * (1 << 20)
                for _ in range(size >> 20):
                    fh.write(block)
    return target


def test_zip_bomb_is_refused_before_anything_is_written(store, bundle, tmp_path, capsys):
    """A 512 MiB entry of zeros deflates to ~2 MB; it is refused from the zip's directory, with no disk spent."""
    archive = _zip_bundle(bundle, tmp_path / "bomb.zip", {"oar/filler.bin": 512 << 20})
    assert archive.stat().st_size < 20 << 20
    rc, err = install_exit(archive, capsys)
    assert rc == cli.EXIT_MODEL and "oar/filler.bin" in err and "not listed" in err
    assert not store.exists() or not any(store.iterdir())


def test_zip_entry_over_the_ratio_is_refused_even_when_listed(store, bundle, tmp_path):
    (bundle / "oar" / "filler.bin").write_bytes(b"\0" * (64 << 20))
    rewrite_checksums(bundle)
    archive = _zip_bundle(bundle, tmp_path / "ratio.zip")
    (bundle / "oar" / "filler.bin").unlink()
    with pytest.raises(ModelError, match=r"filler.bin.*inflates"):
        M.install_bundle(archive)
    assert not any(store.iterdir())


def test_size_limits_hold_for_listed_files(store, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGRAP_MAX_BUNDLE_BYTES", str(4 << 20))
    with pytest.raises(ModelError, match="over the limit"):
        M.install_bundle(bundle)
    assert not any(store.iterdir())


def test_unlisted_file_is_refused_and_an_unlisted_swapped_plans_fails_verify(store, bundle, capsys):
    (bundle / "oar" / "notes.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ModelError, match=r"notes.pkl"):
        M.install_bundle(bundle)
    (bundle / "oar" / "notes.pkl").unlink()
    installed = M.install_bundle(bundle)
    manifest = json.loads((installed.root / M.MANIFEST_NAME).read_text())
    del manifest["files"]["oar/plans.json"]  # the attacker swaps plans.json and drops it from the list
    (installed.root / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert cli.main(["models", "verify", installed.name]) == cli.EXIT_MODEL
    assert "oar/plans.json: not listed" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "oar/../../outside.txt", "C:/x", "oar\\x",
                                   "./oar"])
def test_manifest_paths_must_be_plain_relative_paths(store, bundle, tmp_path, entry):
    rewrite_checksums(bundle)
    manifest = json.loads((bundle / M.MANIFEST_NAME).read_text())
    manifest["files"][entry] = "0" * 64
    (bundle / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a plain relative path"):
        M.verify_bundle(M.load_bundle(bundle))
    with pytest.raises(ModelError, match="not a plain relative path"):
        M.install_bundle(bundle)
    assert not any(store.iterdir())


@pytest.mark.parametrize("folder", ["/tmp", "../other", "oar/../.."])
def test_result_folder_outside_the_bundle_is_refused_and_leaves_nothing(store, bundle, folder):
    manifest = json.loads((bundle / M.MANIFEST_NAME).read_text())
    manifest["tasks"]["oar"]["result_folder"] = folder
    (bundle / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not a plain relative path"):
        M.install_bundle(bundle)
    assert not any(store.iterdir())


def test_links_in_a_folder_bundle_are_refused_before_copying(store, bundle, tmp_path):
    """Two links to '..' made the old copy grow exponentially; now any link is refused first."""
    os.symlink("..", bundle / "oar" / "up")
    os.symlink("..", bundle / "gtv" / "up")
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"a link inside the bundle"):
        M.install_bundle(bundle)
    assert time.monotonic() - started < 10
    assert not any(store.iterdir())


def test_interrupted_installs_are_cleaned_from_the_store(store, bundle):
    store.mkdir(parents=True)
    stale = store / ".install.999999999.abc"  # no such process
    (stale / "unpacked").mkdir(parents=True)
    (stale / "unpacked" / "big.bin").write_bytes(b"x" * 1000)
    M.install_bundle(bundle)
    assert not stale.exists()
    assert [p.name for p in store.iterdir()] == ["segrap-demo"]


def test_checkpoint_with_a_compressed_tensor_is_refused_before_loading(tmp_path, rss_growth):
    """A 0.5 MB checkpoint whose 512 MiB tensor is a deflated record (torch inflates it whole): refused first."""
    import torch

    small = tmp_path / "small.pth"
    torch.save({"network_weights": {"w": torch.zeros(1)}}, small)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(bomb, "w", compresslevel=1) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # declare 2**27 float32 elements (512 MiB) for storage 0
                assert b"cpuq\x08K\x01t" in data
                data = data.replace(b"cpuq\x08K\x01t", b"cpuq\x08J" + (1 << 27).to_bytes(4, "little") + b"t")
            if info.filename.endswith("/data/0"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                setattr(record, "compress_level" if hasattr(record, "compress_level") else "_compresslevel", 1)
                with out.open(record, "w", force_zip64=True) as fh:
                    block = bytes(1 << 20)
                    for _ in range(512):
                        fh.write(block)
                continue
            out.writestr(info, data)
    assert bomb.stat().st_size < 4 << 20
    rc, err, growth = rss_growth("from pathlib import Path\nfrom SegRapSegmenterLib.inference.bundles import "
                                 "load_checkpoint\nimport torch", f"load_checkpoint(Path({str(bomb)!r}))")
    assert rc != 0 and "is compressed" in err and "bomb.pth" in err, err[-2000:]
    assert growth < 100, f"peak RSS grew by {growth:.0f} MiB"


def overlapping_checkpoint(path: Path, copies: int) -> Path:
    """A real torch checkpoint of ``copies`` 1 MiB tensors whose records all point at the first one's bytes."""
    import torch

    torch.save({"network_weights": {f"w{i}": torch.zeros(1 << 18) for i in range(copies)}}, path)
    with zipfile.ZipFile(path) as src:
        records = {i.filename: (i, src.read(i)) for i in src.infolist()}
    aliases = [n for n in records if "/data/" in n and not n.endswith("/data/0")]
    with zipfile.ZipFile(path, "w") as out:
        for name, (info, data) in records.items():
            if name not in aliases:
                out.writestr(info, data)
        kept = next(i for i in out.infolist() if i.filename.endswith("/data/0"))
        for name in aliases:  # directory entries only: they share data/0's header and bytes
            alias = zipfile.ZipInfo(name, kept.date_time)
            alias.header_offset, alias.CRC = kept.header_offset, kept.CRC
            alias.compress_size = alias.file_size = kept.file_size
            out.filelist.append(alias)
            out.NameToInfo[name] = alias
    return path


def test_checkpoint_whose_records_overlap_is_refused_before_torch_reads_it(tmp_path):
    """64 records sharing one 1 MiB record: torch loads 64 MiB from a 1 MiB file; refused, naming the records."""
    import torch

    crafted = overlapping_checkpoint(tmp_path / "overlap.pth", 64)
    assert crafted.stat().st_size < 2 << 20
    loaded = torch.load(crafted, map_location="cpu", weights_only=True)["network_weights"]
    assert sum(t.numel() * t.element_size() for t in loaded.values()) == 64 << 20  # the attack is real
    with pytest.raises(ModelError, match=r"overlap\.pth: refused: records '.*/data/0' and '.*/data/1' overlap"):
        M.load_checkpoint(crafted)


def test_bundle_with_an_overlapping_checkpoint_is_not_installed(store, bundle, tmp_path, capsys):
    overlapping_checkpoint(bundle / "oar" / "fold_all" / "checkpoint_final.pth", 8)
    rewrite_checksums(bundle)
    rc, err = install_exit(bundle, capsys)
    assert rc == cli.EXIT_MODEL and "checkpoint_final.pth: refused" in err and "overlap" in err
    assert not any(store.iterdir())


def test_zip_of_many_small_inflating_entries_is_refused_over_all_entries(store, bundle, tmp_path, capsys):
    """Eighty 1 MiB entries of zeros (each at the per-entry floor) in a 5 MiB zip: 85 MiB, refused as a whole."""
    for i in range(80):
        (bundle / "oar" / f"part{i:02d}.bin").write_bytes(bytes(1 << 20))
    rewrite_checksums(bundle)
    archive = _zip_bundle(bundle, tmp_path / "small-bombs.zip")
    assert archive.stat().st_size < 6 << 20
    rc, err = install_exit(archive, capsys)
    assert rc == cli.EXIT_MODEL and "small-bombs.zip: refused" in err and "over all entries" in err, err
    assert not store.exists() or not any(store.iterdir())


def test_the_demo_bundle_zipped_still_installs(store, bundle, tmp_path):
    """The ratio over all entries leaves real bundles alone (weights barely compress)."""
    installed = M.install_bundle(_zip_bundle(bundle, tmp_path / "demo.zip"))
    assert installed.name == "segrap-demo"


@pytest.mark.parametrize("file, text, named", [
    ("oar/dataset.json", "[]", "oar/dataset.json: not a JSON object"),
    ("oar/dataset.json", '{"labels": "background"}', "oar/dataset.json: 'labels' is not an object"),
    ("oar/dataset.json", '{"labels": {"background": "zero"}}', "oar/dataset.json: 'labels' is not an object"),
    ("oar/plans.json", '"plans"', "oar/plans.json: not a JSON object"),
    (M.MANIFEST_NAME, None, f"{M.MANIFEST_NAME}: malformed"),
])
def test_malformed_json_files_are_a_model_error_naming_the_file(store, bundle, capsys, file, text, named):
    """A list, a string or a label that is not a number ended in a Python traceback (exit 1)."""
    if text is None:  # the manifest's tasks as a list of names
        rewrite_checksums(bundle)
        manifest = json.loads((bundle / M.MANIFEST_NAME).read_text())
        manifest["tasks"] = list(manifest["tasks"])
        (bundle / M.MANIFEST_NAME).write_text(json.dumps(manifest))
    else:
        (bundle / file).write_text(text)
        rewrite_checksums(bundle)
    rc, err = install_exit(bundle, capsys)
    assert rc == cli.EXIT_MODEL and named in err, err
    assert "Traceback" not in err


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_a_zip_with_a_damaged_deflate_stream_is_a_model_error(store, bundle, tmp_path, capsys):
    archive = _zip_bundle(bundle, tmp_path / "damaged.zip")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("bundle/oar/plans.json")
    start = info.header_offset + 30 + len(info.filename.encode())  # zipfile writes no local extra field here
    _patch(archive, start, b"\xff" * 8)  # block type 3: reserved, zlib stops with an error
    rc, err = install_exit(archive, capsys)
    assert rc == cli.EXIT_MODEL and "damaged.zip: not a valid zip file" in err, err


def test_a_zip_with_an_encrypted_entry_is_a_model_error(store, bundle, tmp_path, capsys):
    archive = _zip_bundle(bundle, tmp_path / "locked.zip")
    with zipfile.ZipFile(archive) as zf:
        info, directory = zf.getinfo(f"bundle/{M.MANIFEST_NAME}"), zf.start_dir
    data = archive.read_bytes()
    central = data.index(b"PK\x01\x02" + data[directory + 4:directory + 8], directory)
    while data[central + 46:central + 46 + len(info.filename)] != info.filename.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    _patch(archive, central + 8, bytes([data[central + 8] | 1]))  # general purpose flag bit 0: encrypted
    _patch(archive, info.header_offset + 6, bytes([data[info.header_offset + 6] | 1]))
    rc, err = install_exit(archive, capsys)
    assert rc == cli.EXIT_MODEL and "locked.zip: refused: an entry cannot be unpacked" in err, err


def test_a_zip_naming_one_entry_twice_is_refused(store, bundle, tmp_path, capsys):
    archive = _zip_bundle(bundle, tmp_path / "twice.zip")
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("bundle/oar/plans.json", (bundle / "oar" / "plans.json").read_bytes())
    rc, err = install_exit(archive, capsys)
    assert rc == cli.EXIT_MODEL and "twice.zip: refused: entries appear more than once (bundle/oar/plans.json)" in err
    assert not any(store.iterdir())


def test_models_remove_takes_a_plain_name(store, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / M.MANIFEST_NAME).write_text("{}")
    store.mkdir(parents=True)
    for name in ("../../victim", str(victim), "..", ".install.1"):
        assert cli.main(["models", "remove", name]) == cli.EXIT_MODEL
        assert "is not a bundle name" in capsys.readouterr().err
    assert (victim / M.MANIFEST_NAME).is_file()


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


class _Hostile(http.server.BaseHTTPRequestHandler):
    """/endless: an unbounded body; /trickle: one byte a second; /redirect: to another host; /big: a lying length."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        try:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "ftp://elsewhere.invalid/bundle.zip")
                self.end_headers()
                return
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            block = b"\0" * (1 << 16)
            for _ in range(100000 if self.path != "/trickle" else 30):
                self.wfile.write(block if self.path != "/trickle" else b"\0")
                self.wfile.flush()
                if self.path == "/trickle":
                    time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def hostile_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_plain_http_needs_an_explicit_flag(store, hostile_server, capsys):
    rc, err = install_exit(f"{hostile_server}/endless", capsys)
    assert rc == cli.EXIT_MODEL and "plain http" in err and "--allow-http" in err


def test_download_is_capped_in_size_and_time(store, hostile_server, monkeypatch):
    monkeypatch.setenv("SEGRAP_MAX_BUNDLE_BYTES", str(8 << 20))
    with pytest.raises(ModelError, match="download passed"):
        M.install_bundle(f"{hostile_server}/endless", allow_http=True)
    with pytest.raises(ModelError, match="announces"):
        M.install_bundle(f"{hostile_server}/big", allow_http=True)
    started = time.monotonic()
    with pytest.raises(ModelError, match="longer than"):
        M.install_bundle(f"{hostile_server}/trickle", allow_http=True,
                         limits=unpack.Limits(download_s=2.0, read_timeout_s=1.0))
    assert time.monotonic() - started < 8
    assert not any(store.iterdir())


def test_redirect_to_another_scheme_or_host_is_refused(store, hostile_server):
    with pytest.raises(ModelError, match="redirects to ftp://elsewhere.invalid"):
        M.install_bundle(f"{hostile_server}/redirect", allow_http=True)


def test_nnunet_residual_encoder_plans_pass_the_allow_list(bundle):
    """The ResEnc presets' network (as nnU-Net's planner writes it) is allowed and builds."""
    from SegRapSegmenterLib.inference.architecture import build_network

    plans = json.loads((bundle / "oar" / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    arch["arch_kwargs"]["n_blocks_per_stage"] = arch["arch_kwargs"].pop("n_conv_per_stage")
    assert type(build_network(plans, "3d_fullres", 1, 55, "plans.json")).__name__ == "ResidualEncoderUNet"
