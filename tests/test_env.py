"""d2_detr.env: the torch version check at import, and the optional extras (export, panoptic) with the error that
names the extra when a feature needs a missing one."""
import ast
import re
import os
import subprocess
import sys

import pytest
import torch

from d2_detr.env import EXTRAS, MIN_TORCH, MissingExtraError, check_torch_version, import_optional

from .conftest import REPO_DIR, TESTS_DIR, load_config


@pytest.mark.parametrize("version", ["2.5.0", "2.5.0a0+git1234", "2.14.1+cu130", "3.0.0", torch.__version__])
def test_supported_torch_versions_pass(version):
    check_torch_version(version)


@pytest.mark.parametrize("version", ["2.4.1", "2.4.0+cpu", "1.13.1", "1.10.0", "unknown"])
def test_older_torch_is_refused_with_what_to_install(version):
    minimum = ".".join(map(str, MIN_TORCH))
    expected = rf"needs torch >= {minimum}, found torch {re.escape(version)}.*pip install -U 'torch>={minimum}' "
    with pytest.raises(ImportError, match=expected + "'torchvision>="):
        check_torch_version(version)


def test_import_checks_the_torch_version():
    code = "import torch; torch.__version__ = '2.3.1'; import d2_detr"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True)
    assert result.returncode != 0
    assert "needs torch >= 2.5, found torch 2.3.1" in result.stderr


def _setup_py_call() -> ast.Call:
    tree = ast.parse(open(os.path.join(REPO_DIR, "setup.py")).read())
    calls = (node for node in ast.walk(tree) if isinstance(node, ast.Call))
    return next(call for call in calls if getattr(call.func, "id", "") == "setup")


def test_setup_py_states_the_minimum_torch_and_the_extras():
    keywords = {k.arg: ast.literal_eval(k.value) for k in _setup_py_call().keywords
                if k.arg in ("install_requires", "extras_require")}
    assert f"torch>={'.'.join(map(str, MIN_TORCH))}" in keywords["install_requires"]
    for extra, modules in EXTRAS.items():
        assert sorted(keywords["extras_require"][extra]) == sorted(modules.values())
    optional = {requirement for modules in EXTRAS.values() for requirement in modules.values()}
    assert not optional & set(keywords["install_requires"])


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingExtraError, match=r"Checking needs the module 'onnxruntime' \(onnxruntime>=1\.14\).*"
                                                r"pip install 'd2-detr\[export\]'.*pip install -e '\.\[export\]'"):
        import_optional("onnxruntime", "export", "Checking")
    assert import_optional("json", "export", "Checking") is sys.modules["json"]


def test_onnx_export_without_the_extra_fails_before_tracing(monkeypatch, tmp_path):
    from detectron2.modeling import build_model

    from d2_detr.export import export_model, load_exported

    monkeypatch.setitem(sys.modules, "onnx", None)
    model = build_model(load_config())
    with pytest.raises(MissingExtraError, match=r"ONNX export needs the module 'onnx'.*d2-detr\[export\]"):
        export_model(model, "onnx", str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"'onnxruntime'.*d2-detr\[export\]"):
        load_exported(str(tmp_path / "model.onnx"))


def test_export_tool_without_the_extra_says_which_extra(tmp_path):
    code = ("import runpy, sys; sys.modules['onnxruntime'] = None; "
            "sys.argv = ['export_model.py', '--config-file', sys.argv[1], '--format', 'onnx', "
            "'--output', sys.argv[2]]; "
            "runpy.run_path('tools/export_model.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, os.path.join(TESTS_DIR, "configs", "tiny.yaml"),
                             str(tmp_path / "out")], cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "export_model.py: error: ONNX export and its verification needs the module 'onnxruntime'" in result.stderr
    assert "pip install 'd2-detr[export]'" in result.stderr and "Traceback" not in result.stderr


def test_panoptic_training_without_the_extra_fails_at_start_up(monkeypatch):
    """Not after training, when the final evaluation would need panopticapi."""
    from d2_detr.engine import DetrTrainer

    monkeypatch.setitem(sys.modules, "panopticapi", None)
    cfg = load_config(os.path.join(TESTS_DIR, "configs", "tiny_panoptic.yaml"))
    with pytest.raises(MissingExtraError, match=r"Panoptic quality evaluation of 'synthetic_panoptic_val_small'.*"
                                                r"panopticapi-lite.*d2-detr\[panoptic\]"):
        DetrTrainer(cfg)
    with pytest.raises(MissingExtraError, match=r"d2-detr\[panoptic\]"):
        DetrTrainer.build_evaluator(cfg, "synthetic_panoptic_val_small")
