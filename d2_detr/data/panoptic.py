"""Panoptic training data for DETR: every segment (thing or stuff) becomes an object with a box and a mask.

DETR learns panoptic segmentation as set prediction over *segments*: a stuff class is predicted like a thing,
one object per stuff segment (in both training stages: the detector learns the segments' boxes first).
:class:`~d2_detr.data.dataset_mapper.DetrDatasetMapper` calls :func:`panoptic_annotations_to_instances` for
Detectron2's panoptic dataset dicts (``pan_seg_file_name`` + ``segments_info``, as ``register_coco_panoptic``
loads them): the panoptic PNG gets the image's augmentation (nearest-neighbour, so segment ids survive), and
the ``Instances`` hold ``gt_classes`` (the segments' contiguous category ids), ``gt_masks`` (``BitMasks``) and
``gt_boxes`` (the tight boxes of the masks after augmentation). Segments cropped away are dropped, and by
default so are crowd segments (``iscrowd``), like crowd annotations of the detection mapper: the panoptic
evaluation ignores crowd regions, and a crowd mask would teach a query to cover a whole group with one segment.
The original implementation trains on crowd segments as on any other (``drop_crowd=False``,
``INPUT.PANOPTIC_DROP_CROWD False``).
"""
from typing import Dict, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from .images import read_dataset_image

__all__ = ["panoptic_annotations_to_instances", "rgb_to_id"]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours of a COCO panoptic PNG -> (H, W) int64 segment ids (R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_annotations_to_instances(
    dataset_dict: Dict, transforms: T.TransformList, image_shape: Tuple[int, int], drop_crowd: bool = True
) -> Instances:
    """Ground truth of a training image from its panoptic segments.

    Args:
        dataset_dict: a panoptic dataset dict; ``pan_seg_file_name`` and ``segments_info`` (contiguous
            ``category_id``s) are popped from it.
        transforms: the augmentation applied to the image.
        image_shape: (H, W) of the augmented image.
        drop_crowd: leave out segments with ``iscrowd`` set (False: keep them as ordinary segments, the original).

    Returns:
        Instances with gt_classes (n,), gt_masks (BitMasks (n, H, W)) and gt_boxes (the masks' tight XYXY boxes).
    """
    pan_seg = read_dataset_image(dataset_dict.pop("pan_seg_file_name"), "RGB")  # (H0, W0, 3) uint8
    segment_ids = rgb_to_id(transforms.apply_segmentation(pan_seg))  # (H, W)
    if segment_ids.shape != tuple(image_shape):
        raise ValueError(f"panoptic PNG of size {pan_seg.shape[:2]} does not match its image "
                         f"({dataset_dict.get('height')}, {dataset_dict.get('width')}): {dataset_dict['file_name']}")
    classes, masks = [], []
    for segment in dataset_dict.pop("segments_info", []):
        if drop_crowd and segment.get("iscrowd", 0):
            continue
        mask = segment_ids == segment["id"]  # (H, W)
        if mask.any():
            classes.append(segment["category_id"])
            masks.append(mask)
    instances = Instances(tuple(image_shape))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)  # (n,)
    if masks:
        instances.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))  # (n, H, W)
        instances.gt_boxes = instances.gt_masks.get_bounding_boxes()  # (n, 4) XYXY
    else:
        instances.gt_masks = BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))
        instances.gt_boxes = Boxes(torch.zeros((0, 4)))
    return instances
