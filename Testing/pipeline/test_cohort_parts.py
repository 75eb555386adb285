"""Issue 29, item 3: `segrap segment --input-dir --part` on a cluster scheduler. The parts of a cohort never overlap and
together cover it; `--part auto` reads a Slurm array task's or a Kubernetes Indexed Job's variables and refuses what
it cannot number; the example sbatch script and Job manifest in docs/cluster/ are well formed and agree with it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from SegRapSegmenterLib import cli
from SegRapSegmenterLib.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "docs" / "cluster" / "segrap-cohort.sbatch"
JOB = REPO / "docs" / "cluster" / "segrap-cohort-job.yaml"


def _cohort(root: Path, count: int) -> Path:
    """A cohort folder of ``count`` cases (empty image files: choosing the cases does not read them)."""
    for i in range(1, count + 1):
        (root / f"segrap_{i:04d}").mkdir(parents=True)
        (root / f"segrap_{i:04d}" / "image.nii.gz").write_bytes(b"")
    return root


def _slurm(task: int, first: int, last: int, count: int, step: int | None = None) -> dict[str, str]:
    """The array variables Slurm sets in one task of sbatch --array=first-last[:step]."""
    env = {"SLURM_JOB_ID": "4711", "SLURM_ARRAY_JOB_ID": "4700", "SLURM_ARRAY_TASK_ID": str(task),
           "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(last), "SLURM_ARRAY_TASK_COUNT": str(count)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


def _assert_partition(parts: list[list], everything: list) -> None:
    """No case in two parts, and every case in one."""
    ids = [case[0] for part in parts for case in part]
    assert len(ids) == len(set(ids)), "a case is in two parts"
    assert sorted(ids) == sorted(case[0] for case in everything), "a case is in no part"


@pytest.mark.parametrize("cases", [1, 5, 12])
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 16])
def test_the_parts_of_a_cohort_never_overlap_and_cover_it(tmp_path, cases, parts):
    root = _cohort(tmp_path / "in", cases)
    everything = cli._cohort_cases(root, "1/1")
    assert len(everything) == cases
    by_k = [cli._cohort_cases(root, f"{k}/{parts}") for k in range(1, parts + 1)]
    _assert_partition(by_k, everything)
    # the same cut, numbered by the schedulers: a Slurm array from 0, one from 1, one from 10 with step 5,
    # and a Kubernetes Indexed Job (completion indexes from 0)
    for first, step in ((0, 1), (1, 1), (10, 5)):
        last = first + step * (parts - 1)
        slurm = [cli._cohort_cases(root, "auto", _slurm(first + step * i, first, last, parts, step))
                 for i in range(parts)]
        assert slurm == by_k
    kubernetes = [cli._cohort_cases(root, f"auto/{parts}", {"JOB_COMPLETION_INDEX": str(i)}) for i in range(parts)]
    assert kubernetes == by_k
    if parts > cases:  # more parts than cases: the last parts hold none, and none is held twice
        assert by_k[-1] == [] and sum(map(len, by_k)) == cases


def test_slurm_array_task_ids_map_to_k_of_n_from_one():
    assert cli.cohort_part("auto", _slurm(0, 0, 7, 8)) == cli.CohortPart(1, 8, "Slurm array task 0 of 0..7")
    assert cli.cohort_part("auto", _slurm(7, 0, 7, 8)).k == 8
    assert (cli.cohort_part("auto", _slurm(1, 1, 8, 8)).k, cli.cohort_part("auto", _slurm(8, 1, 8, 8)).k) == (1, 8)
    stepped = cli.cohort_part("auto", _slurm(15, 1, 15, 8, step=2))  # --array=1-15:2 -> 1, 3, ..., 15
    assert (stepped.k, stepped.n) == (8, 8) and "step 2" in stepped.source
    assert cli.cohort_part("auto/8", _slurm(3, 0, 7, 8)).k == 4  # auto/N under Slurm: N must agree


def test_a_kubernetes_completion_index_maps_to_k_of_n_from_one():
    assert cli.cohort_part("auto/4", {"JOB_COMPLETION_INDEX": "0"}) == \
        cli.CohortPart(1, 4, "Kubernetes completion index 0 of 0..3")
    assert cli.cohort_part("auto/4", {"JOB_COMPLETION_INDEX": "3"}).k == 4


def test_explicit_k_of_n_ignores_the_schedulers_variables():
    assert cli.cohort_part("2/3", _slurm(0, 0, 7, 8) | {"JOB_COMPLETION_INDEX": "5"}) == cli.CohortPart(2, 3)


@pytest.mark.parametrize("text, environ, says", [
    ("auto", {}, "neither SLURM_ARRAY_TASK_ID"),
    ("auto", {"SLURM_JOB_ID": "12"}, "Slurm job 12, but not an array task"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3"},
     "SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_MAX, SLURM_ARRAY_TASK_COUNT is not, so"),
    ("auto", _slurm(3, 0, 7, 8) | {"SLURM_ARRAY_TASK_ID": "three"}, "SLURM_ARRAY_TASK_ID='three' is not a whole"),
    ("auto", _slurm(3, 1, 7, 4), "not one evenly spaced range"),  # --array=1,3,5,7 without a step
    ("auto", _slurm(9, 0, 7, 8), "not one evenly spaced range"),  # a task outside its own array
    ("auto", _slurm(4, 1, 7, 4, step=2), "not one evenly spaced range"),  # an index between the steps
    ("auto", _slurm(2, 0, 7, 8, step=0), "not one evenly spaced range"),
    ("auto/4", _slurm(2, 0, 7, 8), "has 8 tasks (SLURM_ARRAY_TASK_COUNT), not 4"),
    ("auto", {"JOB_COMPLETION_INDEX": "2"}, "give --part auto/N with N = the Job's spec.completions"),
    ("auto/4", {"JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX=4 is outside 0..3"),
    ("auto/4", {"JOB_COMPLETION_INDEX": "-1"}, "outside 0..3"),
    ("auto/4", {"JOB_COMPLETION_INDEX": ""}, "JOB_COMPLETION_INDEX='' is not a whole number"),
    ("auto/0", {"JOB_COMPLETION_INDEX": "0"}, "N must be a whole number of at least 1"),
    ("auto/4", _slurm(0, 0, 3, 4) | {"JOB_COMPLETION_INDEX": "0"}, "both SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX"),
    ("0/4", {}, "1 <= K <= N"),  # K/N counts from 1: a 0-based index given as K is refused, not shifted
    ("5/4", {}, "1 <= K <= N"),
    ("automatic", {"JOB_COMPLETION_INDEX": "0"}, "auto or auto/N"),
])
def test_missing_or_inconsistent_scheduler_variables_are_refused(text, environ, says):
    with pytest.raises(InputError) as refused:
        cli.cohort_part(text, environ)
    assert says in str(refused.value)


def test_segment_refuses_part_auto_outside_a_scheduler_with_exit_3(tmp_path, monkeypatch, capsys):
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    root = _cohort(tmp_path / "in", 3)
    rc = cli.main(["segment", "--input-dir", str(root), "--part", "auto", "--out", str(tmp_path / "out")])
    assert rc == cli.EXIT_INPUT == 3
    assert "neither SLURM_ARRAY_TASK_ID" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_part_with_no_cases_says_so_and_succeeds(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    root = _cohort(tmp_path / "in", 3)
    rc = cli.main(["segment", "--input-dir", str(root), "--part", "auto/5", "--out", str(tmp_path / "out"),
                   "--bundle", "demo"])
    assert rc == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "part 5/5 (Kubernetes completion index 4 of 0..4): 0 of the cohort's 3 cases; nothing to do" in err


def test_a_task_rerun_skips_its_finished_cases_and_names_its_part(tmp_path, monkeypatch, capsys):
    for name, value in _slurm(11, 10, 11, 2).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    root = _cohort(tmp_path / "in", 4)
    for name in ("segrap_0002", "segrap_0004"):  # part 2/2's cases, finished by an earlier run of this task
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / f"{name}.provenance.json").write_text("{}")
    rc = cli.main(["segment", "--input-dir", str(root), "--part", "auto", "--out", str(tmp_path / "out"),
                   "--bundle", "demo"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_OK
    assert "part 2/2 (Slurm array task 11 of 10..11): 2 of the cohort's 4 cases" in err
    assert "segrap_0002: already done, skipped" in err and "segrap_0004: already done, skipped" in err
    assert "segrap_0001" not in err and "segrap_0003" not in err


# ---- the examples in docs/cluster/ ----------------------------------------------------------------------


def _segrap_arguments(command: list[str]) -> list[str]:
    """The arguments after `segrap segment` in an example's command line."""
    start = command.index("segment")
    assert command[start - 1].lower().endswith("segrap"), command
    return command[start:]


