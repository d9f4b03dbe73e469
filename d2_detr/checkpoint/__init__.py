"""Checkpoints: loading with clear errors (strictly for evaluation and inference), conversion of original
DETR, Deformable DETR, DINO and torchvision ResNet weights to d2_detr's names, and ``torchvision://`` weights paths
(registered on Detectron2's PathManager on import)."""
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
from .convert_dino import convert_dino_state_dict, is_dino_state_dict
from .convert_deformable import (
    COCO_SIGMOID_HEAD_ROWS,
    coco_sigmoid_class_head_rows,
    convert_deformable_detr_state_dict,
    deformable_detr_variant,
    is_deformable_detr_state_dict,
)
from .loading import (
    CheckedCheckpointer,
    CheckpointError,
    UnreadableCheckpointError,
    load_checkpoint_strict,
    load_inference_weights,
)
from .torchvision_weights import TorchvisionHandler, parse_torchvision_path, resolve_torchvision_weights

__all__ = [
    "CheckedCheckpointer",
    "CheckpointError",
    "UnreadableCheckpointError",
    "COCO_NO_OBJECT_ROW",
    "COCO_SIGMOID_HEAD_ROWS",
    "COCO_PANOPTIC_NO_OBJECT_ROW",
    "DETR_CHECKPOINT_DESCRIPTION",
    "TORCHVISION_RESNET_DESCRIPTION",
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
    "load_checkpoint_strict",
    "load_inference_weights",
    "load_state_dict_file",
    "resnet_depth",
    "parse_torchvision_path",
    "resolve_torchvision_weights",
    "save_converted_checkpoint",
    "TorchvisionHandler",
]

PathManager.register_handler(TorchvisionHandler())
