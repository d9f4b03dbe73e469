"""DETR's data pipeline: dataset mapper, batched test loader, dataset checks, built-in synthetic datasets."""
from .build import build_batched_test_loader
from .categories import dataset_thing_classes
from .check import DatasetCheckError, DatasetProblem, check_dataset_dicts, check_datasets
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from .images import ImageReadError, read_dataset_image
from .synthetic import SYNTHETIC_CLASSES, register_builtin_synthetic, register_synthetic_shapes
from .synthetic_panoptic import PANOPTIC_CLASSES, register_builtin_synthetic_panoptic, register_synthetic_panoptic

register_builtin_synthetic()
register_builtin_synthetic_panoptic()

__all__ = [
    "DatasetCheckError",
    "DatasetProblem",
    "DetrDatasetMapper",
    "ImageReadError",
    "PANOPTIC_CLASSES",
    "SYNTHETIC_CLASSES",
    "build_batched_test_loader",
    "build_detr_augmentation",
    "check_dataset_dicts",
    "check_datasets",
    "dataset_thing_classes",
    "read_dataset_image",
    "register_builtin_synthetic",
    "register_builtin_synthetic_panoptic",
    "register_synthetic_panoptic",
    "register_synthetic_shapes",
]
