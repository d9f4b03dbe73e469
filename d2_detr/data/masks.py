"""Instance mask annotations for DETR's mask head: polygons rasterised for ``INPUT.MASK_FORMAT "bitmask"``.

Detectron2 transforms polygon annotations as polygons, and crops them with ``shapely``. With
``INPUT.MASK_FORMAT "bitmask"``, :func:`rasterize_polygons` turns them into RLE *before* augmentation, so they
are transformed as images (DETR's random crop then needs no shapely) and reach the model as ``BitMasks``.
"""
import importlib.util
from typing import Dict

import numpy as np
import pycocotools.mask as mask_util

__all__ = ["check_polygon_cropping", "rasterize_polygons"]


def rasterize_polygons(annotation: Dict, height: int, width: int) -> Dict:
    """Replace a polygon ``segmentation`` (list of flat [x0, y0, x1, y1, ...] lists) of ``annotation`` by the
    COCO RLE of their union on an image of ``height`` x ``width``, in place; RLE segmentations stay as they are.
    Returns ``annotation``."""
    segm = annotation.get("segmentation")
    if isinstance(segm, list):
        polygons = [[float(v) for v in p] for p in segm if len(p) >= 6]
        if polygons:
            annotation["segmentation"] = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
        else:
            annotation["segmentation"] = mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return annotation


def check_polygon_cropping(mask_on: bool, mask_format: str, crop_enabled: bool) -> None:
    """Fail early, with the fix, where Detectron2 would fail at the first cropped polygon: cropping polygon
    masks (``INPUT.MASK_FORMAT "polygon"`` with ``INPUT.CROP.ENABLED``) needs ``shapely``."""
    if mask_on and mask_format == "polygon" and crop_enabled and importlib.util.find_spec("shapely") is None:
        raise ValueError("INPUT.MASK_FORMAT 'polygon' with INPUT.CROP.ENABLED: Detectron2 crops polygons with "
                         "shapely, which is not installed. Use INPUT.MASK_FORMAT bitmask (polygons are then "
                         "rasterised before augmentation) or install shapely.")
