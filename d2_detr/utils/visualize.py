"""Inference on image files and drawings of DETR's predictions, shared by ``tools/demo.py`` and the quickstart.

Typical use::

    model = load_inference_model(cfg)                  # builds the model, loads MODEL.WEIGHTS strictly
    predictor = DetrPredictor(cfg, model)
    metadata = dataset_metadata(cfg)
    for path in find_images(["photos/", "more/*.jpg"]):
        image = read_image_rgb(path)
        drawing = visualize_predictions(image, predictor(image), metadata, threshold=0.5)
        save_image(drawing, "out/" + ...)

    visualize_dataset_predictions(cfg, model, "synthetic_shapes_val", "output/vis", num_images=6)

Every problem with what a user passed (an image, an input pattern, the checkpoint, the config) raises
:class:`InputError`, whose message names the file or config key and says what to do, so command-line tools can
print it instead of a traceback.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from torch import nn

from ..checkpoint.loading import CheckpointError, load_inference_weights
from ..data.dataset_mapper import build_detr_augmentation
from ..engine.trainer import DetrTrainer

__all__ = [
    "IMAGE_EXTENSIONS",
    "InputError",
    "DetrPredictor",
    "find_images",
    "read_image_rgb",
    "output_paths",
    "save_image",
    "dataset_metadata",
    "load_inference_model",
    "visualize_predictions",
    "visualize_dataset_predictions",
]

logger = logging.getLogger(__name__)

#: File name endings (lower case) taken from folders and glob patterns.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

class InputError(ValueError):
    """Something the user passed (image, input pattern, checkpoint, config) cannot be used; the message says
    which and what to do."""


def _has_glob_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _is_image_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def find_images(patterns: Iterable[str]) -> List[str]:
    """Image files named by ``patterns``, in the given order, each once.

    A pattern is an image path (taken whatever its extension), a folder (its files ending in one of
    :data:`IMAGE_EXTENSIONS`, sorted, not recursive) or a glob pattern (``**`` recurses; matching files with an
    image extension, sorted). Raises :class:`InputError` for a pattern that yields no image.
    """
    found: List[str] = []
    seen = set()
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if os.path.isdir(path):
            matches = [os.path.join(path, name) for name in sorted(os.listdir(path))
                       if _is_image_file(os.path.join(path, name))]
            if not matches:
                raise InputError(f"input folder {pattern!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)}); "
                                 "pass a folder with images, image paths or a glob pattern.")
        elif os.path.isfile(path):
            matches = [path]
        elif _has_glob_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if _is_image_file(p))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no image file ({', '.join(IMAGE_EXTENSIONS)}); "
                                 "check the pattern and quote it so the shell does not expand it.")
        else:
            raise InputError(f"input {pattern!r} does not exist; pass an image path, a folder or a glob pattern.")
        for match in matches:
            key = os.path.abspath(match)
            if key not in seen:
                seen.add(key)
                found.append(match)
    return found


def read_image_rgb(path: str) -> np.ndarray:
    """The image at ``path`` as an HxWx3 uint8 RGB array (EXIF orientation applied, grayscale and RGBA
    converted). Raises :class:`InputError` naming the file when it cannot be read."""
    try:
        return utils.read_image(path, format="RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path!r} ({type(e).__name__}: {e}); check that the file exists and "
                         "is a valid image (PNG, JPEG, ...), or remove it from the input.") from e


def output_paths(image_paths: Sequence[str], output_dir: str, suffix: str = ".png") -> List[str]:
    """One output path per image in ``output_dir``: the image's base name with ``suffix``. Images sharing a
    base name get ``_2``, ``_3``, ... so none overwrites another."""
    paths: List[str] = []
    used = set()
    for image_path in image_paths:
        stem = os.path.splitext(os.path.basename(image_path))[0]
        name, n = stem + suffix, 1
        while name in used:
            n += 1
            name = f"{stem}_{n}{suffix}"
        if n > 1:
            logger.warning("Another input is also named %r; writing %s for %s", stem, name, image_path)
        used.add(name)
        paths.append(os.path.join(output_dir, name))
    return paths


def save_image(image_rgb: np.ndarray, path: str) -> None:
    """Write an HxWx3 uint8 RGB array to ``path`` (format from the extension), creating its folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image_rgb)).save(path)


def dataset_metadata(cfg: CfgNode) -> Metadata:
    """Metadata (class names) of ``cfg.DATASETS.TEST[0]``, or empty metadata when the config names no test
    dataset."""
    if len(cfg.DATASETS.TEST):
        return MetadataCatalog.get(cfg.DATASETS.TEST[0])
    return Metadata()


