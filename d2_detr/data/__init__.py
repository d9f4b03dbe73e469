"""DETR's data pipeline: dataset mapper, batched test loader, built-in synthetic datasets."""
from .build import build_batched_test_loader
from .categories import dataset_thing_classes
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from .synthetic import SYNTHETIC_CLASSES, register_builtin_synthetic, register_synthetic_shapes
from .synthetic_panoptic import PANOPTIC_CLASSES, register_builtin_synthetic_panoptic, register_synthetic_panoptic

register_builtin_synthetic()
register_builtin_synthetic_panoptic()

__all__ = [
    "DetrDatasetMapper",
    "PANOPTIC_CLASSES",
    "SYNTHETIC_CLASSES",
    "build_batched_test_loader",
    "build_detr_augmentation",
    "dataset_thing_classes",
    "register_builtin_synthetic",
    "register_builtin_synthetic_panoptic",
    "register_synthetic_panoptic",
    "register_synthetic_shapes",
]
