"""From DETR's per-query mask logits to Detectron2's segmentation outputs.

* Instance segmentation: ``Instances.pred_masks``, full-image bool masks at the output (requested) size:
  the stride-s logits are upsampled by exactly s, cropped to the image's unpadded area, resized to the output
  size (bilinear) and thresholded at sigmoid 0.5.
* Panoptic segmentation (the paper's post-processing): queries whose best class is not "no object" with a
  probability above a threshold (0.85) are kept; each pixel goes to the kept query with the highest mask logit;
  the pixels of kept queries of the same *stuff* class are merged into one segment; segments smaller than a
  minimum area are dropped and their pixels re-assigned among the remaining queries, until none is too small.
  The result is Detectron2's ``panoptic_seg``: an (H, W) int32 map of segment ids (0 = no segment) and one
  ``segments_info`` dict per segment (``id``, ``category_id``, ``isthing``, ``score``, ``area``).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from torch import Tensor

from .inference import select_predictions

__all__ = ["SegmentationPostprocessor", "panoptic_inference", "paste_mask_logits", "thing_classes_of"]


def paste_mask_logits(
    mask_logits: Tensor, stride: int, image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> Tensor:
    """Mask logits of one image at the output resolution.

    Args:
        mask_logits: (Q, h, w) logits at ``stride`` of the padded batch.
        stride: their stride with respect to the input image.
        image_size: (h_img, w_img) of the unpadded input image.
        output_size: (H, W) to return them at (the image's original size for evaluation).

    Returns:
        (Q, H, W) float logits.
    """
    x = F.interpolate(mask_logits[None].float(), scale_factor=stride, mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]  # (1, Q, h_img, w_img)
    if tuple(x.shape[-2:]) != tuple(output_size):
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0]


def panoptic_inference(
    logits: Tensor,
    mask_logits: Tensor,
    is_thing: Sequence[bool],
    object_threshold: float = 0.85,
    min_area: int = 5,
) -> Tuple[Tensor, List[Dict]]:
    """The paper's panoptic post-processing of one image.

    Args:
        logits: (Q, K+1) class logits (last = "no object").
        mask_logits: (Q, H, W) mask logits at the output resolution.
        is_thing: K flags, True for thing classes (stuff classes of one image merge into one segment).
        object_threshold: a query is kept if its best class is not "no object" and its probability exceeds this.
        min_area: segments with fewer pixels are dropped (their queries removed, pixels re-assigned).

    Returns:
        ``(panoptic_seg, segments_info)``: (H, W) int32 segment ids, 0 where no segment is; segment ids are
        1..S in the order of their first query.
    """
    prob = logits.float().softmax(-1)  # (Q, K+1)
    scores, labels = prob.max(-1)  # (Q,)
    no_object = logits.shape[-1] - 1
    keep = torch.nonzero((labels != no_object) & (scores > object_threshold)).flatten()  # (N,)
    height, width = mask_logits.shape[-2:]
    while keep.numel():
        segment_of_query, segment_labels = _segments(labels[keep].tolist(), is_thing)
        segment_of_query_t = torch.as_tensor(segment_of_query, device=mask_logits.device)  # (N,)
        seg_map = segment_of_query_t[mask_logits[keep].argmax(0)]  # (H, W) segment index
        areas = torch.bincount(seg_map.flatten(), minlength=len(segment_labels))  # (S,)
        too_small = areas < min_area  # (S,)
        if not too_small.any():
            break
        keep = keep[~too_small[segment_of_query_t]]
    if keep.numel() == 0:
        return torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device), []
    segment_scores = torch.zeros(len(segment_labels), device=scores.device).scatter_reduce(
        0, segment_of_query_t.to(scores.device), scores[keep], reduce="amax", include_self=False)  # (S,)
    segments_info = [
        {
            "id": s + 1,
            "category_id": label,
            "isthing": bool(is_thing[label]),
            "score": float(segment_scores[s]),
            "area": int(areas[s]),
        }
        for s, label in enumerate(segment_labels)
    ]
    return (seg_map + 1).to(torch.int32), segments_info


def _segments(labels: Sequence[int], is_thing: Sequence[bool]) -> Tuple[List[int], List[int]]:
    """Segment index of each query (a thing query is its own segment; stuff queries of one class share one)
    and the class of each segment."""
    segment_of_query: List[int] = []
    segment_labels: List[int] = []
    stuff_segment: Dict[int, int] = {}
    for label in labels:
        if not is_thing[label] and label in stuff_segment:
            segment_of_query.append(stuff_segment[label])
            continue
        segment_of_query.append(len(segment_labels))
        if not is_thing[label]:
            stuff_segment[label] = len(segment_labels)
        segment_labels.append(label)
    return segment_of_query, segment_labels


def thing_classes_of(dataset_name: Optional[str], num_classes: int) -> List[bool]:
    """Which contiguous classes of a registered dataset are things.

    With Detectron2's panoptic metadata (``stuff_dataset_id_to_contiguous_id``), the classes it maps to are
    stuff and the rest things; without it (or without a dataset) every class is a thing.
    """
    if not dataset_name:
        return [True] * num_classes
    stuff = set(MetadataCatalog.get(dataset_name).get("stuff_dataset_id_to_contiguous_id", {}).values())
    thing = set(MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id", {}).values())
    return [c in thing or c not in stuff for c in range(num_classes)]


class SegmentationPostprocessor:
    """Adds ``pred_masks`` to ``Detr``'s inference results and, with ``panoptic_on``, ``panoptic_seg``."""

    @configurable
    def __init__(
        self,
        *,
        is_thing: Sequence[bool],
        panoptic_on: bool = False,
        object_threshold: float = 0.85,
        min_area: int = 5,
    ):
        """
        Args:
            is_thing: one flag per foreground class, True for things.
            panoptic_on: also return the panoptic segmentation.
            object_threshold: see :func:`panoptic_inference`.
            min_area: see :func:`panoptic_inference`.
        """
        self.is_thing = list(is_thing)
        self.panoptic_on = panoptic_on
        self.object_threshold = object_threshold
        self.min_area = min_area

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict:
        detr = cfg.MODEL.DETR
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        return {
            "is_thing": thing_classes_of(names[0] if names else None, detr.NUM_CLASSES),
            "panoptic_on": detr.PANOPTIC_ON,
            "object_threshold": detr.PANOPTIC_OBJECT_THRESHOLD,
            "min_area": detr.PANOPTIC_MIN_AREA,
        }

    def __call__(
        self, results: List[Dict], outputs: Dict, image_sizes: Sequence[Tuple[int, int]], topk: int = 0
    ) -> None:
        """Complete ``results`` (one dict with "instances" per image, in output size) in place.

        Args:
            results: ``Detr``'s per-image results; ``instances`` are in the order of
                :func:`~d2_detr.modeling.inference.select_predictions` with ``topk``.
            outputs: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, h, w), ``mask_stride``.
            image_sizes: (h, w) of each unpadded input image.
            topk: the ``select_predictions`` rule the instances were chosen with.
        """
        logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        batch, num_queries = logits.shape[:2]
        query_ids = torch.arange(num_queries, device=logits.device, dtype=torch.float32)
        picked = select_predictions(logits, query_ids[None, :, None].expand(batch, -1, 1), topk)  # per image
        for result, (_, _, queries), masks, image_size, image_logits in zip(
            results, picked, pred_masks, image_sizes, logits
        ):
            instances = result["instances"]
            mask_logits = paste_mask_logits(masks, outputs["mask_stride"], image_size, instances.image_size)
            instances.pred_masks = mask_logits[queries[:, 0].long()] > 0  # (N, H, W) bool
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    image_logits, mask_logits, self.is_thing, self.object_threshold, self.min_area)
