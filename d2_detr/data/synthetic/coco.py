"""The synthetic shapes as files in COCO format: ``images/*.png`` and ``annotations.json`` (instances).

The pieces (image names and entries, boxes and RLE annotations of masks) serve the panoptic variant too.
"""
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from .render import GENERATOR_VERSION, SYNTHETIC_CLASSES, ShapeInstance, SyntheticShapesConfig, render_image
from .store import generate_once, write_canonical_json

__all__ = [
    "ANNOTATIONS_FILE",
    "IMAGES_DIR",
    "coco_annotation",
    "generate_synthetic_shapes",
    "image_entry",
    "image_stem",
    "mask_box",
    "write_detection_dataset",
]

logger = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"

_PROGRESS_EVERY = 500


def image_stem(index: int, num_images: int) -> str:
    """File name (without extension) of image ``index`` of ``num_images``: the index, zero-padded to at least 6
    digits and to the same width for all images of the dataset."""
    digits = max(6, len(str(max(num_images - 1, 0))))
    return f"{index:0{digits}d}"


def image_entry(image_id: int, file_name: str, image: np.ndarray) -> Dict[str, Any]:
    """COCO ``images`` entry of an (H, W, 3) image."""
    height, width = image.shape[:2]
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def mask_box(mask: np.ndarray) -> List[int]:
    """Tight COCO XYWH box (integer pixels) of the non-empty (H, W) bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def coco_annotation(instance: ShapeInstance, ann_id: int, image_id: int) -> Dict[str, Any]:
    """COCO annotation of an object's visible pixels: tight XYWH box, pixel area, RLE segmentation."""
    mask = instance.visible_mask
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "bbox": mask_box(mask),
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
    }


def write_detection_dataset(dataset_dir: str, config: SyntheticShapesConfig) -> int:
    """Draw the dataset ``config`` into the existing empty directory ``dataset_dir``: ``images/*.png`` and
    ``annotations.json``. Returns the number of annotations written."""
    images_dir = os.path.join(dataset_dir, IMAGES_DIR)
    os.makedirs(images_dir)
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for index in range(config.num_images):
        rendered = render_image(config, index)
        image_id = index + 1  # COCO ids start at 1: COCOeval treats id 0 as "unmatched".
        file_name = image_stem(index, config.num_images) + ".png"
        Image.fromarray(rendered.image).save(os.path.join(images_dir, file_name), format="PNG")
        images.append(image_entry(image_id, file_name, rendered.image))
        for instance in rendered.annotated_instances:
            annotations.append(coco_annotation(instance, len(annotations) + 1, image_id))
        if (index + 1) % _PROGRESS_EVERY == 0 and index + 1 < config.num_images:
            logger.info("Synthetic shapes: drew %d/%d images ...", index + 1, config.num_images)
    coco = {
        "info": {"description": "d2_detr synthetic shapes", "version": str(GENERATOR_VERSION),
                 "params": config.to_params()},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    write_canonical_json(os.path.join(dataset_dir, ANNOTATIONS_FILE), coco)
    return len(annotations)


def generate_synthetic_shapes(
    dataset_dir: str,
    config: SyntheticShapesConfig,
    writer: Optional[Callable[[str, SyntheticShapesConfig], int]] = None,
) -> str:
    """Make sure ``dataset_dir`` holds the dataset described by ``config``; return its ``annotations.json``.

    Does nothing if the directory already holds it (same parameters); otherwise generates it once and
    atomically (:func:`~d2_detr.data.synthetic.store.generate_once`). ``writer(dir, config)`` (default
    :func:`write_detection_dataset`) fills the empty temporary directory and returns the number of annotations;
    variants such as the panoptic one bring their own. ``params.json`` is written after it.
    """
    write = writer or write_detection_dataset
    generate_once(
        dataset_dir,
        config.to_params(),
        lambda tmp_dir: f"{config.num_images} images with {write(tmp_dir, config)} objects",
        required=(ANNOTATIONS_FILE,),
        description=f"synthetic shapes dataset ({config.num_images} images)",
    )
    return os.path.join(os.path.abspath(dataset_dir), ANNOTATIONS_FILE)
