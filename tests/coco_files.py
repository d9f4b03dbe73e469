"""Tiny COCO-format datasets written to a temporary folder, with ways to damage them as users' datasets are."""
import itertools
import json
import os
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

CATEGORIES = ((1, "cat"), (2, "dog"), (3, "bird"))
IMAGE_SIZE = (48, 64)  # (height, width)


def write_coco_dataset(root, num_images: int = 4, categories: Sequence[Tuple[int, str]] = CATEGORIES,
                       image_format: str = "png") -> Tuple[str, str]:
    """``num_images`` noise images of IMAGE_SIZE with two boxes each (category ids cycling over ``categories``)
    and their COCO json. Returns (json_file, image_root)."""
    image_root = os.path.join(str(root), "images")
    os.makedirs(image_root, exist_ok=True)
    height, width = IMAGE_SIZE
    rng = np.random.default_rng(0)
    images, annotations = [], []
    ids = itertools.cycle([c for c, _ in categories])
    for i in range(num_images):
        file_name = f"{i:04d}.{image_format}"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            os.path.join(image_root, file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": height, "width": width})
        for box in ([2, 3, 20, 10], [30, 20, 30, 25]):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": next(ids),
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    json_file = os.path.join(str(root), "annotations.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": c, "name": n, "supercategory": "animal"} for c, n in categories]}, f)
    return json_file, image_root


def edit_json(json_file: str, edit) -> None:
    """Apply ``edit(content)`` to the json file's content, in place."""
    with open(json_file) as f:
        content = json.load(f)
    edit(content)
    with open(json_file, "w") as f:
        json.dump(content, f)


def truncate(path: str, keep: float = 0.5) -> None:
    """Cut the file to ``keep`` of its bytes, as an interrupted copy does."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def register(name: str, json_file: str, image_root: str, metadata: Optional[Dict] = None) -> str:
    """``register_coco_instances`` under ``name``, replacing an earlier registration of that name."""
    unregister([name])
    register_coco_instances(name, metadata or {}, json_file, image_root)
    return name


def unregister(names: Iterable[str]) -> None:
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
