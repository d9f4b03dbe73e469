"""The documentation (README.md, docs/*.md, benchmarks/README.md) says what the code does.

Conventions for the pages:

* A fenced ``bash`` block on the line after ``<!-- doc-test -->`` is run as written by
  :func:`test_doc_test_blocks_run`, with ``python`` the interpreter running the tests, from a temporary folder that
  mirrors the repository (symlinks), so its outputs stay out of the repository. The marked blocks of one page run
  in order in the same folder: a block can use what an earlier one wrote. Mark only commands that take seconds on
  a CPU.
* A fenced ``python`` block on the line after ``<!-- doc-test: NAME -->`` is written to the file NAME in that folder
  before the next block runs (a script that a later block runs).
* Every other command is checked without running it: bash blocks parse, python blocks compile, and every command
  with ``--config-file`` (and ``bash tools/quickstart.sh``) has valid flags, an existing config file, and
  ``KEY VALUE`` overrides that merge into that config.
* Links and repository paths the pages mention exist, anchors included; docs/configuration.md's tables are what
  tools/config_reference.py generates from d2_detr/config.py, and list every key ``add_detr_config`` sets.
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Dict, List, NamedTuple, Optional

import pytest
from detectron2.config import get_cfg

from d2_detr import add_detr_config
from d2_detr.engine.train_net import argument_parser

from .conftest import REPO_DIR

PAGES = ["README.md", *sorted(os.path.relpath(p, REPO_DIR) for p in glob.glob(os.path.join(REPO_DIR, "docs", "*.md"))),
         os.path.join("benchmarks", "README.md")]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!-- doc-test(?::\s*(\S+))? -->")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./$-])((?:configs|tools|tests|docs|d2_detr|benchmarks)/[\w.*/-]*)")
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
TRAIN_NET_LIKE = {"train_net.py", "my_train_net.py"}  # scripts that parse d2_detr's argument_parser


class Block(NamedTuple):
    page: str
    line: int
    language: str
    text: str
    marker: Optional[re.Match]  # the <!-- doc-test --> line before the block, if any


def read(page: str) -> str:
    with open(os.path.join(REPO_DIR, page)) as f:
        return f.read()


def blocks(page: str) -> List[Block]:
    text = read(page)
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match.group(1), match.group(2), MARKER.fullmatch(before)))
    return found


def all_blocks(language: str) -> List[Block]:
    return [b for page in PAGES for b in blocks(page) if b.language == language]


def block_id(block: Block) -> str:
    return f"{block.page}:{block.line}"


# ------------------------------------------------------------------------------------------------ running blocks


def _my_dataset(folder: str) -> None:
    """docs/datasets.md registers my_dataset/{train,val}.json with images in my_dataset/{train,val}: the small
    synthetic sets reduced to 3 categories (the page's MODEL.DETR.NUM_CLASSES 3)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    os.makedirs(os.path.join(folder, "my_dataset"))
    for split, name in (("train", "synthetic_shapes_train_small"), ("val", "synthetic_shapes_val_small")):
        DatasetCatalog.get(name)  # generates the files on first use
        metadata = MetadataCatalog.get(name)
        with open(metadata.json_file) as f:
            coco = json.load(f)
        coco["categories"] = [c for c in coco["categories"] if c["id"] <= 3]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] <= 3]
        with open(os.path.join(folder, "my_dataset", f"{split}.json"), "w") as f:
            json.dump(coco, f)
        os.symlink(metadata.image_root, os.path.join(folder, "my_dataset", split))


# What a page's blocks expect to find besides the repository.
PAGE_SETUP: Dict[str, Callable[[str], None]] = {os.path.join("docs", "datasets.md"): _my_dataset}


