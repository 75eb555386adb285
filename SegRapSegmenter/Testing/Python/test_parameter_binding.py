"""Contract: every widget the .ui binds by SlicerParameterName has a Slicer GUI connector in 5.10 and 5.12.

Slicer's parameter node wrapper builds a connector for each bound widget before it connects any
(Base/Python/slicer/parameterNodeWrapper/wrapper.py v5.10.0:199-202), so one unsupported
(widget class, field type) pair makes ``connectParametersToGui`` raise and leaves the whole panel
unbound. The table below is what Slicer's connectors accept; each row cites the ``canRepresent``
(and, for combo boxes of plain values, the ``create`` check) in
Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, which is the same file at tags v5.10.0
and v5.12.0 (``git diff v5.10.0 v5.12.0`` of it is empty), so one line number serves both.
Connectors compare ``type(widget)`` exactly: a subclass is not accepted. Standard library only.
"""

from __future__ import annotations

import ast
import unittest
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
PARAMETERS_FILE = MODULE_DIR / "SegRapSegmenterLib" / "slicer_bridge" / "parameters.py"  # the parameter node class
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegRapSegmenter.ui"
PARAMETER_NODE_CLASS = "SegRapSegmenterParameterNode"
HAND_SYNCED_NAME = "HAND_SYNCED"  # module-level dict: field -> widget the panel keeps in step itself

PATH_TYPES = ("pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
              "pathlib.PurePosixPath", "pathlib.PureWindowsPath")


@dataclass(frozen=True)
class Connector:
    """One Slicer GUI connector: the widget classes and field types it takes, and where it is defined."""

    name: str
    widgets: tuple[str, ...]
    types: tuple[str, ...]  # "node" = a vtkMRML*Node class
    source: str  # guiConnectors.py line(s), v5.10.0 and v5.12.0
    requires: str | None = None  # an annotation the connector insists on (create raises without it)


CONNECTORS = (
    Connector("QCheckBoxToBoolConnector", ("QCheckBox", "ctkCheckBox"), ("bool",), "guiConnectors.py:165"),
    Connector("QCheckablePushButtonToBoolConnector", ("QPushButton",), ("bool",), "guiConnectors.py:198"),
    Connector("ctkCheckablePushButtonToBoolConnector", ("ctkCheckablePushButton",), ("bool",), "guiConnectors.py:234"),
    Connector("QSliderOrSpinBoxToIntConnector", ("QSlider", "QSpinBox"), ("int",), "guiConnectors.py:279"),
    Connector("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
              ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
               "qMRMLSpinBox"), ("float", "int"), "guiConnectors.py:343-345"),
    Connector("QComboBoxToStringableConnector", ("QComboBox", "ctkComboBox"), ("int", "float", "str", "bool"),
              "guiConnectors.py:421-423 (Choice required: create raises at :429-431)", requires="Choice"),
    Connector("QLineEditToStrConnector", ("QLineEdit",), ("str",), "guiConnectors.py:518"),
    Connector("QLabelToStrConnector", ("QLabel",), ("str",), "guiConnectors.py:554"),
    Connector("QTextEditPlainTextToStrConnector", ("QTextEdit",), ("str",), "guiConnectors.py:587"),
    Connector("ctkRangeWidgetToRangeConnector", ("ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"),
              ("FloatRange",), "guiConnectors.py:619"),
    Connector("ctkPathLineEditToPathConnector", ("ctkPathLineEdit",), PATH_TYPES, "guiConnectors.py:676-679"),
    Connector("ctkDirectoryButtonToPathConnector", ("ctkDirectoryButton",), PATH_TYPES, "guiConnectors.py:712-715"),
    Connector("qMRMLNodeComboBoxToNodeConnector", ("qMRMLNodeComboBox",), ("node",), "guiConnectors.py:748"),
    Connector("ctkColorPickerButtonToQColorConnector", ("ctkColorPickerButton",), ("qt.QColor",),
              "guiConnectors.py:781"),
)
# Enum fields on combo boxes (guiConnectors.py:469) are not listed: the module has no Enum fields.


