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
partial dataset that looks complete.

Typical use::

    from d2_detr.data.synthetic import register_builtin_synthetic
    register_builtin_synthetic()  # "synthetic_shapes_train", "synthetic_shapes_val", ...
    # cfg.DATASETS.TRAIN = ("synthetic_shapes_train",); cfg.MODEL.DETR.NUM_CLASSES = len(SYNTHETIC_CLASSES)
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, ImageDraw

try:
    import fcntl
except ImportError:  # Windows: no inter-process lock; the atomic rename still prevents partial datasets.
    fcntl = None

__all__ = [
    "SYNTHETIC_CLASSES",
    "BUILTIN_SYNTHETIC_DATASETS",
    "SyntheticShapesConfig",
    "ShapeInstance",
    "RenderedImage",
    "render_image",
    "generate_synthetic_shapes",
    "register_synthetic_shapes",
    "register_builtin_synthetic",
    "is_synthetic_dataset",
    "track_synthetic_dataset",
    "ensure_generated",
    "ensure_all_generated",
    "default_root",
]

logger = logging.getLogger(__name__)

#: Class names; the COCO category id of ``SYNTHETIC_CLASSES[k]`` is ``k + 1``.
SYNTHETIC_CLASSES: Tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross")

#: Bump whenever the drawing or annotation code changes its output, so cached datasets are regenerated.
GENERATOR_VERSION = 1

#: An object whose visible area is below this fraction of its full area is drawn but not annotated.
MIN_VISIBLE_FRACTION = 0.5

ANNOTATIONS_FILE = "annotations.json"
PARAMS_FILE = "params.json"
IMAGES_DIR = "images"

# Colour distance (RGB, L2) an object keeps from the mean of what it covers: usually strong, sometimes weak.
_STRONG_CONTRAST = 100.0
_WEAK_CONTRAST = 40.0
_STRONG_CONTRAST_PROB = 0.85
_COLOUR_ATTEMPTS = 30
# Placement tries to keep centres at least this fraction of the sum of two objects' radii apart.
_MIN_CENTRE_GAP = 0.5
_PLACEMENT_ATTEMPTS = 10
_PROGRESS_EVERY = 500


@dataclass(frozen=True)
class SyntheticShapesConfig:
    """Parameters of one synthetic-shapes dataset; equal configs generate identical datasets.

    Attributes:
        num_images: number of images.
        seed: master seed; image ``i`` uses ``SeedSequence(seed, spawn_key=(i,))``.
        image_size: side of the square images, or ``(min, max)``: each image's height and width are then drawn
            independently and uniformly from that range (inclusive).
        max_objects: most objects drawn in a non-empty image (uniform in ``1..max_objects``).
        empty_fraction: probability that an image has no object at all.
        object_size: ``(min, max)`` diameter of an object's enclosing circle as a fraction of the image's
            shorter side, drawn log-uniformly, the same range for every class.
    """

    num_images: int
    seed: int
    image_size: Union[int, Tuple[int, int]] = 128
    max_objects: int = 5
    empty_fraction: float = 0.1
    object_size: Tuple[float, float] = (0.12, 0.6)

    def __post_init__(self) -> None:
        size = self.image_size
        lo, hi = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        object.__setattr__(self, "image_size", (int(lo), int(hi)))
        object.__setattr__(self, "object_size", (float(self.object_size[0]), float(self.object_size[1])))
        if self.num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {self.num_images}")
        if not 16 <= lo <= hi:
            raise ValueError(f"image_size must satisfy 16 <= min <= max, got {self.image_size}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1], got {self.empty_fraction}")
        if not 0.0 < self.object_size[0] <= self.object_size[1] <= 1.0:
            raise ValueError(f"object_size must satisfy 0 < min <= max <= 1, got {self.object_size}")

    def to_params(self) -> Dict[str, Any]:
        """JSON-compatible parameters, including the generator version; stored next to the dataset."""
        return {
            "generator_version": GENERATOR_VERSION,
            "num_images": int(self.num_images),
            "seed": int(self.seed),
            "image_size": list(self.image_size),
            "max_objects": int(self.max_objects),
            "empty_fraction": float(self.empty_fraction),
            "object_size": list(self.object_size),
            "min_visible_fraction": MIN_VISIBLE_FRACTION,
            "classes": list(SYNTHETIC_CLASSES),
        }


