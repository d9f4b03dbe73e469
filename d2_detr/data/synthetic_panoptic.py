"""The panoptic variant of the synthetic shapes dataset: things (the shapes) on "stuff" regions, in COCO
panoptic format, registered with Detectron2's ``register_coco_panoptic``.

Each image is the detection dataset's image (:func:`~d2_detr.data.synthetic.render.render_image`, same parameters)
whose background -- every pixel not covered by a drawn shape -- is split into 1..``max_stuff_regions`` regions
(Voronoi cells with wavy borders), each filled with the texture of a random stuff class of
:data:`STUFF_CLASSES`: "smooth" keeps the detection dataset's background, "stripes" and "checks" draw two-colour
stripes and checkerboards of random colours, period and orientation. Colour says nothing about the class; the
texture does.

Panoptic ground truth, as in COCO: one segment per annotated shape (its visible pixels), one segment per stuff
class present (regions of the same class merged), stuff segments below :data:`MIN_STUFF_AREA` pixels and the
pixels of shapes too occluded to be annotated are unlabelled (id 0). Categories: the shapes keep ids 1..5, the
stuff classes get 6..8; Detectron2's contiguous ids put all 8 in one space (things 0..4, stuff 5..7), as its
"standard" COCO panoptic registration does, so DETR predicts stuff as objects with ``NUM_CLASSES`` 8.

Files under ``<root>/<name>/``: ``images/*.jpg`` (Detectron2's COCO panoptic loader expects .jpg images),
``panoptic/*.png`` (segment id = R + 256 G + 256^2 B), ``panoptic.json`` (COCO panoptic), ``annotations.json``
(the things as COCO instances) and ``params.json``; generated when Detectron2 first needs them, like the detection
dataset (:mod:`d2_detr.data.synthetic.catalog`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from detectron2.data.datasets import register_coco_panoptic
from PIL import Image

from .synthetic.catalog import register_all, track_synthetic_dataset
from .synthetic.coco import (
    ANNOTATIONS_FILE,
    IMAGES_DIR,
    coco_annotation,
    generate_synthetic_shapes,
    image_entry,
    image_stem,
    mask_box,
)
from .synthetic.render import SYNTHETIC_CLASSES, ShapeInstance, SyntheticShapesConfig, image_rng, render_image
from .synthetic.store import default_root, write_canonical_json

__all__ = [
    "STUFF_CLASSES",
    "PANOPTIC_CLASSES",
    "BUILTIN_SYNTHETIC_PANOPTIC_DATASETS",
    "SyntheticPanopticConfig",
    "PanopticImage",
    "render_panoptic_image",
    "synthetic_panoptic_metadata",
    "register_synthetic_panoptic",
    "register_builtin_synthetic_panoptic",
]

#: Stuff class names; the COCO category id of ``STUFF_CLASSES[k]`` is ``len(SYNTHETIC_CLASSES) + k + 1``.
STUFF_CLASSES: Tuple[str, ...] = ("smooth", "stripes", "checks")

#: All classes in Detectron2's contiguous order: things, then stuff.
PANOPTIC_CLASSES: Tuple[str, ...] = SYNTHETIC_CLASSES + STUFF_CLASSES

#: Bump whenever the panoptic drawing or annotation changes its output.
PANOPTIC_GENERATOR_VERSION = 1

#: A stuff segment with fewer pixels is left unlabelled.
MIN_STUFF_AREA = 32

PANOPTIC_JSON = "panoptic.json"
PANOPTIC_DIR = "panoptic"
JPEG_QUALITY = 95

# Colour of each class (things, then stuff) for Detectron2's Visualizer.
_CLASS_COLOURS = [
    (220, 20, 60), (0, 130, 200), (255, 180, 0), (60, 180, 75), (145, 30, 180),
    (128, 128, 128), (170, 110, 40), (70, 240, 240),
]
# The stream of image_rng drawing an image's stuff, independent of the one drawing its shapes.
_STUFF_STREAM = 1
# Stripe period / checker cell (pixels) and the colour distance between the two colours of a texture.
_TEXTURE_PERIOD = (6.0, 14.0)
_TEXTURE_CONTRAST = 80.0


@dataclass(frozen=True)
class SyntheticPanopticConfig(SyntheticShapesConfig):
    """:class:`~d2_detr.data.synthetic.render.SyntheticShapesConfig` plus ``max_stuff_regions``: the background is
    split into 1..max_stuff_regions regions, each of a random stuff class."""

    max_stuff_regions: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_stuff_regions < 1:
            raise ValueError(f"max_stuff_regions must be >= 1, got {self.max_stuff_regions}")

    def to_params(self) -> Dict[str, Any]:
        params = super().to_params()
        params.update(
            panoptic_generator_version=PANOPTIC_GENERATOR_VERSION,
            stuff_classes=list(STUFF_CLASSES),
            max_stuff_regions=int(self.max_stuff_regions),
            min_stuff_area=MIN_STUFF_AREA,
            jpeg_quality=JPEG_QUALITY,
        )
        return params


@dataclass
class PanopticImage:
    """A rendered panoptic image.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        segment_ids: (H, W) int32 panoptic ids, 0 = unlabelled.
        segments: ``{"id", "category_id", "isthing"}`` per segment (COCO category ids), things first.
        things: the annotated shapes, in the order of their segments.
    """

    image: np.ndarray = field(repr=False)
    segment_ids: np.ndarray = field(repr=False)
    segments: List[Dict[str, Any]]
    things: List[ShapeInstance]


def _stuff_regions(rng: np.random.Generator, height: int, width: int, max_regions: int) -> np.ndarray:
    """(H, W) region index: Voronoi cells of 1..max_regions random seeds, borders made wavy by warping."""
    num = int(rng.integers(1, max_regions + 1))
    seeds = rng.uniform((0.0, 0.0), (width, height), size=(num, 2))  # (n, 2) x, y
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = min(height, width)
    amplitude = rng.uniform(0.03, 0.08) * side
    frequency = rng.uniform(1.0, 3.0) * 2.0 * math.pi / side
    phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
    xw = xx + amplitude * np.sin(yy * frequency + phase[0])
    yw = yy + amplitude * np.sin(xx * frequency + phase[1])
    dist = (xw[None] - seeds[:, 0, None, None]) ** 2 + (yw[None] - seeds[:, 1, None, None]) ** 2  # (n, H, W)
    return dist.argmin(0)


def _texture(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 two-colour texture of a stuff class: "stripes" or "checks"."""
    first = rng.integers(0, 256, size=3)
    second = rng.integers(0, 256, size=3)
    while np.linalg.norm(first - second) < _TEXTURE_CONTRAST:
        second = rng.integers(0, 256, size=3)
    theta = rng.uniform(0.0, math.pi)
    period = rng.uniform(*_TEXTURE_PERIOD)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if name == "stripes":
        on = (u / period) % 1.0 < 0.5
    elif name == "checks":
        on = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    else:
        raise AssertionError(f"no texture for stuff class {name!r}")
    return np.where(on[..., None], first, second).astype(np.float32)


