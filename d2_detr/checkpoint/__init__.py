"""Checkpoint conversion: original DETR and torchvision ResNet weights to d2_detr's names; ``torchvision://`` weights
paths (registered on Detectron2's PathManager on import)."""
from detectron2.utils.file_io import PathManager

from .convert import (
    COCO_NO_OBJECT_ROW,
    COCO_PANOPTIC_NO_OBJECT_ROW,
    DETR_CHECKPOINT_DESCRIPTION,
    TORCHVISION_RESNET_DESCRIPTION,
    coco_class_head_rows,
    coco_panoptic_class_head_rows,
    convert_detr_state_dict,
    convert_torchvision_resnet_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)
from .torchvision_weights import TorchvisionHandler, parse_torchvision_path, resolve_torchvision_weights

__all__ = [
    "COCO_NO_OBJECT_ROW",
    "COCO_PANOPTIC_NO_OBJECT_ROW",
    "DETR_CHECKPOINT_DESCRIPTION",
    "TORCHVISION_RESNET_DESCRIPTION",
    "coco_class_head_rows",
    "coco_panoptic_class_head_rows",
    "convert_detr_state_dict",
    "convert_torchvision_resnet_state_dict",
    "load_state_dict_file",
    "resnet_depth",
    "parse_torchvision_path",
    "resolve_torchvision_weights",
    "save_converted_checkpoint",
    "TorchvisionHandler",
]

PathManager.register_handler(TorchvisionHandler())