@dataclass
class ShapeInstance:
    """One drawn object.

    Attributes:
        category_id: COCO category id, ``1..len(SYNTHETIC_CLASSES)``.
        colour: RGB fill colour before pixel noise.
        full_area: pixel count of the object as drawn, before occlusion.
        visible_mask: HxW bool mask of the pixels showing this object in the final image.
    """

    category_id: int
    colour: Tuple[int, int, int]
    full_area: int
    visible_mask: np.ndarray = field(repr=False)

    @property
    def visible_area(self) -> int:
        """Number of visible pixels."""
        return int(self.visible_mask.sum())

    @property
    def annotated(self) -> bool:
        """Whether enough of the object is visible for it to be annotated."""
        return self.visible_area >= MIN_VISIBLE_FRACTION * self.full_area


@dataclass
class RenderedImage:
    """An image and its objects in drawing order (later objects occlude earlier ones)."""

    image: np.ndarray = field(repr=False)  # HxWx3 uint8, RGB
    instances: List[ShapeInstance]

    @property
    def annotated_instances(self) -> List[ShapeInstance]:
        """Objects that get an annotation, in drawing order."""
        return [inst for inst in self.instances if inst.annotated]


def default_root() -> str:
    """Directory holding generated datasets: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``: independent of every other image's."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))


def _unit_polygon(category_id: int, rng: np.random.Generator) -> np.ndarray:
    """Vertices (Nx2) of a shape of the class, centred at 0, fitting in the unit circle and touching it."""
    name = SYNTHETIC_CLASSES[category_id - 1]
    if name == "ellipse":
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), rng.uniform(0.55, 1.0) * np.sin(t)], axis=1)
    elif name == "rectangle":
        phi = math.atan(rng.uniform(0.4, 1.0))
        cx, cy = math.cos(phi), math.sin(phi)
        pts = np.array([[cx, cy], [-cx, cy], [-cx, -cy], [cx, -cy]])
    elif name == "triangle":
        angles = np.deg2rad(90.0 + 120.0 * np.arange(3) + rng.uniform(-20.0, 20.0, size=3))
        radii = rng.uniform(0.85, 1.0, size=3)
        radii /= radii.max()
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        t = math.pi / 2.0 + np.arange(10) * math.pi / 5.0
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        pts = np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)
    elif name == "cross":
        a = rng.uniform(0.25, 0.4)
        pts = np.array(
            [[a, 1], [a, a], [1, a], [1, -a], [a, -a], [a, -1], [-a, -1], [-a, -a], [-1, -a], [-1, a], [-a, a], [-a, 1]]
        ) / math.hypot(1.0, a)
    else:
        raise AssertionError(f"no drawing for class {name!r}")
    theta = rng.uniform(0.0, 2.0 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T


def _polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxW bool mask of a filled polygon given by Nx2 (x, y) vertices."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def _blend(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float) -> None:
    """Paint ``colour`` with opacity ``alpha`` over the masked pixels of ``canvas``, in place."""
    canvas[mask] = (1.0 - alpha) * canvas[mask] + alpha * colour


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 HxWx3 background: linear gradient + low-frequency noise + faint distractor lines and blobs."""
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    canvas = (c0 + (c1 - c0) * ramp[..., None]).astype(np.float32)

    grid = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, rng.uniform(5.0, 30.0), size=(3, grid, grid)).astype(np.float32)
    for ch in range(3):
        smooth = Image.fromarray(coarse[ch]).resize((width, height), Image.BICUBIC)
        canvas[..., ch] += np.asarray(smooth, dtype=np.float32)

    side = min(height, width)
    for _ in range(int(rng.integers(0, 7))):
        layer = Image.new("L", (width, height), 0)
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        ImageDraw.Draw(layer).line([(x0, y0), (x1, y1)], fill=1, width=int(rng.integers(1, 3)))
        _blend(canvas, np.asarray(layer, dtype=bool), rng.uniform(0, 255, size=3), rng.uniform(0.3, 0.7))
    for _ in range(int(rng.integers(0, 9))):
        n = int(rng.integers(5, 8))
        t = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        r = side * rng.uniform(0.01, 0.04) * rng.uniform(0.5, 1.0, size=n)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        blob = _polygon_mask(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1), height, width)
        _blend(canvas, blob, rng.uniform(0, 255, size=3), rng.uniform(0.3, 0.7))
    return canvas


def _pick_colour(rng: np.random.Generator, covered_mean: np.ndarray) -> np.ndarray:
    """A uniformly random RGB colour, resampled until it contrasts with what the object covers."""
    min_dist = _STRONG_CONTRAST if rng.random() < _STRONG_CONTRAST_PROB else _WEAK_CONTRAST
    colour = rng.integers(0, 256, size=3)
    for _ in range(_COLOUR_ATTEMPTS):
        if np.linalg.norm(colour - covered_mean) >= min_dist:
            break
        colour = rng.integers(0, 256, size=3)
    return colour