@dataclass(frozen=True)
class Field:
    """A parameter node field as declared: its base type, the annotations on it, and its default (source text)."""

    name: str
    type: str
    annotations: tuple[str, ...]
    choices: tuple | None
    default: object


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError(ast.dump(node))


def _base_type(node: ast.expr) -> str:
    name = _dotted(node)
    last = name.rsplit(".", 1)[-1]
    if last.startswith("vtkMRML") and last.endswith("Node"):
        return "node"
    if name in ("Path", "PurePath", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
        return f"pathlib.{name}"
    return name


def parameter_fields(source: str, class_name: str = PARAMETER_NODE_CLASS) -> dict[str, Field]:
    """The annotated fields of the parameter node class in a module's source."""
    tree = ast.parse(source)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise AssertionError(f"no class {class_name}")
    fields = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        ann, extras, choices = stmt.annotation, (), None
        if isinstance(ann, ast.Subscript) and _dotted(ann.value).rsplit(".", 1)[-1] == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            ann, rest = elts[0], elts[1:]
            extras = tuple(_dotted(e.func).rsplit(".", 1)[-1] for e in rest if isinstance(e, ast.Call))
            for e in rest:
                if isinstance(e, ast.Call) and _dotted(e.func).rsplit(".", 1)[-1] == "Choice" and e.args:
                    choices = tuple(ast.literal_eval(e.args[0]))
        default = ast.literal_eval(stmt.value) if stmt.value is not None else None
        fields[stmt.target.id] = Field(stmt.target.id, _base_type(ann), extras, choices, default)
    return fields


def hand_synced(source: str) -> dict[str, str]:
    """The parameters module's HAND_SYNCED mapping (field -> widget name)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == HAND_SYNCED_NAME
                                                for t in node.targets):
            return dict(ast.literal_eval(node.value))
    return {}


def bound_widgets(ui_text: str) -> list[tuple[str, str, str]]:
    """(parameter name, widget class, widget name) of every widget with a SlicerParameterName property."""
    found = []
    for widget in ET.fromstring(ui_text).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found.append((prop.findtext("string") or "", widget.get("class"), widget.get("name")))
    return found


def connector_for(widget_class: str, field: Field) -> Connector | None:
    """The connector Slicer would build for this pair, None when there is none (or it would raise)."""
    for connector in CONNECTORS:
        if widget_class in connector.widgets and field.type in connector.types:
            if connector.requires and connector.requires not in field.annotations:
                return None
            return connector
    return None


def binding_problems(ui_text: str, module_source: str) -> list[str]:
    """Every reason the .ui's bindings would fail in Slicer 5.10/5.12 (empty when all bind)."""
    fields = parameter_fields(module_source)
    problems = []
    seen = set()
    for name, widget_class, widget_name in bound_widgets(ui_text):
        if name in seen:
            problems.append(f"{name}: bound to two widgets")
        seen.add(name)
        field = fields.get(name)
        if field is None:
            problems.append(f"{widget_name} ({widget_class}) is bound to {name!r}, which is not a parameter node field")
            continue
        if connector_for(widget_class, field) is None:
            needs = [c for c in CONNECTORS if widget_class in c.widgets]
            hint = "; ".join(f"{c.name} takes {'/'.join(c.types)}" + (f" with {c.requires}" if c.requires else "")
                             + f" ({c.source})" for c in needs) or "no connector takes this widget class"
            problems.append(f"{widget_name} ({widget_class}) <-> {name}: {field.type} "
                            f"{list(field.annotations) or ''}: no Slicer connector; {hint}")
        if field.choices is not None and field.default not in field.choices:
            problems.append(f"{name}: default {field.default!r} is not one of its choices {field.choices}")
    return problems


class ParameterBindingContractTest(unittest.TestCase):
    """The module's .ui and parameter node, against the table of Slicer's connectors."""

    @classmethod
    def setUpClass(cls):
        cls.ui = UI_FILE.read_text(encoding="utf-8")
        cls.source = PARAMETERS_FILE.read_text(encoding="utf-8")

    def test_every_bound_widget_has_a_connector_in_slicer_5_10_and_5_12(self):
        self.assertGreaterEqual(len(bound_widgets(self.ui)), 8)
        self.assertEqual(binding_problems(self.ui, self.source), [])

    def test_every_field_is_bound_or_kept_in_step_by_hand(self):
        fields = set(parameter_fields(self.source))
        bound = {name for name, _, _ in bound_widgets(self.ui)}
        manual = hand_synced(self.source)
        self.assertEqual(bound & set(manual), set(), "a field bound by Slicer and by hand")
        self.assertEqual(fields, bound | set(manual))
        names = {w.get("name"): w.get("class") for w in ET.fromstring(self.ui).iter("widget")}
        for field, widget in manual.items():
            self.assertIn(widget, names, f"{field} is kept in step with {widget}, which the .ui lacks")

    def test_choice_fields_list_the_combo_items_of_the_ui(self):
        fields = parameter_fields(self.source)
        root = ET.fromstring(self.ui)
        for name, widget_class, widget_name in bound_widgets(self.ui):
            field = fields[name]
            if field.choices is None:
                continue
            widget = next(w for w in root.iter("widget") if w.get("name") == widget_name)
            items = [item.findtext("property/string") for item in widget.findall("item")]
            self.assertEqual(tuple(items), field.choices, f"{widget_name}: the connector refills it with the choices")

    def test_the_check_flags_pairs_slicer_cannot_connect(self):
        ui = """<ui><widget class="qMRMLWidget" name="w">
          <widget class="QComboBox" name="combo"><property name="SlicerParameterName"><string>plain</string></property></widget>
          <widget class="ctkPathLineEdit" name="path"><property name="SlicerParameterName"><string>exe</string></property></widget>
          <widget class="QComboBox" name="choice"><property name="SlicerParameterName"><string>device</string></property></widget>
          <widget class="QCheckBox" name="box"><property name="SlicerParameterName"><string>ghost</string></property></widget>
          <widget class="QSpinBox" name="spin"><property name="SlicerParameterName"><string>ratio</string></property></widget>
        </widget></ui>"""
        source = ("class SegRapSegmenterParameterNode:\n"
                  "    plain: str = ''\n"
                  "    exe: str = ''\n"
                  "    device: Annotated[str, Choice(['auto', 'cpu'])] = 'cuda'\n"
                  "    ratio: float = 0.5\n")
        problems = binding_problems(ui, source)
        self.assertEqual(len(problems), 5, problems)
        self.assertIn("combo (QComboBox) <-> plain", problems[0])
        self.assertIn("with Choice", problems[0])
        self.assertIn("path (ctkPathLineEdit) <-> exe", problems[1])
        self.assertIn("pathlib.Path", problems[1])
        self.assertIn("device: default 'cuda'", problems[2])
        self.assertIn("'ghost', which is not a parameter node field", problems[3])
        self.assertIn("spin (QSpinBox) <-> ratio: float", problems[4])

    def test_the_check_accepts_what_slicer_connects(self):
        ui = """<ui><widget class="qMRMLWidget" name="w">
          <widget class="QComboBox" name="c"><property name="SlicerParameterName"><string>device</string></property></widget>
          <widget class="ctkPathLineEdit" name="p"><property name="SlicerParameterName"><string>exe</string></property></widget>
          <widget class="qMRMLNodeComboBox" name="n"><property name="SlicerParameterName"><string>ct</string></property></widget>
          <widget class="ctkSliderWidget" name="s"><property name="SlicerParameterName"><string>step</string></property></widget>
        </widget></ui>"""
        source = ("class SegRapSegmenterParameterNode:\n"
                  "    device: Annotated[str, Choice(['auto', 'cpu'])] = 'auto'\n"
                  "    exe: pathlib.Path\n"
                  "    ct: slicer.vtkMRMLScalarVolumeNode\n"
                  "    step: Annotated[float, WithinRange(0, 1)] = 0.5\n")
        self.assertEqual(binding_problems(ui, source), [])


if __name__ == "__main__":
    unittest.main()
