"""The extension's three descriptions (CMakeLists.txt, .s4ext, Extensions Index JSON) agree and are well formed."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = "https://github.com/SegRapExtension/SegRapExtension"
RAW_PREFIX = "https://raw.githubusercontent.com/SegRapExtension/SegRapExtension/main/"
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
# Fields of the v1.0.2 catalog entry schema and their JSON types; the first three are required.
CATALOG_FIELDS = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                  "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                  "enabled": bool, "tier": int}
CATALOG_REQUIRED = ("$schema", "category", "scm_url")


def cmake_settings() -> dict[str, str]:
    """set(EXTENSION_* "...") values of the top-level CMakeLists.txt, with ${_var} helpers expanded."""
    text = re.sub(r"#[^\n]*", "", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    values: dict[str, str] = {}
    for name, value in re.findall(r'\bset\(\s*(\w+)\s+"([^"]*)"\s*\)', text):
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def s4ext() -> dict[str, str]:
    """Keyword -> value lines of SegRapExtension.s4ext."""
    out = {}
    for line in (ROOT / "SegRapExtension.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            assert key not in out, f"{key} twice in the .s4ext"
            out[key] = value.strip()
    return out


def local_file(url: str) -> Path:
    """The repository file a raw GitHub URL of this project points to."""
    assert url.startswith(RAW_PREFIX), url
    return ROOT / url[len(RAW_PREFIX):]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def cmake() -> dict[str, str]:
    return cmake_settings()


def test_cmake_builds_the_module_as_a_slicer_extension(cmake):
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("project(SegRapExtension)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(SegRapSegmenter)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is not set"
    assert cmake["EXTENSION_CATEGORY"] == "Segmentation"
    assert cmake["EXTENSION_DEPENDS"].split() == ["PyTorch"]


def test_s4ext_agrees_with_cmake(cmake):
    desc = s4ext()
    assert desc["scm"] == "git" and desc["scmurl"] == REPOSITORY
    pairs = {"homepage": "HOMEPAGE", "category": "CATEGORY", "contributors": "CONTRIBUTORS",
             "description": "DESCRIPTION", "iconurl": "ICONURL", "screenshoturls": "SCREENSHOTURLS"}
    for key, var in pairs.items():
        assert desc[key] == cmake[f"EXTENSION_{var}"], key
    assert desc["depends"].split() == cmake["EXTENSION_DEPENDS"].split()


def test_index_json_follows_the_catalog_schema_and_agrees(cmake):
    entry = json.loads((ROOT / "SegRapExtension.json").read_text(encoding="utf-8"))
    assert entry["$schema"] == CATALOG_SCHEMA
    for key in CATALOG_REQUIRED:
        assert key in entry
    for key, value in entry.items():
        assert key in CATALOG_FIELDS, f"{key} is not a catalog entry field"
        assert isinstance(value, CATALOG_FIELDS[key]), key
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert 1 <= entry.get("tier", 1) <= 5
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["scm_url"] == REPOSITORY == s4ext()["scmurl"]
    assert entry["scm_revision"] == s4ext()["scmrevision"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()


def test_icon_and_screenshot_urls_point_to_files_in_the_repository(cmake):
    icon = local_file(cmake["EXTENSION_ICONURL"])
    assert png_size(icon) == (128, 128)
    screenshots = cmake["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots
    for url in screenshots:
        assert local_file(url).is_file(), f"screenshot {url} is not in the repository"
