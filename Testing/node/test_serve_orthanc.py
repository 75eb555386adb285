"""Orthanc (started on loopback ports with a temporary configuration) sends a study; the RTSTRUCT joins it."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pydicom
import pytest
from node_peers import free_port, require, wait_until
from SegRapSegmenterLib.runner import stop_process_tree


class Orthanc:
    """An Orthanc of its own: storage in a temporary folder, REST and DICOM on free ports, no plugins."""

    def __init__(self, folder, node_port: int):
        self.folder, self.http, self.dicom = folder, free_port(), free_port()
        config = {"Name": "segrap-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "Plugins": [],
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  # only the node, from this machine, may store into it
                  "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
                  "DicomModalities": {"segrap": ["SEGRAP", "127.0.0.1", node_port]}}
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process = None

    def start(self) -> "Orthanc":
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([require("Orthanc"), str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_until(self._answers, 60, "Orthanc's REST API")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.process.returncode}: {(self.folder / 'orthanc.log').read_text()}")
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: bytes):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            stop_process_tree(self.process, grace_s=30)
        self.log.close()


@pytest.fixture
def orthanc_factory(tmp_path):
    started = []

    def make(node_port: int) -> Orthanc:
        (tmp_path / "orthanc").mkdir()
        server = Orthanc(tmp_path / "orthanc", node_port)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close()


def test_orthanc_sends_a_stored_study_and_the_rtstruct_lands_in_that_study(tmp_path, phantom_studies, node_factory,
                                                                          orthanc_factory):
    require("Orthanc")
    study = phantom_studies[1]
    port = free_port()
    orthanc = orthanc_factory(port)
    node = node_factory(tmp_path / "spool", port, "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom}",
                        "--allow-ae", "ORTHANC", "--settle", "2")
    study_id = None
    for path in sorted([*study.ct_dir.glob("*.dcm"), *study.contrast_dir.glob("*.dcm")]):
        study_id = orthanc.post("/instances", path.read_bytes())["ParentStudy"]
    job = orthanc.post("/modalities/segrap/store", json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
    assert job["InstancesCount"] == 96 and job["FailedInstancesCount"] == 0

    def rtstruct_series():
        found = [s for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") ==
                 "RTSTRUCT"]
        return found

    series = wait_until(rtstruct_series, 300, "the RTSTRUCT in Orthanc's study", interval=1)
    assert len(series) == 1 and len(series[0]["Instances"]) == 1
    data = orthanc.get(f"/instances/{series[0]['Instances'][0]}/file")
    path = tmp_path / "rtstruct.dcm"
    path.write_bytes(data)
    rtstruct = pydicom.dcmread(path)
    assert str(rtstruct.StudyInstanceUID) == study.study_uid
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert str(referenced.FrameOfReferenceUID) == study.frame_of_reference_uid
    cts = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.ct_dir.glob("*.dcm")}
    images = referenced.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in images} == cts
    assert node.terminate() == 0
