"""The core library's import graph follows docs/architecture.md: layers, no cycles, a small top level."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "SegRapSegmenter" / "SegRapSegmenterLib"
PACKAGE = "SegRapSegmenterLib"
DOC = ROOT / "docs" / "architecture.md"
MAX_TOP_LEVEL_MODULES = 8


def read_layers(doc: Path = DOC) -> dict[str, int]:
    """unit -> layer, from the table between the 'layers' markers of the architecture document."""
    text = doc.read_text(encoding="utf-8")
    block = re.search(r"<!-- layers: begin -->(.*?)<!-- layers: end -->", text, re.S)
    assert block, f"{doc}: no '<!-- layers: begin -->' ... '<!-- layers: end -->' table"
    layers: dict[str, int] = {}
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for unit in (u.strip() for u in cells[1].split(",")):
            assert unit not in layers, f"{doc}: unit {unit} is listed twice"
            layers[unit] = int(cells[0])
    assert layers, f"{doc}: the layer table has no rows"
    return layers


def module_names(lib: Path = LIB) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(lib.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(lib.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The package's modules an import statement names (``from a import b`` -> a.b when b is a module)."""
    known = set(known)
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                found.add(alias.name)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module if is_package else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = base + (f".{node.module}" if node.module else "")
        else:
            target = node.module or ""
        if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
            return found
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            found.add(sub if sub in known else target)
    return found


def import_graph(lib: Path = LIB) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (functions included)."""
    modules = module_names(lib)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            edges |= _imported(node, name, path.name == "__init__.py", modules)
        # importing a submodule runs its package's __init__ too, which holds no imports of its own here
        graph[name] = {e for e in edges if e != name}
    return graph


def unit_of(module: str) -> str:
    parts = module.split(".")
    return PACKAGE if len(parts) == 1 else parts[1]


def layer_violations(graph: Mapping[str, set[str]], layers: Mapping[str, int]) -> list[str]:
    """Imports that go to a higher layer, or sideways to another unit of the same layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        src = unit_of(module)
        for target in sorted(targets):
            dst = unit_of(target)
            if src == dst or dst == PACKAGE:
                continue
            if layers[dst] > layers[src]:
                problems.append(f"{module} (layer {layers[src]}) imports {target} from the higher layer {layers[dst]}")
            elif layers[dst] == layers[src]:
                problems.append(f"{module} imports {target}: {src} and {dst} are peers in layer {layers[src]}")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a list of module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --------------------------------------------------------------------------------------------
# The checks on the real package
# --------------------------------------------------------------------------------------------


def test_every_module_belongs_to_a_unit_of_the_documented_layers():
    layers = read_layers()
    units = {unit_of(m) for m in module_names()}
    assert sorted(units - set(layers)) == [], "modules outside every unit of docs/architecture.md's table"
    assert sorted(set(layers) - units) == [], "units named in docs/architecture.md that do not exist"


def test_no_import_goes_against_the_layer_order():
    assert layer_violations(import_graph(), read_layers()) == []


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_top_level_holds_at_most_eight_modules():
    top = sorted(p.stem for p in LIB.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_each_subpackage_says_what_it_holds_and_may_import():
    for init in sorted(LIB.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "may import" in doc.lower(), f"{init}: the docstring must say what it holds and may import"


def test_the_public_entry_points_keep_their_names():
    modules = module_names()
    for name in ("SegRapSegmenterLib.pipeline", "SegRapSegmenterLib.worker", "SegRapSegmenterLib.cli",
                 "SegRapSegmenterLib.runner", "SegRapSegmenterLib.slicer_bridge.logic"):
        assert name in modules, name
    from SegRapSegmenterLib.pipeline import SegmentRequest, run  # noqa: F401  (the Python API of docs/command-line.md)


# --------------------------------------------------------------------------------------------
# The checker itself finds what it must
# --------------------------------------------------------------------------------------------


def test_checker_flags_an_upward_a_sideways_import_and_a_cycle(tmp_path):
    lib = tmp_path / PACKAGE
    for rel, body in {
        "__init__.py": "", "errors.py": "from .pipeline import x\n",  # upward
        "pipeline.py": "def f():\n    from .inference import predictor\n",
        "inference/__init__.py": "", "inference/predictor.py": "from ..evaluation import metrics\n",  # sideways
        "evaluation/__init__.py": "", "evaluation/metrics.py": "from .. import errors\n",
    }.items():
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_text(body)
    graph = import_graph(lib)
    assert graph["SegRapSegmenterLib.pipeline"] == {"SegRapSegmenterLib.inference.predictor"}
    layers = {PACKAGE: 0, "errors": 0, "inference": 3, "evaluation": 3, "pipeline": 4}
    problems = layer_violations(graph, layers)
    assert any("errors imports" in p or "SegRapSegmenterLib.errors (layer 0)" in p for p in problems), problems
    assert any("peers in layer 3" in p for p in problems), problems
    # errors -> pipeline -> predictor -> metrics -> errors
    assert cycles(graph) == [sorted(["SegRapSegmenterLib.errors", "SegRapSegmenterLib.pipeline",
                                     "SegRapSegmenterLib.inference.predictor", "SegRapSegmenterLib.evaluation.metrics"])]


def test_layer_table_parser_refuses_a_unit_listed_twice(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("<!-- layers: begin -->\n| layer | units | x |\n|---|---|---|\n| 0 | errors | a |\n"
                   "| 1 | errors | b |\n<!-- layers: end -->\n")
    with pytest.raises(AssertionError, match="listed twice"):
        read_layers(doc)
