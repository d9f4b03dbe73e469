"""Drawing of the synthetic shapes: an image and its objects from ``(parameters, index)`` alone.

See :mod:`d2_detr.data.synthetic` for what the images show and why the task is fair.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SYNTHETIC_CLASSES",
    "GENERATOR_VERSION",
    "MIN_VISIBLE_FRACTION",
    "SyntheticShapesConfig",
    "ShapeInstance",
    "RenderedImage",
    "image_rng",
    "render_image",
]

#: Class names; the COCO category id of ``SYNTHETIC_CLASSES[k]`` is ``k + 1``.
SYNTHETIC_CLASSES: Tuple[str, ...] = ("ellipse", "rectangle", "triangle", "star", "cross")

#: Bump whenever the drawing or annotation code changes its output, so cached datasets are regenerated.
GENERATOR_VERSION = 1

#: An object whose visible area is below this fraction of its full area is drawn but not annotated.
MIN_VISIBLE_FRACTION = 0.5

# Colour distance (RGB, L2) an object keeps from the mean of what it covers: usually strong, sometimes weak.
_STRONG_CONTRAST = 100.0
_WEAK_CONTRAST = 40.0
_STRONG_CONTRAST_PROB = 0.85
_COLOUR_ATTEMPTS = 30
# Placement tries to keep centres at least this fraction of the sum of two objects' radii apart.
_MIN_CENTRE_GAP = 0.5
_PLACEMENT_ATTEMPTS = 10


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


def image_rng(seed: int, index: int, stream: Optional[int] = None) -> np.random.Generator:
    """The generator of image ``index`` (``SeedSequence(seed, spawn_key=(index,))``): independent of every other
    image's. ``stream`` gives the same image further independent generators (spawn key ``(index, stream)``),
    for what a variant draws on top of the shapes."""
    spawn_key = (int(index),) if stream is None else (int(index), int(stream))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=spawn_key)))


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
    rng = image_rng(config.seed, index)
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
