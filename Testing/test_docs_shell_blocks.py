"""Issue 31: every shell block in README.md and docs/*.md can be pasted into bash as it is (``bash -n`` parses it),
and a comment stays a comment: no block line is an option or a word left over from a hard-wrapped command."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell)[ \t]*\n(.*?)^```", re.M | re.S)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(2)))
    return found


BLOCKS = _blocks()


def test_the_docs_have_shell_blocks():
    assert len(BLOCKS) >= 10 and any(where.startswith("README.md") for where, _ in BLOCKS)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("where,block", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_each_shell_block_parses(where, block):
    proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}: bash -n says:\n{proc.stderr}"


SHELL_WORDS = {"done", "fi", "esac", "then", "else", "do", "exit", "set", "wait", "true", "false"}


def wrap_problems(block: str) -> list[str]:
    """Lines that look like the rest of a command or comment cut in two without a continuation backslash."""
    problems = []
    lines = block.splitlines()
    for before, line in zip([""] + lines, lines):
        prev = before.rstrip()
        text = line.strip()
        continued = prev.endswith(("\\", "|", "&&", "||", "(", "{")) or prev.split()[-1:] in (["do"], ["then"])
        if continued or not text or text.startswith("#"):
            continue
        if re.match(r"(--?[A-Za-z]|\|)", text):
            problems.append(f"{text!r} starts with an option or a pipe, after a line without a backslash")
        elif re.fullmatch(r"[A-Za-z][\w.-]*", text) and text not in SHELL_WORDS:
            problems.append(f"{text!r} is a lone word: the end of the line before it?")
        elif re.match(r"[A-Za-z_]\w*=", text) and " " not in text and prev.startswith("export ") \
                and not prev.lstrip().startswith("#"):
            problems.append(f"{text!r} is an assignment on its own line after an export: it is not exported")
        if re.search(r"\s#\s*$", prev):
            problems.append(f"{prev.strip()!r} ends with an empty comment: its text went to the next line")
    return problems


def test_the_wrap_detector_finds_the_cuts_that_parse():
    assert wrap_problems("cmd --x a   #\nDataset601_X\n")  # a comment's text became a command
    assert wrap_problems("nnUNetv2_train 601 -p\nPlans_40G\n")  # an option's value became a command
    assert wrap_problems("export A=/a B=/b\nC=/c\n")  # the third variable is no longer exported
    assert not wrap_problems("for d in a b; do\n  echo $d \\\n    --flag\ndone\nexport A=1\n")


@pytest.mark.parametrize("where,block", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_no_line_of_a_block_is_the_tail_of_a_wrapped_command(where, block):
    """A command wrapped without a trailing backslash often parses, but its second half runs as a command of its own."""
    assert wrap_problems(block) == [], where