def render_panoptic_image(config: SyntheticPanopticConfig, index: int) -> PanopticImage:
    """Draw image ``index`` of the panoptic dataset ``config``; depends only on ``(config, index)``."""
    rendered = render_image(config, index)
    image = rendered.image.astype(np.float32)
    height, width = image.shape[:2]
    rng = image_rng(config.seed, index, stream=_STUFF_STREAM)
    covered = np.zeros((height, width), dtype=bool)
    for instance in rendered.instances:
        covered |= instance.visible_mask
    regions = _stuff_regions(rng, height, width, config.max_stuff_regions)  # (H, W)
    region_class = rng.integers(0, len(STUFF_CLASSES), size=int(regions.max()) + 1)
    stuff_class = region_class[regions]  # (H, W) index into STUFF_CLASSES
    sigma = rng.uniform(2.0, 8.0)
    for k, name in enumerate(STUFF_CLASSES):
        target = (stuff_class == k) & ~covered
        if name == "smooth" or not target.any():
            continue
        texture = _texture(name, rng, height, width)
        image[target] = texture[target] + rng.normal(0.0, sigma, size=(int(target.sum()), 3))

    segment_ids = np.zeros((height, width), dtype=np.int32)
    segments: List[Dict[str, Any]] = []
    things = rendered.annotated_instances
    for instance in things:
        segments.append({"id": len(segments) + 1, "category_id": instance.category_id, "isthing": True})
        segment_ids[instance.visible_mask] = segments[-1]["id"]
    for k in range(len(STUFF_CLASSES)):
        mask = (stuff_class == k) & ~covered
        if mask.sum() >= MIN_STUFF_AREA:
            category_id = len(SYNTHETIC_CLASSES) + k + 1
            segments.append({"id": len(segments) + 1, "category_id": category_id, "isthing": False})
            segment_ids[mask] = segments[-1]["id"]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return PanopticImage(image=pixels, segment_ids=segment_ids, segments=segments, things=things)