def _place(
    rng: np.random.Generator, radius: float, height: int, width: int, placed: List[Tuple[float, float, float]]
) -> Tuple[float, float]:
    """A centre keeping the object inside the image, preferring ones that do not bury earlier objects."""
    for _ in range(_PLACEMENT_ATTEMPTS):
        cx = rng.uniform(radius, width - 1 - radius)
        cy = rng.uniform(radius, height - 1 - radius)
        if all(math.hypot(cx - px, cy - py) >= _MIN_CENTRE_GAP * (radius + pr) for px, py, pr in placed):
            break
    return cx, cy


def render_image(config: SyntheticShapesConfig, index: int) -> RenderedImage:
    """Draw image ``index`` of the dataset described by ``config``; depends only on ``(config, index)``."""
    rng = _image_rng(config.seed, index)
    lo, hi = config.image_size
    height, width = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    canvas = _background(rng, height, width)

    num_objects = 0 if rng.random() < config.empty_fraction else int(rng.integers(1, config.max_objects + 1))
    side = min(height, width)
    log_lo, log_hi = math.log(config.object_size[0]), math.log(config.object_size[1])
    owner = np.full((height, width), -1, dtype=np.int32)
    drawn: List[Tuple[int, np.ndarray, int, int]] = []
    placed: List[Tuple[float, float, float]] = []
    for k in range(num_objects):
        category_id = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
        radius = 0.5 * side * math.exp(rng.uniform(log_lo, log_hi))
        radius = min(radius, 0.5 * (side - 1))
        cx, cy = _place(rng, radius, height, width, placed)
        placed.append((cx, cy, radius))
        mask = _polygon_mask(_unit_polygon(category_id, rng) * radius + (cx, cy), height, width)
        if not mask.any():
            continue
        colour = _pick_colour(rng, canvas[mask].mean(axis=0))
        canvas[mask] = colour
        owner[mask] = k
        drawn.append((category_id, colour, k, int(mask.sum())))

    sigma = rng.uniform(2.0, 8.0)
    canvas += rng.normal(0.0, sigma, size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    instances = [
        ShapeInstance(
            category_id=category_id,
            colour=(int(colour[0]), int(colour[1]), int(colour[2])),
            full_area=full_area,
            visible_mask=owner == k,
        )
        for category_id, colour, k, full_area in drawn
    ]
    return RenderedImage(image=image, instances=instances)


def _annotation(instance: ShapeInstance, ann_id: int, image_id: int) -> Dict[str, Any]:
    """COCO annotation of an object's visible pixels: tight XYWH box, pixel area, RLE segmentation."""
    mask = instance.visible_mask
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
    }


