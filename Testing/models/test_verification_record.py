"""Issue 31: a run re-hashes only the bundle files that changed since their full check, and still finds every change."""

from __future__ import annotations

import json
import os
import time

import pytest
from SegRapSegmenterLib.errors import InputError, ModelError
from SegRapSegmenterLib.inference import bundles as M
from SegRapSegmenterLib.inference.devices import check_device_name


def test_a_full_check_records_each_file_and_a_quick_check_then_hashes_none(store, bundle_copy):
    bundle = M.load_bundle(bundle_copy)
    first = M.verify_bundle(bundle, quick=True)  # no record yet: every file is hashed
    assert (first.hashed, first.unchanged) == (len(bundle.files), 0)
    assert first.record == str(M.verification_record_path(bundle)) and store.parent in M.verification_record_path(
        bundle).parents
    again = M.verify_bundle(bundle, quick=True)
    assert (again.hashed, again.unchanged) == (0, len(bundle.files))
    assert M.verify_bundle(bundle).hashed == len(bundle.files)  # `segrap models verify`: always every file


def test_a_changed_file_is_hashed_again_and_refused_even_with_its_old_size_and_mtime(store, bundle_copy):
    bundle = M.load_bundle(bundle_copy)
    M.verify_bundle(bundle)
    target = bundle_copy / "gtv" / "dataset.json"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\n")  # same size, other content
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ModelError, match="gtv/dataset.json: checksum differs"):
        M.verify_bundle(bundle, quick=True)  # the change time (and file id) differ: hashed, refused


def test_a_touched_but_intact_file_is_hashed_once_and_recorded_again(store, bundle_copy):
    bundle = M.load_bundle(bundle_copy)
    M.verify_bundle(bundle)
    time.sleep(0.01)
    os.utime(bundle_copy / "oar" / "plans.json")
    touched = M.verify_bundle(bundle, quick=True)
    assert (touched.hashed, touched.unchanged) == (1, len(bundle.files) - 1)
    assert M.verify_bundle(bundle, quick=True).hashed == 0


def test_a_record_of_another_manifest_is_not_trusted(store, bundle_copy):
    bundle = M.load_bundle(bundle_copy)
    M.verify_bundle(bundle)
    record = M.verification_record_path(bundle)
    data = json.loads(record.read_text())
    data["manifest_sha256"] = "0" * 64
    record.write_text(json.dumps(data))
    assert M.verify_bundle(bundle, quick=True).hashed == len(bundle.files)


def test_install_records_the_installed_files_without_hashing_them_twice(store, bundle_copy):
    installed = M.install_bundle(bundle_copy)
    check = M.verify_bundle(installed, quick=True)
    assert (check.hashed, check.unchanged) == (0, len(installed.files))


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_include_a_gpu_index(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda 1", "CPU"])
def test_other_device_names_are_refused_with_the_choices(name):
    with pytest.raises(InputError, match="cuda:N"):
        check_device_name(name)
