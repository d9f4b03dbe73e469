#!/usr/bin/env python
"""Install detectron2 v0.6 from the package registry's source release, when no detectron2 is importable.

Detectron2 is not on the registry under its own name. ``pb1-detectron2==0.6`` is a source release whose
``detectron2/*.py`` files are byte-identical to detectron2's official v0.6, but it lacks the C++/CUDA sources
(``detectron2/layers/csrc``), so a plain ``pip install`` fails compiling ``detectron2._C``. This script:

1. does nothing if ``import detectron2`` already works (an official build, any version, stays untouched),
   unless that detectron2 was installed by this script with another set of edits (its ``detectron2/_C.py``
   records them): then it is installed again, so an environment picks up a new edit;
2. downloads the source release (``pip download --no-binary --no-build-isolation``; its setup.py imports
   torch) and checks its SHA-256, so a changed upload fails loudly instead of installing something else;
3. applies the small, fixed set of edits listed in ``EDITS`` below, each counted (an edit that does not
   match exactly as often as expected aborts the install);
4. installs the edited tree with pip.

The edits: build no C++ extension (its sources are not in the release) and add ``detectron2/_C.py``, a
pure-Python module that reports the missing compiled ops and raises a clear error if one is called (DETR
uses none of them: deformable conv, rotated boxes/ROIAlign, the C++ COCOeval); replace the numpy aliases
removed in numpy 1.24 (``np.int`` ...) by the builtins they always meant; ``Image.LINEAR`` (removed in
Pillow 10) by ``Image.BILINEAR`` (the same constant); ``pkg_resources`` (gone from setuptools 81) by
``importlib.resources`` in the model zoo; import the caffe2 exporter (``detectron2.export.api``, which needs the
``caffe2`` package that torch 2 no longer ships) only when caffe2 is importable, as detectron2's main branch does,
so that ``detectron2.export`` and with it ``detectron2.utils.analysis`` (FLOP and parameter counts) import.
"""
import argparse
import hashlib
import importlib.util
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Sequence

SOURCE_RELEASE = "pb1-detectron2==0.6"
SOURCE_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

COMPILED_OPS_STANDIN = '''"""Stand-in for detectron2's compiled extension, written by d2-detr's tools/install_detectron2.py.

This detectron2 was installed from a source release without detectron2/layers/csrc, so its C++/CUDA ops
(deformable conv, rotated boxes and ROIAlign, the C++ COCOeval) are not available. Everything else works.
"""
COMPILED = False


def get_compiler_version() -> str:
    return "none: detectron2 installed without compiled ops (d2-detr's install_detectron2.py)"


def get_cuda_version() -> str:
    return "none"


def has_cuda() -> bool:
    return False


def __getattr__(name):
    raise ImportError(
        f"detectron2._C.{name} is a compiled op, and this detectron2 was installed without them "
        "(d2-detr's tools/install_detectron2.py). Build detectron2 from its official source to use it; "
        "for COCOEvaluator, pass use_fast_impl=False."
    )
'''


# detectron2/export/__init__.py: the caffe2 exporter only where caffe2 is importable (as on detectron2's main branch).
CAFFE2_OPTIONAL_IMPORT = """try:
    from caffe2.proto import caffe2_pb2 as _tmp  # caffe2 is optional: torch 2 no longer ships it
except ImportError:
    pass
else:
    from .api import *
"""


class Edit(NamedTuple):
    """A regex substitution applied to files matching ``glob`` under the unpacked release."""

    glob: str
    pattern: str
    replacement: str
    count: int  # exact number of substitutions expected across all matching files
    why: str


