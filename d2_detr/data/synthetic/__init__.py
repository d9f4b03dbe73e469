"""A built-in synthetic detection dataset ("synthetic shapes") to train and evaluate DETR without COCO.

Every image shows 0..N filled shapes of :data:`SYNTHETIC_CLASSES` on a textured background (random
gradient, low-frequency colour noise, faint distractor lines and blobs, pixel noise). The task is fair:

* an object's colour is drawn independently of its class (only its contrast to the background underneath is
  controlled), so colour says nothing about the class;
* every class draws its size from the same range (12%-60% of the shorter image side by default), so size
  alone says little about the class;
* objects overlap; later objects occlude earlier ones, and an object less than half visible is drawn but not
  annotated.

Images are drawn with numpy and PIL from ``numpy.random.Generator(PCG64(...))`` seeded per image from
``SeedSequence(seed, spawn_key=(index,))``, so image ``i`` does not depend on how many images come before it and
the same parameters always give byte-identical ``annotations.json``.

A dataset is written once to ``<root>/<name>/{images/*.png, annotations.json, params.json}`` (``root`` defaults to
``$DETECTRON2_DATASETS`` or ``datasets``, Detectron2's convention) and regenerated whenever its parameters
change. Generation happens in a temporary directory renamed into place, so an interrupted run never leaves a
partial dataset that looks complete. It happens when Detectron2 first needs the files: loading the dataset from
``DatasetCatalog``, or reading a file path of its metadata (``COCOEvaluator`` opening ``json_file``).

Modules: :mod:`.render` draws the images, :mod:`.coco` writes them in COCO format, :mod:`.store` keeps generated
datasets on disk, :mod:`.catalog` registers them in Detectron2's catalogs.

Typical use::

    from d2_detr.data.synthetic import register_builtin_synthetic
    register_builtin_synthetic()  # "synthetic_shapes_train", "synthetic_shapes_val", ...
    # cfg.DATASETS.TRAIN = ("synthetic_shapes_train",); cfg.MODEL.DETR.NUM_CLASSES = len(SYNTHETIC_CLASSES)
"""
from .catalog import (
    BUILTIN_SYNTHETIC_DATASETS,
    ensure_all_generated,
    ensure_generated,
    is_synthetic_dataset,
    register_builtin_synthetic,
    register_synthetic_shapes,
    track_synthetic_dataset,
)
from .coco import ANNOTATIONS_FILE, IMAGES_DIR, generate_synthetic_shapes
from .render import (
    GENERATOR_VERSION,
    MIN_VISIBLE_FRACTION,
    SYNTHETIC_CLASSES,
    RenderedImage,
    ShapeInstance,
    SyntheticShapesConfig,
    render_image,
)
from .store import PARAMS_FILE, default_root

__all__ = [
    "ANNOTATIONS_FILE",
    "BUILTIN_SYNTHETIC_DATASETS",
    "GENERATOR_VERSION",
    "IMAGES_DIR",
    "MIN_VISIBLE_FRACTION",
    "PARAMS_FILE",
    "RenderedImage",
    "SYNTHETIC_CLASSES",
    "ShapeInstance",
    "SyntheticShapesConfig",
    "default_root",
    "ensure_all_generated",
    "ensure_generated",
    "generate_synthetic_shapes",
    "is_synthetic_dataset",
    "register_builtin_synthetic",
    "register_synthetic_shapes",
    "render_image",
    "track_synthetic_dataset",
]
