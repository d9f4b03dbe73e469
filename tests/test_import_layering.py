"""Imports inside the package point downward: a lower package never imports a higher one.

Read from the source (every ``import`` and ``from ... import`` of every module, at any depth), so an import hidden
inside a function counts too.
"""
import ast
import os
from typing import Dict, Iterator, Tuple

import pytest

from .conftest import REPO_DIR

PACKAGE_DIR = os.path.join(REPO_DIR, "d2_detr")

# Package (or module) -> the packages of d2_detr that none of its modules may import.
FORBIDDEN: Dict[str, Tuple[str, ...]] = {
    "layers": ("modeling", "engine", "data", "checkpoint", "export", "utils"),
    "checkpoint": ("engine", "export"),
    "data": ("engine", "modeling", "export"),
    # The trainer knows datasets only through Detectron2's catalogs, whatever registered them.
    "engine": ("data.synthetic", "data.synthetic_panoptic"),
    "utils/file_io.py": ("config", "layers", "modeling", "engine", "data", "checkpoint", "export", "utils"),
}


def _module_name(path: str) -> str:
    parts = os.path.relpath(path, REPO_DIR)[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: str) -> str:
    """The package that relative imports in the module at ``path`` start from."""
    module = _module_name(path)
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def _imports(path: str, package: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every d2_detr import in the file at ``path``, a module of ``package``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # "from . import x" imports the submodule x
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
        else:
            continue
        for name in names:
            if name == "d2_detr" or name.startswith("d2_detr."):
                yield node.lineno, name


def _modules_of(subpackage: str) -> Iterator[str]:
    """The files of a package (folder) or the file itself (a path ending in .py)."""
    if subpackage.endswith(".py"):
        yield os.path.join(PACKAGE_DIR, subpackage)
        return
    for root, _, files in os.walk(os.path.join(PACKAGE_DIR, subpackage)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_no_upward_imports(subpackage):
    forbidden = tuple(f"d2_detr.{name}" for name in FORBIDDEN[subpackage])
    found = [f"{os.path.relpath(path, REPO_DIR)}:{line} imports {name}"
             for path in _modules_of(subpackage) for line, name in _imports(path, _package_of(path))
             if name in forbidden or name.startswith(tuple(f + "." for f in forbidden))]
    assert not found, f"d2_detr/{subpackage} must not import {', '.join(forbidden)}:\n" + "\n".join(found)


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    """The checker resolves ``from ..x import y``, ``from . import y`` and ``import d2_detr.x`` alike."""
    path = tmp_path / "probe.py"
    path.write_text("from ..modeling.registry import X\nfrom . import box_ops\nimport d2_detr.engine\n"
                    "import numpy\ndef f():\n    from d2_detr.data import y\n")
    assert _package_of(os.path.join(PACKAGE_DIR, "layers", "mlp.py")) == "d2_detr.layers"
    assert _package_of(os.path.join(PACKAGE_DIR, "layers", "__init__.py")) == "d2_detr.layers"
    names = [name for _, name in _imports(str(path), "d2_detr.layers")]
    assert names == ["d2_detr.modeling.registry", "d2_detr.layers.box_ops", "d2_detr.engine", "d2_detr.data"]
