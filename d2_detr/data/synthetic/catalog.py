"""Generated datasets in Detectron2's catalogs: their files exist whenever Detectron2 asks for them.

A generated dataset is registered like any other (``register_coco_instances``, ``register_coco_panoptic``), then
:func:`track_synthetic_dataset` makes it generate its files on demand: loading it from ``DatasetCatalog`` and
reading a file path of its metadata (``json_file``, ``image_root``, ``panoptic_json``, ``panoptic_root``; e.g.
``COCOEvaluator`` opening ``json_file``) first generate the files if needed. Nothing is generated at
registration; ``MetadataCatalog.get(name).as_dict()`` shows the paths without generating anything.
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .coco import ANNOTATIONS_FILE, IMAGES_DIR, generate_synthetic_shapes
from .render import SYNTHETIC_CLASSES, SyntheticShapesConfig
from .store import default_root

__all__ = [
    "BUILTIN_SYNTHETIC_DATASETS",
    "FILE_ATTRIBUTES",
    "GeneratedDatasetMetadata",
    "ensure_all_generated",
    "ensure_generated",
    "is_synthetic_dataset",
    "register_all",
    "register_builtin_synthetic",
    "register_synthetic_shapes",
    "track_synthetic_dataset",
]

# Name -> a call generating the dataset's files if needed and returning its json_file.
_GENERATORS: Dict[str, Callable[[], str]] = {}

#: Metadata attributes holding paths to a generated dataset's files: reading one generates the files first.
FILE_ATTRIBUTES = frozenset({"json_file", "image_root", "panoptic_json", "panoptic_root"})


class GeneratedDatasetMetadata(Metadata):
    """Detectron2 ``Metadata`` of a dataset tracked by :func:`track_synthetic_dataset`: reading one of its
    :data:`FILE_ATTRIBUTES` generates the dataset's files if needed, so the path it returns exists."""

    def __getattribute__(self, key: str) -> Any:
        if key in FILE_ATTRIBUTES:
            values = object.__getattribute__(self, "__dict__")
            generate = _GENERATORS.get(values.get("name", ""))
            if key in values and generate is not None:
                generate()
        return super().__getattribute__(key)


def track_synthetic_dataset(name: str, generate: Callable[[], str]) -> None:
    """Make the registered dataset ``name`` generate its files with ``generate`` (which does nothing if they are
    up to date, and returns the dataset's json file) whenever Detectron2 asks for them: before
    ``DatasetCatalog.get(name)`` loads them, and before a file path of its metadata is read. Also what
    :func:`ensure_generated` calls. For variants registered elsewhere (e.g. the panoptic one).

    Raises:
        KeyError: ``name`` is not registered in ``DatasetCatalog``.
    """
    if name not in DatasetCatalog:
        raise KeyError(f"{name!r} is not registered in DatasetCatalog; register it (e.g. with Detectron2's "
                       "register_coco_instances) before tracking it as a generated dataset")
    load = DatasetCatalog[name]

    def generate_then_load():
        generate()
        return load()

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, generate_then_load)
    MetadataCatalog[name] = GeneratedDatasetMetadata(**MetadataCatalog.get(name).as_dict())
    _GENERATORS[name] = generate


def is_synthetic_dataset(name: str) -> bool:
    """Whether ``name`` was registered as a generated dataset (:func:`track_synthetic_dataset`)."""
    return name in _GENERATORS


def ensure_generated(name: str) -> str:
    """Generate the files of the registered synthetic dataset ``name`` if needed; return its ``json_file``.

    Raises ``KeyError`` if ``name`` is not a registered synthetic dataset.
    """
    if name not in _GENERATORS:
        raise KeyError(f"{name!r} is not a registered synthetic dataset; registered: {sorted(_GENERATORS)}")
    return _GENERATORS[name]()


def ensure_all_generated(names: Iterable[str]) -> None:
    """:func:`ensure_generated` for every synthetic dataset among ``names``; other names are ignored."""
    for name in names:
        if is_synthetic_dataset(name):
            ensure_generated(name)


def register_all(datasets: Mapping[str, SyntheticShapesConfig], register: Callable[..., None],
                 root: Optional[str]) -> None:
    """``register(name, root=root, **fields of config)`` for each ``(name, config)`` of ``datasets`` whose name
    is not registered yet."""
    registered = set(DatasetCatalog.list())
    for name, config in datasets.items():
        if name not in registered:
            register(name, root=root, **dataclasses.asdict(config))


#: Names registered by :func:`register_builtin_synthetic` and their configs.
BUILTIN_SYNTHETIC_DATASETS: Dict[str, SyntheticShapesConfig] = {
    "synthetic_shapes_train": SyntheticShapesConfig(num_images=2000, seed=0),
    "synthetic_shapes_val": SyntheticShapesConfig(num_images=200, seed=1),
    "synthetic_shapes_train_small": SyntheticShapesConfig(num_images=32, seed=2),
    "synthetic_shapes_val_small": SyntheticShapesConfig(num_images=16, seed=3),
}


def register_synthetic_shapes(
    name: str,
    *,
    num_images: int,
    seed: int,
    image_size: Union[int, Tuple[int, int]] = 128,
    max_objects: int = 5,
    empty_fraction: float = 0.1,
    object_size: Tuple[float, float] = (0.12, 0.6),
    root: Optional[str] = None,
) -> None:
    """Register a synthetic-shapes dataset in Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

    Files live in ``<root>/<name>/`` (``root`` defaults to ``$DETECTRON2_DATASETS`` or ``datasets``) and are
    generated when Detectron2 first needs them (see :mod:`d2_detr.data.synthetic.catalog`) or by
    :func:`ensure_generated`. Registered with Detectron2's ``register_coco_instances``: metadata
    ``thing_classes``, ``json_file``, ``image_root``, ``evaluator_type="coco"`` and
    ``thing_dataset_id_to_contiguous_id``. See :class:`SyntheticShapesConfig` for the other arguments.
    """
    config = SyntheticShapesConfig(
        num_images=num_images,
        seed=seed,
        image_size=image_size,
        max_objects=max_objects,
        empty_fraction=empty_fraction,
        object_size=object_size,
    )
    dataset_dir = os.path.abspath(os.path.join(default_root() if root is None else root, name))
    metadata = {
        "thing_classes": list(SYNTHETIC_CLASSES),
        "thing_dataset_id_to_contiguous_id": {k + 1: k for k in range(len(SYNTHETIC_CLASSES))},
    }
    register_coco_instances(name, metadata, os.path.join(dataset_dir, ANNOTATIONS_FILE),
                            os.path.join(dataset_dir, IMAGES_DIR))
    track_synthetic_dataset(name, functools.partial(generate_synthetic_shapes, dataset_dir, config))


def register_builtin_synthetic(root: Optional[str] = None) -> None:
    """Register :data:`BUILTIN_SYNTHETIC_DATASETS` under ``root``; names already registered are skipped."""
    register_all(BUILTIN_SYNTHETIC_DATASETS, register_synthetic_shapes, root)