EDITS: List[Edit] = [
    Edit("setup.py", r"ext_modules=get_extensions\(\),", "ext_modules=[],", 1,
         "the release has no detectron2/layers/csrc to compile"),
    Edit("detectron2/**/*.py", r"\bnp\.(int|float|bool|object|str)\b(?![\w(])", r"\1", 19,
         "numpy >= 1.24 removed these aliases of the builtins"),
    Edit("detectron2/data/transforms/transform.py", r"\bImage\.LINEAR\b", "Image.BILINEAR", 1,
         "Pillow >= 10 removed Image.LINEAR, an alias of Image.BILINEAR"),
    Edit("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources$", "import importlib.resources", 1,
         "setuptools >= 81 no longer ships pkg_resources"),
    Edit("detectron2/model_zoo/model_zoo.py",
         r'pkg_resources\.resource_filename\(\s*"detectron2\.model_zoo", os\.path\.join\("configs", config_path\)\s*\)',
         'str(importlib.resources.files("detectron2.model_zoo").joinpath("configs", config_path))', 1,
         "same as above"),
    Edit("detectron2/export/__init__.py", r"^from \.api import \*$", CAFFE2_OPTIONAL_IMPORT, 1,
         "torch 2 no longer ships caffe2; detectron2's main branch imports its caffe2 exporter only when it is there"),
]


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def edits_digest() -> str:
    """A digest of ``EDITS``, recorded in the installed ``detectron2/_C.py``."""
    text = repr([(e.glob, e.pattern, e.replacement, e.count) for e in EDITS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def installed_with_other_edits(package_dir: Path) -> bool:
    """Whether the detectron2 package at ``package_dir`` was installed by this script with a set of edits other
    than ``EDITS`` (False for any other detectron2, e.g. an official build with its compiled ``_C``)."""
    standin = package_dir / "_C.py"
    if not standin.is_file() or "tools/install_detectron2.py" not in standin.read_text():
        return False
    recorded = re.search(r'^INSTALLED_EDITS = "(\w+)"', standin.read_text(), flags=re.MULTILINE)
    return recorded is None or recorded.group(1) != edits_digest()


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def download(dest: Path) -> Path:
    pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", str(dest),
        SOURCE_RELEASE)
    (archive,) = dest.glob("*.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{archive.name}: SHA-256 {digest} differs from the expected {SOURCE_SHA256}; "
                         "the registry's release changed, so its edits cannot be trusted. Aborting.")
    return archive


def apply_edits(tree: Path, edits: Sequence[Edit] = EDITS) -> None:
    """Apply ``edits`` to the unpacked release ``tree``; abort if one matches other than ``edit.count`` times."""
    for edit in edits:
        done = 0
        for path in sorted(tree.glob(edit.glob)):
            text = path.read_text()
            new, n = re.subn(edit.pattern, edit.replacement, text, flags=re.MULTILINE)
            if n:
                path.write_text(new)
                done += n
        if done != edit.count:
            raise SystemExit(f"edit {edit.pattern!r} on {edit.glob} matched {done} times, expected {edit.count}; "
                             "the source release is not the one this script knows. Aborting.")
        print(f"  edited {edit.glob}: {done} x ({edit.why})")


def add_compiled_ops_standin(tree: Path) -> None:
    marker = f'COMPILED = False\nINSTALLED_EDITS = "{edits_digest()}"  # the installer\'s edits (a digest)'
    (tree / "detectron2" / "_C.py").write_text(COMPILED_OPS_STANDIN.replace("COMPILED = False", marker, 1))
    print("  added detectron2/_C.py (reports the missing compiled ops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="install even if detectron2 is importable")
    args = parser.parse_args()
    reinstall = detectron2_importable()  # replace the installed files, keep its dependencies
    if reinstall and not args.force:
        package_dir = Path(importlib.util.find_spec("detectron2").origin).parent
        if not installed_with_other_edits(package_dir):
            print(f"detectron2 is already importable ({package_dir}); leaving it untouched.")
            return
        print(f"detectron2 at {package_dir} was installed by this script with other edits; installing it again.")
    with tempfile.TemporaryDirectory(prefix="d2_detr_install_") as tmp:
        tmp_path = Path(tmp)
        print(f"Downloading {SOURCE_RELEASE} (source release) ...")
        archive = download(tmp_path)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path, filter="data")
        tree = next(p for p in tmp_path.iterdir() if p.is_dir())
        print(f"Editing {tree.name} for this environment:")
        apply_edits(tree)
        add_compiled_ops_standin(tree)
        print("Installing detectron2 (no compiled ops) ...")
        pip("install", "-q", "--no-build-isolation", *(["--force-reinstall", "--no-deps"] if reinstall else []),
            str(tree))
    print("detectron2 installed.")


if __name__ == "__main__":
    main()
