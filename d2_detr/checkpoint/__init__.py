"""Checkpoint conversion: original DETR and torchvision ResNet weights to d2_detr's names."""
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
    "save_converted_checkpoint",
]