def _dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _write_dataset(dataset_dir: str, config: SyntheticShapesConfig) -> int:
    """Write images, ``annotations.json`` and finally ``params.json`` into an existing empty directory.

    Returns the number of annotations written.
    """
    images_dir = os.path.join(dataset_dir, IMAGES_DIR)
    os.makedirs(images_dir)
    params = config.to_params()
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    digits = max(6, len(str(max(config.num_images - 1, 0))))
    for index in range(config.num_images):
        rendered = render_image(config, index)
        image_id = index + 1  # COCO ids start at 1: COCOeval treats id 0 as "unmatched".
        file_name = f"{index:0{digits}d}.png"
        Image.fromarray(rendered.image).save(os.path.join(images_dir, file_name), format="PNG")
        height, width = rendered.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for instance in rendered.annotated_instances:
            annotations.append(_annotation(instance, len(annotations) + 1, image_id))
        if (index + 1) % _PROGRESS_EVERY == 0 and index + 1 < config.num_images:
            logger.info("Synthetic shapes: drew %d/%d images ...", index + 1, config.num_images)
    coco = {
        "info": {"description": "d2_detr synthetic shapes", "version": str(GENERATOR_VERSION), "params": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    with open(os.path.join(dataset_dir, ANNOTATIONS_FILE), "w", encoding="utf-8") as f:
        f.write(_dumps(coco))
    with open(os.path.join(dataset_dir, PARAMS_FILE), "w", encoding="utf-8") as f:
        f.write(_dumps(params))
    return len(annotations)


def _is_complete(dataset_dir: str, config: SyntheticShapesConfig) -> bool:
    """Whether ``dataset_dir`` holds a finished dataset generated with ``config``'s parameters."""
    params_path = os.path.join(dataset_dir, PARAMS_FILE)
    if not (os.path.isfile(params_path) and os.path.isfile(os.path.join(dataset_dir, ANNOTATIONS_FILE))):
        return False
    try:
        with open(params_path, encoding="utf-8") as f:
            return json.load(f) == config.to_params()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_path`` (a no-op where ``fcntl`` is unavailable)."""
    with open(lock_path, "a", encoding="utf-8") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def generate_synthetic_shapes(
    dataset_dir: str,
    config: SyntheticShapesConfig,
    writer: Optional[Callable[[str, SyntheticShapesConfig], int]] = None,
) -> str:
    """Make sure ``dataset_dir`` holds the dataset described by ``config``; return its ``annotations.json``.

    Does nothing if the directory already holds it (same parameters). Otherwise the dataset is drawn into a
    temporary sibling directory that then replaces ``dataset_dir``, under a lock so concurrent callers
    generate it once. Temporary directories left by interrupted runs are removed. ``writer(dir, config)``
    (default: the detection dataset's) fills the temporary directory, ``params.json`` last, and returns the
    number of annotations (variants such as the panoptic one bring their own).
    """
    dataset_dir = os.path.abspath(dataset_dir)
    json_file = os.path.join(dataset_dir, ANNOTATIONS_FILE)
    if _is_complete(dataset_dir, config):
        return json_file
    parent, base = os.path.split(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_prefix = f".{base}.tmp-"
    with _exclusive(os.path.join(parent, f".{base}.lock")):
        if _is_complete(dataset_dir, config):
            return json_file
        for entry in os.listdir(parent):
            if entry.startswith(tmp_prefix):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        logger.info("Generating synthetic shapes dataset (%d images) in %s", config.num_images, dataset_dir)
        start = time.perf_counter()
        tmp_dir = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
        try:
            num_annotations = (writer or _write_dataset)(tmp_dir, config)
            if os.path.lexists(dataset_dir):
                stale = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
                os.replace(dataset_dir, os.path.join(stale, base))
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp_dir, dataset_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info(
        "Wrote %d images with %d objects to %s in %.1f s",
        config.num_images,
        num_annotations,
        dataset_dir,
        time.perf_counter() - start,
    )
    return json_file


# ---------------------------------------------------------------------------------------------------------------
# Detectron2 registration
# ---------------------------------------------------------------------------------------------------------------

# Name -> a call generating the dataset's files if needed and returning its json_file.
_REGISTERED: Dict[str, Callable[[], str]] = {}

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

    Files live in ``<root>/<name>/`` (``root`` defaults to :func:`default_root`) and are generated by the first
    ``DatasetCatalog.get(name)`` or :func:`ensure_generated` call. Metadata: ``thing_classes``, ``json_file``,
    ``image_root``, ``evaluator_type="coco"`` and ``thing_dataset_id_to_contiguous_id``.
    See :class:`SyntheticShapesConfig` for the other arguments.
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
    json_file = os.path.join(dataset_dir, ANNOTATIONS_FILE)
    image_root = os.path.join(dataset_dir, IMAGES_DIR)

    def load() -> List[Dict[str, Any]]:
        generate_synthetic_shapes(dataset_dir, config)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(SYNTHETIC_CLASSES),
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SYNTHETIC_CLASSES))},
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
    )
    track_synthetic_dataset(name, functools.partial(generate_synthetic_shapes, dataset_dir, config))


def register_builtin_synthetic(root: Optional[str] = None) -> None:
    """Register :data:`BUILTIN_SYNTHETIC_DATASETS` under ``root``; names already registered are skipped."""
    registered = set(DatasetCatalog.list())
    for name, config in BUILTIN_SYNTHETIC_DATASETS.items():
        if name in registered:
            continue
        register_synthetic_shapes(
            name,
            num_images=config.num_images,
            seed=config.seed,
            image_size=config.image_size,
            max_objects=config.max_objects,
            empty_fraction=config.empty_fraction,
            object_size=config.object_size,
            root=root,
        )


def track_synthetic_dataset(name: str, generate: Callable[[], str]) -> None:
    """Make ``generate`` (generating the files of the registered dataset ``name`` if needed, returning its
    json file) what :func:`ensure_generated` calls for ``name``; for variants registered elsewhere."""
    _REGISTERED[name] = generate


def is_synthetic_dataset(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register_synthetic_shapes`."""
    return name in _REGISTERED


def ensure_generated(name: str) -> str:
    """Generate the files of the registered synthetic dataset ``name`` if needed; return its ``json_file``.

    Call it before anything opens ``MetadataCatalog.get(name).json_file`` directly (e.g. ``COCOEvaluator``).
    Raises ``KeyError`` if ``name`` is not a registered synthetic dataset.
    """
    if name not in _REGISTERED:
        raise KeyError(f"{name!r} is not a registered synthetic dataset; registered: {sorted(_REGISTERED)}")
    return _REGISTERED[name]()


def ensure_all_generated(names: Iterable[str]) -> None:
    """:func:`ensure_generated` for every synthetic dataset among ``names``; other names are ignored."""
    for name in names:
        if is_synthetic_dataset(name):
            ensure_generated(name)
