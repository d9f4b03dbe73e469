"""The classes of a registered dataset before it is loaded.

Detectron2's ``register_coco_instances`` sets only ``json_file``, ``image_root`` and ``evaluator_type`` in the
metadata; ``thing_classes`` is filled when the json file is loaded, after the model is built. To check
``MODEL.DETR.NUM_CLASSES`` at start-up, :func:`dataset_thing_classes` reads the ``"categories"`` of that json file
in the order ``load_coco_json`` gives them (sorted by category id).
"""
import json
import logging
import mmap
import os
import re
from typing import Dict, List, Optional

from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["coco_json_categories", "dataset_thing_classes"]

# "categories" followed by ':' is an object key: in a json string a quote is escaped, and a string value is
# followed by ',', '}' or ']'.
_CATEGORIES_KEY = re.compile(rb'"categories"\s*:')
_FIRST_READ = 1 << 16


def _decode_value_at(data: mmap.mmap, start: int):
    """The json value starting at byte ``start`` of ``data``, reading more until it is complete."""
    decoder = json.JSONDecoder()
    size = _FIRST_READ
    while True:
        text = data[start:start + size].decode("utf-8", errors="replace").lstrip()
        try:
            return decoder.raw_decode(text)[0]
        except json.JSONDecodeError:
            if start + size >= len(data):
                raise
            size *= 4


def _is_category_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(c, dict) and "id" in c and "name" in c for c in value)


def coco_json_categories(json_file: str) -> List[Dict]:
    """The ``"categories"`` list of a COCO json file.

    The file is searched for the key rather than parsed whole (a COCO-sized training file takes tens of
    seconds to parse; the search, well under one): if ``"categories":`` occurs exactly once and is followed by
    a list of dicts with "id" and "name", that list is returned; otherwise the file is parsed.

    Raises:
        ValueError: if the file is not json or has no such list.
    """
    value = None
    with open(json_file, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                matches = list(_CATEGORIES_KEY.finditer(data))
                if len(matches) == 1:
                    try:
                        value = _decode_value_at(data, matches[0].end())
                    except json.JSONDecodeError:
                        value = None
    if not _is_category_list(value):
        try:
            with open(json_file, "rb") as f:
                content = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{json_file} is not a json file ({e})") from e
        value = content.get("categories") if isinstance(content, dict) else None
        if not _is_category_list(value):
            raise ValueError(f"{json_file} has no COCO \"categories\" list (dicts with \"id\" and \"name\")")
    return value


def dataset_thing_classes(name: str) -> Optional[List[str]]:
    """The ``thing_classes`` of registered dataset ``name``, without loading it: from its metadata, else (a
    dataset registered with ``register_coco_instances``: ``evaluator_type`` "coco" and a ``json_file``) the
    names of the json file's categories sorted by id, as ``load_coco_json`` sets them. None if unknown.

    Raises:
        FileNotFoundError: if the metadata's ``json_file`` does not exist.
        ValueError: if it is not a COCO json file.
    """
    metadata = MetadataCatalog.get(name)
    classes = metadata.get("thing_classes")
    if classes is not None:
        return list(classes)
    json_file = metadata.get("json_file")
    if metadata.get("evaluator_type") != "coco" or not json_file:
        return None
    if not PathManager.isfile(json_file):
        raise FileNotFoundError(
            f"Dataset {name!r}: its json_file {json_file} does not exist; fix the path given to "
            "register_coco_instances.")
    categories = {c["id"]: c["name"] for c in coco_json_categories(PathManager.get_local_path(json_file))}
    logger.info(f"Dataset {name!r}: {len(categories)} categories in {json_file}")
    return [categories[i] for i in sorted(categories)]