def _mirror_repository(folder: str) -> Dict[str, str]:
    """Symlink the repository's files into ``folder``; return the environment the blocks run in."""
    for name in os.listdir(REPO_DIR):
        if name.startswith(".") or name in ("output", "datasets", "__pycache__") or name.endswith(".egg-info"):
            continue
        os.symlink(os.path.join(REPO_DIR, name), os.path.join(folder, name))
    bin_dir = os.path.join(folder, ".doc-test-bin")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "python"), "w") as f:
        f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    os.chmod(os.path.join(bin_dir, "python"), 0o755)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                PYTHONPATH=os.pathsep.join(filter(None, [REPO_DIR, os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


DOC_TEST_PAGES = [page for page in PAGES if any(b.marker for b in blocks(page))]


def test_some_blocks_are_run():
    assert {os.path.join("docs", page) for page in ("install.md", "datasets.md", "analysis.md")} <= set(DOC_TEST_PAGES)


@pytest.mark.parametrize("page", DOC_TEST_PAGES)
def test_doc_test_blocks_run(page, tmp_path):
    env = _mirror_repository(str(tmp_path))
    if page in PAGE_SETUP:
        PAGE_SETUP[page](str(tmp_path))
    for block in [b for b in blocks(page) if b.marker]:
        name = block.marker.group(1)
        if name:
            assert block.language == "python", f"{block_id(block)}: '<!-- doc-test: {name} -->' marks a python block"
            (tmp_path / name).write_text(block.text)
            continue
        assert block.language == "bash", f"{block_id(block)}: '<!-- doc-test -->' marks a bash block"
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (f"{block_id(block)} failed ({result.returncode}):\n{block.text}\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


# ------------------------------------------------------------------------------------- checking without running


@pytest.mark.parametrize("block", all_blocks("bash"), ids=block_id)
def test_bash_blocks_parse(block):
    result = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True)
    assert result.returncode == 0, f"{block_id(block)}: {result.stderr}"


@pytest.mark.parametrize("block", all_blocks("python"), ids=block_id)
def test_python_blocks_compile(block):
    compile(block.text, block_id(block), "exec")


def commands(block: Block) -> List[List[str]]:
    """The block's command lines (continuations joined, comments dropped), each split as the shell would."""
    joined = re.sub(r"\\\n", " ", block.text)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _tool_parser(script: str):
    spec = importlib.util.spec_from_file_location(f"doc_tool_{os.path.basename(script)[:-3]}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_parser()


def config_commands() -> list:
    found = []
    for block in all_blocks("bash"):
        for i, argv in enumerate(commands(block)):
            if argv[:2] == ["bash", "tools/quickstart.sh"]:
                config_file = "configs/quickstart_cpu.yaml"
            elif argv[0] == "python" and "--config-file" in argv:
                config_file = argv[argv.index("--config-file") + 1]
            else:
                continue
            found.append(pytest.param(block, argv, config_file, id=f"{block_id(block)}-{i}"))
    return found


@pytest.mark.parametrize("block, argv, config_file", config_commands())
def test_commands_have_valid_flags_and_config(block, argv, config_file):
    where = f"{block_id(block)}: {shlex.join(argv)}"
    script = argv[1] if argv[0] == "python" else ""
    if os.path.basename(script) in TRAIN_NET_LIKE:
        argument_parser().parse_args(argv[2:])
    elif script in ("tools/demo.py", "tools/export_model.py"):
        _tool_parser(os.path.join(REPO_DIR, script)).parse_args(argv[2:])
    assert os.path.isfile(os.path.join(REPO_DIR, config_file)), f"{where}: no config file {config_file}"
    opts = []
    for i, token in enumerate(argv[:-1]):
        if CONFIG_KEY.match(token):
            opts += [token, argv[i + 1]]
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_DIR, config_file))
    try:
        cfg.merge_from_list(opts)
    except Exception as e:  # noqa: BLE001  (any failure to merge is the page's error)
        pytest.fail(f"{where}: the overrides {opts} do not merge into {config_file}: {e!r}")


# ------------------------------------------------------------------------------------------------ links and paths


def anchors(page: str) -> List[str]:
    """GitHub's heading anchors of a page (duplicates numbered -1, -2, ...)."""
    seen: Dict[str, int] = {}
    result = []
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", FENCE.sub("", HTML_COMMENT.sub("", read(page))), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        result.append(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return result


@pytest.mark.parametrize("page", PAGES)
def test_links_and_paths_exist(page):
    text = HTML_COMMENT.sub("", read(page))
    missing = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO_DIR, resolved)):
            missing.append(f"link {target}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            missing.append(f"link {target}: no heading with anchor #{anchor} in {resolved}")
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".,:;")
        if not glob.glob(os.path.join(REPO_DIR, path)):
            missing.append(f"path {path}")
    assert not missing, f"{page} mentions what does not exist:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------------- the two commands


def test_readme_opens_with_the_two_commands():
    first = blocks("README.md")[0]
    lines = [line.split("#")[0].strip() for line in first.text.splitlines()]
    assert first.line == 3 and lines == ["bash tools/quickstart.sh", "bash tools/run_tests.sh"]
    assert "bash tools/run_tests.sh" in read(os.path.join(".ci", "run"))


# -------------------------------------------------------------------------------------- configuration reference


def _config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", os.path.join(REPO_DIR, "tools",
                                                                                   "config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date():
    reference = _config_reference()
    _, current, _ = reference.split_page(read(os.path.join("docs", "configuration.md")))
    assert current == reference.generated_block(), (
        "docs/configuration.md is out of date with d2_detr/config.py: run python tools/config_reference.py")


def test_configuration_reference_lists_every_key_add_detr_config_sets():
    reference = _config_reference()
    detectron2_defaults = reference.flatten(get_cfg())
    cfg = get_cfg()
    add_detr_config(cfg)
    added = {k for k, v in reference.flatten(cfg).items() if k not in detectron2_defaults or detectron2_defaults[k] != v}
    _, generated, _ = reference.split_page(read(os.path.join("docs", "configuration.md")))
    key_cells = re.findall(r"^\| (.*?) \|", generated, re.M)  # a table row's first cell: its keys
    documented = {key for cell in key_cells for key in re.findall(r"`([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)`", cell)}
    assert added <= documented, f"keys missing from docs/configuration.md: {sorted(added - documented)}"
    assert documented <= set(reference.flatten(cfg)), f"documented keys that do not exist: {documented - set(reference.flatten(cfg))}"


def test_config_reference_parser_groups_and_sections():
    reference = _config_reference()
    source = ("def add(cfg):\n"
              "    cfg.MODEL.X = CN()\n"
              "    x = cfg.MODEL.X\n"
              "    # ---- first part ----\n"
              "    # What A is.\n"
              "    # More about A.\n"
              "    x.A = 1\n"
              "    # B and C together.\n"
              "    cfg.SOLVER.B = 2\n"
              "    cfg.SOLVER.C = 3\n"
              "\n"
              "    # ---- second part ----\n"
              "    # D.\n"
              "    x.D = 4\n")
    entries = reference.parse_config_source(source)
    assert entries == [reference.Entry("first part", ["MODEL.X.A"], "What A is. More about A."),
                       reference.Entry("first part", ["SOLVER.B", "SOLVER.C"], "B and C together."),
                       reference.Entry("second part", ["MODEL.X.D"], "D.")]
    with pytest.raises(ValueError, match="MODEL.X.E has no comment"):
        reference.parse_config_source(source + "\n    x.E = 5\n")
