"""Drawings of panoptic segmentation: ground truth against DETR's ``panoptic_seg`` output, with Detectron2's
``Visualizer.draw_panoptic_seg_predictions``.

    model = load_inference_model(cfg)   # d2_detr.utils.visualize; cfg with MODEL.MASK_ON and MODEL.DETR.PANOPTIC_ON
    draw_panoptic_grid(cfg, model, "synthetic_panoptic_val", "docs/images/panoptic_synthetic.png", num_images=6)
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from torch import nn

from ..data.dataset_mapper import DetrDatasetMapper
from ..data.panoptic import rgb_to_id
from .visualize import read_image_rgb, save_image

__all__ = ["draw_panoptic", "draw_panoptic_grid", "predict_panoptic"]


def draw_panoptic(image_rgb: np.ndarray, panoptic_seg: torch.Tensor, segments_info: List[Dict],
                  metadata: Metadata, scale: float = 1.0) -> np.ndarray:
    """A panoptic segmentation ((H, W) ids and ``segments_info`` with contiguous ``category_id`` and ``isthing``)
    drawn over a copy of the image; RGB (H * scale, W * scale, 3)."""
    visualizer = Visualizer(image_rgb, metadata, scale=scale)
    drawing = visualizer.draw_panoptic_seg_predictions(panoptic_seg.cpu(), [dict(s) for s in segments_info])
    return drawing.get_image()


def predict_panoptic(cfg: CfgNode, model: nn.Module, dataset_dict: Dict) -> Tuple[torch.Tensor, List[Dict]]:
    """The model's panoptic segmentation of a dataset image, preprocessed as at evaluation."""
    inputs = DetrDatasetMapper(cfg, is_train=False)(dataset_dict)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model([inputs])[0]
    finally:
        model.train(was_training)
    if "panoptic_seg" not in output:
        raise ValueError("the model returns no panoptic_seg: set MODEL.MASK_ON True and MODEL.DETR.PANOPTIC_ON True")
    return output["panoptic_seg"]


def draw_panoptic_grid(cfg: CfgNode, model: nn.Module, dataset_name: str, output_path: str,
                       num_images: int = 6, scale: float = 2.0) -> str:
    """Write a PNG with the ground truth (top row) and the model's panoptic segmentation (bottom row) of the
    first ``num_images`` images of a registered panoptic dataset; returns ``output_path``."""
    metadata = MetadataCatalog.get(dataset_name)
    columns = []
    for dataset_dict in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image_rgb(dataset_dict["file_name"])
        gt_ids = torch.from_numpy(rgb_to_id(np.asarray(Image.open(dataset_dict["pan_seg_file_name"]).convert("RGB"))))
        ground_truth = draw_panoptic(image, gt_ids, dataset_dict["segments_info"], metadata, scale)
        panoptic_seg, segments_info = predict_panoptic(cfg, model, dict(dataset_dict))
        prediction = draw_panoptic(image, panoptic_seg, segments_info, metadata, scale)
        gap = np.full((max(4, ground_truth.shape[0] // 32), ground_truth.shape[1], 3), 255, dtype=np.uint8)
        columns.append(np.concatenate([ground_truth, gap, prediction], axis=0))
    height = max(c.shape[0] for c in columns)
    padded = [np.pad(c, ((0, height - c.shape[0]), (0, 0), (0, 0)), constant_values=255) for c in columns]
    spacer = np.full((height, max(4, padded[0].shape[1] // 32), 3), 255, dtype=np.uint8)
    grid = np.concatenate([part for c in padded for part in (c, spacer)][:-1], axis=1)
    save_image(grid, output_path)
    return output_path
