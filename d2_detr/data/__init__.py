"""DETR's data pipeline: dataset mapper, batched test loader, built-in synthetic datasets."""
from .build import build_batched_test_loader
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from .synthetic import SYNTHETIC_CLASSES, register_builtin_synthetic, register_synthetic_shapes

register_builtin_synthetic()

__all__ = [
    "DetrDatasetMapper",
    "SYNTHETIC_CLASSES",
    "build_batched_test_loader",
    "build_detr_augmentation",
    "register_builtin_synthetic",
    "register_synthetic_shapes",
]