def load_inference_model(cfg: CfgNode) -> nn.Module:
    """Build the model of ``cfg`` (``DetrTrainer.build_model``) in eval mode on ``cfg.MODEL.DEVICE`` and load
    ``cfg.MODEL.WEIGHTS`` strictly (``d2_detr.checkpoint.load_inference_weights``; ``TEST.STRICT_WEIGHTS``).

    Raises :class:`InputError` for an unavailable device, a config that cannot be built, or an empty, unreadable
    or (strict) not matching MODEL.WEIGHTS.
    """
    device = str(cfg.MODEL.DEVICE)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"MODEL.DEVICE is {device!r} but CUDA is not available here; pass MODEL.DEVICE cpu.")
    try:
        model = DetrTrainer.build_model(cfg)
    except ValueError as e:
        raise InputError(f"cannot build the model from the config: {e}") from e
    model.eval()
    try:
        load_inference_weights(model, cfg)
    except CheckpointError as e:
        raise InputError(str(e)) from e
    return model


class DetrPredictor:
    """Detectron2's ``DefaultPredictor`` for a model already built and loaded, taking RGB images.

    Applies the test-time resize of evaluation (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``), converts to
    ``cfg.INPUT.FORMAT`` and returns the image's ``Instances`` on the CPU, with boxes in the input's size.
    """

    def __init__(self, cfg: CfgNode, model: nn.Module):
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise InputError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not supported for inference; use RGB or BGR.")
        self.model = model
        self.input_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(build_detr_augmentation(cfg, is_train=False)[0])

    def __call__(self, image_rgb: np.ndarray) -> Instances:
        """Predictions for one HxWx3 uint8 RGB image."""
        height, width = image_rgb.shape[:2]
        image = image_rgb if self.input_format == "RGB" else image_rgb[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)).astype("float32"))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outputs = self.model([{"image": tensor, "height": height, "width": width}])
        finally:
            self.model.train(was_training)
        return outputs[0]["instances"].to("cpu")


def visualize_predictions(image_rgb: np.ndarray, instances: Instances, metadata: Optional[Metadata] = None,
                          threshold: float = 0.5, scale: float = 1.0) -> np.ndarray:
    """Draw the boxes, class names and scores of the predictions scoring at least ``threshold`` on a copy of
    ``image_rgb`` with Detectron2's ``Visualizer``; return it as RGB (the input's size times ``scale``).

    ``metadata`` provides ``thing_classes`` for the labels (class ids are shown without it).
    """
    instances = instances.to("cpu")
    keep = instances[instances.scores >= threshold] if instances.has("scores") else instances
    visualizer = Visualizer(image_rgb, metadata if metadata is not None else Metadata(), scale=scale)
    return visualizer.draw_instance_predictions(keep).get_image()


def _draw_ground_truth(image_rgb: np.ndarray, dataset_dict: Dict, metadata: Metadata) -> np.ndarray:
    """Ground-truth boxes and class names of a dataset dict (no masks, to compare like with like)."""
    boxes_only = dict(dataset_dict)
    boxes_only["annotations"] = [{k: v for k, v in ann.items() if k != "segmentation"}
                                 for ann in dataset_dict.get("annotations", [])]
    return Visualizer(image_rgb, metadata).draw_dataset_dict(boxes_only).get_image()


def visualize_dataset_predictions(cfg: CfgNode, model: nn.Module, dataset_name: str, output_dir: str,
                                  num_images: int = 6, threshold: float = 0.5,
                                  with_ground_truth: bool = True) -> List[str]:
    """Draw the model's predictions on the first ``num_images`` images of a registered dataset and write one
    PNG per image to ``output_dir``; return the paths written.

    With ``with_ground_truth`` and annotations in the dataset, each PNG shows the ground truth (left) beside
    the predictions (right). ``model`` is put in eval mode for the drawings and its mode restored afterwards;
    ``cfg`` gives the test-time resize and input format.
    """
    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    metadata = MetadataCatalog.get(dataset_name)
    predictor = DetrPredictor(cfg, model)
    targets = output_paths([d["file_name"] for d in dicts], output_dir)
    for dataset_dict, target in zip(dicts, targets):
        image = read_image_rgb(dataset_dict["file_name"])
        drawing = visualize_predictions(image, predictor(image), metadata, threshold)
        if with_ground_truth and "annotations" in dataset_dict:
            gt = _draw_ground_truth(image, dataset_dict, metadata)
            gap = np.full((image.shape[0], max(4, image.shape[1] // 32), 3), 255, dtype=np.uint8)
            drawing = np.concatenate([gt, gap, drawing], axis=1)
        save_image(drawing, target)
    logger.info("Wrote %d drawings of %s predictions (score >= %.2f) to %s",
                len(targets), dataset_name, threshold, output_dir)
    return targets
