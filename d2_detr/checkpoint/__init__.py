"""Checkpoints: loading with clear errors (strictly for evaluation and inference), and conversion of original
DETR and torchvision ResNet weights to d2_detr's names."""
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
from .loading import (
    CheckedCheckpointer,
    CheckpointError,
    UnreadableCheckpointError,
    load_checkpoint_strict,
    load_inference_weights,
)

__all__ = [
    "CheckedCheckpointer",
    "CheckpointError",
    "UnreadableCheckpointError",
    "COCO_NO_OBJECT_ROW",
    "COCO_PANOPTIC_NO_OBJECT_ROW",
    "coco_class_head_rows",
    "coco_panoptic_class_head_rows",
    "convert_detr_state_dict",
    "convert_torchvision_resnet_state_dict",
    "load_checkpoint_strict",
    "load_inference_weights",
    "load_state_dict_file",
    "resnet_depth",
    "save_converted_checkpoint",
]