def test_the_sbatch_example_is_valid_bash_and_asks_for_one_gpu_per_array_task():
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the sbatch script"
    proc = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", text, flags=re.M))
    assert directives["gres"] == "gpu:1"
    assert re.fullmatch(r"\d+-\d+(%\d+)?", directives["array"]), "an evenly spaced range, as --part auto needs"
    command_line = next(line for line in text.replace("\\\n", " ").splitlines()
                        if re.search(r"segrap\"?\s+segment\b", line, flags=re.I) and not line.lstrip().startswith("#"))
    arguments = _segrap_arguments(shlex.split(command_line))
    assert arguments[arguments.index("--part") + 1] == "auto"
    assert {"--input-dir", "--out"} <= set(arguments)
    assert not any(a.startswith("--device=cuda:") or a.startswith("cuda:") for a in arguments), \
        "the task sees only its own GPU (CUDA_VISIBLE_DEVICES); a fixed cuda:N would be wrong"


def test_the_job_manifest_is_an_indexed_job_whose_completions_match_its_part():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifest (not a dependency of segrap)")
    job = yaml.safe_load(JOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    completions, parallelism = spec["completions"], spec["parallelism"]
    assert isinstance(completions, int) and isinstance(parallelism, int) and 1 <= parallelism <= completions
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    arguments = _segrap_arguments(container["command"] + container.get("args", []))
    assert arguments[arguments.index("--part") + 1] == f"auto/{completions}"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    input_dir, out = arguments[arguments.index("--input-dir") + 1], arguments[arguments.index("--out") + 1]
    assert any(input_dir.startswith(m) for m in mounts) and any(out.startswith(m) for m in mounts)
    # and the pod's part numbering works with what the Job gives the pod
    assert cli.cohort_part(f"auto/{completions}", {"JOB_COMPLETION_INDEX": str(completions - 1)}).k == completions


def _done_cohort(root: Path, count: int) -> tuple[Path, Path]:
    """A cohort whose every case is finished in the output folder: running it only chooses and skips cases."""
    cohort = _cohort(root / "cohort", count)
    for i in range(1, count + 1):
        (root / "contours" / f"segrap_{i:04d}").mkdir(parents=True)
        (root / "contours" / f"segrap_{i:04d}" / f"segrap_{i:04d}.provenance.json").write_text("{}")
    return cohort, root / "contours"


def test_the_sbatch_example_run_as_an_array_task_takes_that_tasks_part(tmp_path):
    cohort, out = _done_cohort(tmp_path, 5)
    segrap = Path(sys.executable).with_name("segrap")
    assert segrap.is_file(), f"the segrap command beside {sys.executable}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "JOB_COMPLETION_INDEX"}
    env |= _slurm(5, 4, 5, 2) | {"SLURM_CPUS_PER_TASK": "2", "CUDA_VISIBLE_DEVICES": "0", "COHORT": str(cohort),
                                  "OUT": str(out), "SEGRAP": str(segrap), "BUNDLE": "demo"}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "part 2/2 (Slurm array task 5 of 4..5): 2 of the cohort's 5 cases" in proc.stderr
    skipped = re.findall(r"(segrap_\d+): already done, skipped", proc.stderr)
    assert skipped == ["segrap_0002", "segrap_0004"]


def test_the_job_manifests_command_runs_as_a_pod_with_its_completion_index(tmp_path, monkeypatch, capsys):
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifest (not a dependency of segrap)")
    (container,) = yaml.safe_load(JOB.read_text())["spec"]["template"]["spec"]["containers"]
    cohort, out = _done_cohort(tmp_path / "shared", 5)
    arguments = [a.replace("/shared/cohort", str(cohort)).replace("/shared/contours", str(out))
                 for a in _segrap_arguments(container["command"] + container["args"])]
    arguments[arguments.index("--bundle") + 1] = "demo"
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert cli.main(arguments) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "part 1/8 (Kubernetes completion index 0 of 0..7): 1 of the cohort's 5 cases" in err
    assert re.findall(r"(segrap_\d+): already done, skipped", err) == ["segrap_0001"]
