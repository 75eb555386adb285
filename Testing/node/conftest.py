"""Fixtures of the DICOM node tests: node processes, storescp destinations and phantom studies, all stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_peers import NodeProcess, StoreScp
from SegRapSegmenterLib.phantom.dicom_series import DicomPhantom, write_variant


@pytest.fixture
def node_factory(tmp_path):
    """Start ``segrap serve`` processes; every one is stopped at the end of the test."""
    started: list[NodeProcess] = []

    def make(spool: Path, port: int, *args: str, ready=None) -> NodeProcess:
        node = NodeProcess(spool, port, list(args), tmp_path / "serve.log")
        started.append(node)
        return node.start(ready_tls=ready)

    yield make
    for node in started:
        node.close()


@pytest.fixture
def storescp_factory():
    started: list[StoreScp] = []

    def make(folder: Path, port: int, ae_title: str = "TPS") -> StoreScp:
        scp = StoreScp(folder, port, ae_title)
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.close()


@pytest.fixture(scope="session")
def phantom_studies(tmp_path_factory) -> list[DicomPhantom]:
    """Two phantom studies (CT + contrast CT each, different UIDs), small size."""
    root = tmp_path_factory.mktemp("node_studies")
    return [write_variant("standard", root / f"study{i}", index=i) for i in range(2)]


@pytest.fixture(scope="session")
def thin_studies(tmp_path_factory) -> list[DicomPhantom]:
    """Two phantom studies of 12 slices (CT + contrast CT each): the demo contours one in seconds."""
    root = tmp_path_factory.mktemp("node_thin_studies")
    return [write_variant("standard", root / f"study{i}", index=i, slices=12) for i in range(2)]
