"""The module's self-test (SegRapSegmenterLib.slicer_bridge.selftest) as Slicer's runners call it.

``ctest py_SegRapSegmenter`` loads the module file with ``unittest.TestLoader().loadTestsFromName``
(Base/Python/slicer/testing.py v5.10.0:25, v5.12.0:25) and calls each ``test_*`` method itself, so a
test that needs torch must skip itself; Reload and Test calls ``runTest`` after ``setUp`` clears the
scene, and the parameter node is a singleton that survives the scene's ``Clear()``. Runs headless
with slicer-core's real MRML classes and inside Slicer.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

import slicer

MODULE_DIR = Path(__file__).resolve().parents[2]
SELFTEST_FILE = MODULE_DIR / "SegRapSegmenterLib" / "slicer_bridge" / "selftest.py"
MODULE_NAME = "SegRapSegmenter"


def run_blocked(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails, as in a stock Slicer."""
    prelude = ("import sys, importlib.util\n"
               f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
               "_find = importlib.util.find_spec\n"  # find_spec of a None entry raises ValueError: say "missing"
               f"importlib.util.find_spec = lambda name, *a: None if name in {blocked!r} else _find(name, *a)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, env=env)


class InferenceSkipTest(unittest.TestCase):
    """The inference part skips itself, with the reason, when it is called as a test method."""

    def test_the_test_method_skips_itself_without_torch(self):
        proc = run_blocked(("torch", "nnunetv2", "nrrd"), (
            "import json, unittest\n"
            "from SegRapSegmenterLib.slicer_bridge.selftest import SelfTests\n"
            "class T(SelfTests, unittest.TestCase):\n"
            "    def delayDisplay(self, message):\n"
            "        raise AssertionError('ran past the skip: ' + message)\n"
            "result = unittest.TestResult()\n"
            "T('test_demo_bundle_end_to_end').run(result)\n"
            "print(json.dumps({'skipped': [r for _, r in result.skipped], 'errors': [e for _, e in result.errors],"
            " 'failures': [f for _, f in result.failures]}))\n"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        outcome = json.loads(proc.stdout.splitlines()[-1])
        self.assertEqual(outcome["errors"] + outcome["failures"], [])
        self.assertEqual(len(outcome["skipped"]), 1)
        self.assertIn("torch, nnunetv2, nrrd not importable", outcome["skipped"][0])

    def test_reload_and_test_runs_every_test_method_and_reports_skips(self):
        from SegRapSegmenterLib.slicer_bridge import selftest

        methods = {n for n in dir(selftest.SelfTests) if n.startswith("test_")}
        self.assertEqual(set(selftest.SELF_TESTS), methods)
        calls = []

        class Recorder(selftest.SelfTests):
            def setUp(self):
                calls.append("setUp")

            def delayDisplay(self, message):
                calls.append(message)

        for name in selftest.SELF_TESTS:  # stand-ins that record the order; the last one skips
            setattr(Recorder, name, lambda self, n=name: (calls.append(n), n == selftest.SELF_TESTS[-1]
                                                          and unittest.TestCase.skipTest(self, "no torch")))
        Recorder().run_all()
        expected = [x for n in selftest.SELF_TESTS for x in ("setUp", n)] + ["Skipped: no torch"]
        self.assertEqual(calls, expected)


class ParameterNodeAcrossCloseSceneTest(unittest.TestCase):
    """What the self-test expects after ``slicer.mrmlScene.Clear()`` (Close Scene), on real MRML classes."""

    def setUp(self):
        if hasattr(slicer, "app"):
            self.skipTest("clears a scene of its own; inside Slicer the self-test checks the panel itself")
        from SegRapSegmenterLib.slicer_bridge import scene

        self.scene = scene.headless_scene()

    def test_the_singleton_parameter_node_survives_clear_reset_to_its_defaults(self):
        # as ScriptedLoadableModuleLogic.createParameterNode makes it (Base/Python/slicer/ScriptedLoadableModule.py
        # v5.10.0:345-363, SetSingletonTag at :359; the same lines at v5.12.0)
        node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        self.scene.AddNode(node)
        node.SetAttribute("SegRapSegmenter.SettingsApplied", "1")
        node.SetParameter("mirror", "true")
        volume = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
        node.SetNodeReferenceID("ctVolume", volume.GetID())
        events = []
        self.scene.AddObserver(self.scene.StartCloseEvent, lambda *a: events.append("start close"))
        self.scene.AddObserver(self.scene.EndCloseEvent, lambda *a: events.append("end close"))

        self.scene.Clear()  # vtkMRMLScene::Clear(0): v5.10.0 Libs/MRML/Core/vtkMRMLScene.cxx:348-384

        found = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        self.assertIs(found, node, "the same node: the panel finds it again, not a new one")
        self.assertEqual(events, ["start close", "end close"])  # the panel lets go and binds again
        self.assertIsNone(node.GetAttribute("SegRapSegmenter.SettingsApplied"))  # so the settings are applied again
        self.assertIsNone(node.GetAttribute("ModuleName"))  # getParameterNode restores it (ScriptedLoadableModule.py :318-320)
        self.assertEqual(node.GetParameter("mirror"), "")
        self.assertIsNone(node.GetNodeReferenceID("ctVolume"))
        self.assertEqual(self.scene.GetNumberOfNodes(), 1)

    def test_the_self_test_expects_the_same_node_after_clear(self):
        tree = ast.parse(SELFTEST_FILE.read_text(encoding="utf-8"))
        method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                      and n.name == "test_panel_binds_the_parameter_node")
        asserts = [ast.unparse(n) for n in ast.walk(method) if isinstance(n, ast.Call)
                   and isinstance(n.func, ast.Attribute) and n.func.attr in ("assertIs", "assertIsNot")]
        self.assertIn("self.assertIs(panel._parameterNode.parameterNode, before)", asserts)
        self.assertFalse([a for a in asserts if a.startswith("self.assertIsNot(") and "before" in a], asserts)


if __name__ == "__main__":
    unittest.main()
