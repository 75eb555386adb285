"""Issue 31: the README's three example runs (NIfTI, DICOM -> RTSTRUCT, a cohort) work as written, each in a fresh
folder, and leave what the README says they leave."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Three example runs"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)


def test_the_readme_has_three_example_runs():
    assert len(_examples()) == 3


@pytest.mark.parametrize("number", [0, 1, 2], ids=["nifti", "dicom-rtstruct", "cohort"])
def test_a_readme_example_runs_as_written(number, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGRAP_HOME", str(tmp_path / "home"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-e", "-c", _examples()[number]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if number == 0:
        assert {"segrap_0000.seg.nrrd", "segrap_0000.provenance.json", "segrap_0000_structures",
                "segrap_0000_oar_4d.mha", "segrap_0000_gtv_4d.mha"} == {p.name for p in (tmp_path / "result").iterdir()}
        assert (tmp_path / "result-evaluation" / "report.md").is_file()
    elif number == 1:
        assert len(list((tmp_path / "rt").glob("study-*_RTSTRUCT.dcm"))) == 1
        assert "1 case(s)" in proc.stdout  # the truth matched the run's case id
    else:
        assert sorted(p.name for p in (tmp_path / "cohort-results").iterdir()) == ["segrap_0000", "segrap_0001"]
        assert "2 case(s)" in proc.stdout