def _id_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 colours with id = R + 256 G + 256^2 B (COCO panoptic PNG encoding)."""
    return np.stack([(segment_ids >> shift) & 255 for shift in (0, 8, 16)], axis=-1).astype(np.uint8)


def _segment_info(segment: Dict[str, Any], mask: np.ndarray) -> Dict[str, Any]:
    """COCO panoptic ``segments_info`` entry of a segment with pixels ``mask``."""
    return {
        "id": segment["id"],
        "category_id": segment["category_id"],
        "iscrowd": 0,
        "bbox": mask_box(mask),
        "area": int(mask.sum()),
    }


def _categories(things_only: bool = False) -> List[Dict[str, Any]]:
    """COCO categories: the shapes (ids 1..5) and, unless ``things_only``, the stuff classes (6..8)."""
    classes = SYNTHETIC_CLASSES if things_only else PANOPTIC_CLASSES
    return [
        {"id": k + 1, "name": name, "supercategory": "shape" if k < len(SYNTHETIC_CLASSES) else "stuff",
         "isthing": int(k < len(SYNTHETIC_CLASSES)), "color": list(_CLASS_COLOURS[k])}
        for k, name in enumerate(classes)
    ]


def _write_panoptic_dataset(dataset_dir: str, config: SyntheticPanopticConfig) -> int:
    """Write images, panoptic PNGs, ``panoptic.json`` and ``annotations.json`` into an existing empty directory;
    returns the number of segments."""
    images_dir = os.path.join(dataset_dir, IMAGES_DIR)
    panoptic_dir = os.path.join(dataset_dir, PANOPTIC_DIR)
    os.makedirs(images_dir)
    os.makedirs(panoptic_dir)
    images: List[Dict[str, Any]] = []
    instances: List[Dict[str, Any]] = []
    panoptic: List[Dict[str, Any]] = []
    for index in range(config.num_images):
        rendered = render_panoptic_image(config, index)
        image_id = index + 1
        stem = image_stem(index, config.num_images)
        Image.fromarray(rendered.image).save(os.path.join(images_dir, stem + ".jpg"), format="JPEG",
                                             quality=JPEG_QUALITY)
        Image.fromarray(_id_to_rgb(rendered.segment_ids)).save(os.path.join(panoptic_dir, stem + ".png"))
        images.append(image_entry(image_id, stem + ".jpg", rendered.image))
        for thing in rendered.things:
            instances.append(coco_annotation(thing, len(instances) + 1, image_id))
        panoptic.append({
            "image_id": image_id,
            "file_name": stem + ".png",
            "segments_info": [_segment_info(s, rendered.segment_ids == s["id"]) for s in rendered.segments],
        })
    info = {"description": "d2_detr synthetic shapes, panoptic", "version": str(PANOPTIC_GENERATOR_VERSION),
            "params": config.to_params()}
    write_canonical_json(os.path.join(dataset_dir, PANOPTIC_JSON), {
        "info": info, "licenses": [], "images": images, "annotations": panoptic, "categories": _categories()})
    write_canonical_json(os.path.join(dataset_dir, ANNOTATIONS_FILE), {
        "info": info, "licenses": [], "images": images, "annotations": instances,
        "categories": _categories(things_only=True)})
    return sum(len(p["segments_info"]) for p in panoptic)


def synthetic_panoptic_metadata() -> Dict[str, Any]:
    """Detectron2 metadata of the panoptic variant, in the layout of Detectron2's "standard" COCO panoptic
    registration: ``thing_classes`` and ``stuff_classes`` both list all classes (one contiguous space),
    thing ids map to 0..4 and stuff ids to 5..7."""
    num_things = len(SYNTHETIC_CLASSES)
    return {
        "thing_classes": list(PANOPTIC_CLASSES),
        "thing_colors": [list(c) for c in _CLASS_COLOURS],
        "stuff_classes": list(PANOPTIC_CLASSES),
        "stuff_colors": [list(c) for c in _CLASS_COLOURS],
        "thing_dataset_id_to_contiguous_id": {k + 1: k for k in range(num_things)},
        "stuff_dataset_id_to_contiguous_id": {k + 1: k for k in range(num_things, len(PANOPTIC_CLASSES))},
    }


#: Names registered by :func:`register_builtin_synthetic_panoptic` and their configs.
BUILTIN_SYNTHETIC_PANOPTIC_DATASETS: Dict[str, SyntheticPanopticConfig] = {
    "synthetic_panoptic_train": SyntheticPanopticConfig(num_images=2000, seed=10),
    "synthetic_panoptic_val": SyntheticPanopticConfig(num_images=200, seed=11),
    "synthetic_panoptic_train_small": SyntheticPanopticConfig(num_images=32, seed=12),
    "synthetic_panoptic_val_small": SyntheticPanopticConfig(num_images=16, seed=13),
}


def register_synthetic_panoptic(
    name: str,
    *,
    num_images: int,
    seed: int,
    image_size: Union[int, Tuple[int, int]] = 128,
    max_objects: int = 5,
    empty_fraction: float = 0.1,
    object_size: Tuple[float, float] = (0.12, 0.6),
    max_stuff_regions: int = 3,
    root: Optional[str] = None,
) -> None:
    """Register a synthetic panoptic dataset with Detectron2's ``register_coco_panoptic`` (evaluator_type
    "coco_panoptic_seg", so ``COCOPanopticEvaluator`` evaluates it). Files live in ``<root>/<name>/`` and are
    generated when Detectron2 first needs them (:mod:`d2_detr.data.synthetic.catalog`) or by
    ``ensure_generated(name)``. Arguments as :class:`SyntheticPanopticConfig`'s."""
    config = SyntheticPanopticConfig(
        num_images=num_images, seed=seed, image_size=image_size, max_objects=max_objects,
        empty_fraction=empty_fraction, object_size=object_size, max_stuff_regions=max_stuff_regions,
    )
    dataset_dir = os.path.abspath(os.path.join(default_root() if root is None else root, name))
    register_coco_panoptic(
        name,
        synthetic_panoptic_metadata(),
        image_root=os.path.join(dataset_dir, IMAGES_DIR),
        panoptic_root=os.path.join(dataset_dir, PANOPTIC_DIR),
        panoptic_json=os.path.join(dataset_dir, PANOPTIC_JSON),
        instances_json=os.path.join(dataset_dir, ANNOTATIONS_FILE),
    )
    track_synthetic_dataset(name, functools.partial(generate_synthetic_shapes, dataset_dir, config,
                                                    _write_panoptic_dataset))


def register_builtin_synthetic_panoptic(root: Optional[str] = None) -> None:
    """Register :data:`BUILTIN_SYNTHETIC_PANOPTIC_DATASETS` under ``root``; names already registered are skipped."""
    register_all(BUILTIN_SYNTHETIC_PANOPTIC_DATASETS, register_synthetic_panoptic, root)
