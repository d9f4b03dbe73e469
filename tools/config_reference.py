#!/usr/bin/env python
"""Write the configuration reference of docs/configuration.md from the comments of d2_detr/config.py.

    python tools/config_reference.py            # rewrite the generated part of docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if it is out of date (the tests check this too)

Every key that a function of d2_detr/config.py (``add_detr_config`` and any it calls) assigns becomes a table row:
the key, its default (the value ``add_detr_config`` leaves in a Detectron2 config) and its meaning (the
comment right above the assignment; assignments directly below one comment share it). A comment of the form
``# ---- title ----`` starts a new table under ``### title``. Only the part of the page between the BEGIN and
END markers is rewritten; the text around it is written by hand.
"""
import argparse
import ast
import os
import re
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SOURCE = os.path.join(REPO, "d2_detr", "config.py")
PAGE = os.path.join(REPO, "docs", "configuration.md")
BEGIN = "<!-- BEGIN generated from d2_detr/config.py by tools/config_reference.py: do not edit by hand -->"
END = "<!-- END generated -->"
SECTION = re.compile(r"^#\s*-{2,}\s*(.*?)\s*-{2,}\s*$")


class Entry(NamedTuple):
    section: str
    keys: List[str]  # several keys under one comment form one row
    meaning: str


def _attribute_path(node: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
    """``cfg.MODEL.DETR.X`` -> "MODEL.DETR.X"; ``detr.X`` with ``detr = cfg.MODEL.DETR`` -> "MODEL.DETR.X"."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id == "cfg":
        prefix = []
    elif node.id in aliases:
        prefix = [aliases[node.id]]
    else:
        return None
    return ".".join(prefix + parts[::-1]) or None


def _is_new_node(value: ast.AST) -> bool:
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("CN", "CfgNode")


def parse_config_source(source: str) -> List[Entry]:
    """The documented keys of config.py, in source order, grouped by their comment."""
    lines = source.splitlines()
    sections = [(i, m.group(1)) for i, line in enumerate(lines) if (m := SECTION.match(line.strip()))]
    entries: List[Entry] = []
    previous_end = -2  # line index of the end of the previous key assignment
    for function in [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]:
        aliases: Dict[str, str] = {}
        for statement in function.body:
            if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
                continue
            target, value = statement.targets[0], statement.value
            first, last = statement.lineno - 1, statement.end_lineno - 1
            if isinstance(target, ast.Name):
                path = _attribute_path(value, aliases)
                if path is not None:
                    aliases[target.id] = path
                continue
            key = _attribute_path(target, aliases)
            if key is None or _is_new_node(value):
                continue
            section = ([title for i, title in sections if i < first] or ["General"])[-1]
            comment: List[str] = []
            index = first - 1
            while index >= 0 and lines[index].strip().startswith("#") and not SECTION.match(lines[index].strip()):
                comment.insert(0, lines[index].strip().lstrip("#").strip())
                index -= 1
            if not comment and entries and previous_end == first - 1 and entries[-1].section == section:
                entries[-1].keys.append(key)  # directly below the previous key: shares its comment
            elif not comment:
                raise ValueError(f"{CONFIG_SOURCE}:{first + 1}: {key} has no comment above it; every key is "
                                 "declared with a comment saying what it means")
            else:
                entries.append(Entry(section, [key], " ".join(comment)))
            previous_end = last
    return entries


def config_defaults() -> Dict[str, object]:
    """Flattened key -> value of a Detectron2 config after ``add_detr_config``."""
    sys.path.insert(0, REPO)
    from detectron2.config import get_cfg

    from d2_detr.config import add_detr_config

    cfg = get_cfg()
    add_detr_config(cfg)
    return flatten(cfg)


def flatten(node, prefix: str = "") -> Dict[str, object]:
    flat: Dict[str, object] = {}
    for name, value in node.items():
        key = prefix + name
        if isinstance(value, dict):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _format_value(value) -> str:
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(entries: List[Entry], defaults: Dict[str, object]) -> str:
    """The generated markdown: one table per section."""
    out: List[str] = []
    current: Optional[str] = None
    for entry in entries:
        if entry.section != current:
            current = entry.section
            out += ["", f"### {current[0].upper()}{current[1:]}", "", "| key | default | meaning |", "|---|---|---|"]
        keys = "<br>".join(f"`{k}`" for k in entry.keys)
        values = "<br>".join(_format_value(defaults[k]) for k in entry.keys)
        out.append(f"| {keys} | {_cell(values)} | {_cell(entry.meaning)} |")
    return "\n".join(out[1:]) + "\n"


def generated_block() -> str:
    with open(CONFIG_SOURCE) as f:
        entries = parse_config_source(f.read())
    return f"{BEGIN}\n{render(entries, config_defaults())}{END}"


def split_page(text: str) -> Tuple[str, str, str]:
    """(before, generated part with its markers, after) of the page."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{PAGE} must contain the lines\n{BEGIN}\n{END}\n(the generated part goes between them)")
    end += len(END)
    return text[:start], text[start:end], text[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args()
    with open(PAGE) as f:
        text = f.read()
    before, current, after = split_page(text)
    wanted = generated_block()
    if args.check:
        if current != wanted:
            print(f"{os.path.relpath(PAGE)} is out of date with d2_detr/config.py: run python tools/config_reference.py",
                  file=sys.stderr)
            return 1
        print(f"{os.path.relpath(PAGE)} is up to date")
        return 0
    with open(PAGE, "w") as f:
        f.write(before + wanted + after)
    print(f"wrote the configuration reference to {os.path.relpath(PAGE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
