"""Checkpoint conversion: original DETR, Deformable DETR, DINO and torchvision ResNet weights to d2_detr's names."""
from .convert import (
    COCO_NO_OBJECT_ROW,
    COCO_PANOPTIC_NO_OBJECT_ROW,
    coco_class_head_rows,
    coco_panoptic_class_head_rows,
    convert_detr_state_dict,
    convert_torchvision_resnet_state_dict,
    load_state_dict_file,
    resnet_depth,
    save_converted_checkpoint,
)
from .convert_dino import convert_dino_state_dict, is_dino_state_dict
from .convert_deformable import (
    COCO_SIGMOID_HEAD_ROWS,
    coco_sigmoid_class_head_rows,
    convert_deformable_detr_state_dict,
    deformable_detr_variant,
    is_deformable_detr_state_dict,
)

__all__ = [
    "COCO_NO_OBJECT_ROW",
    "COCO_SIGMOID_HEAD_ROWS",
    "COCO_PANOPTIC_NO_OBJECT_ROW",
    "coco_class_head_rows",
    "coco_panoptic_class_head_rows",
    "coco_sigmoid_class_head_rows",
    "convert_deformable_detr_state_dict",
    "convert_detr_state_dict",
    "convert_dino_state_dict",
    "convert_torchvision_resnet_state_dict",
    "deformable_detr_variant",
    "is_deformable_detr_state_dict",
    "is_dino_state_dict",
    "load_state_dict_file",
    "resnet_depth",
    "save_converted_checkpoint",
]
