"""DETR's dataset mapper: Detectron2 dataset dicts -> model inputs, with DETR's augmentation."""
import copy
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .images import read_dataset_image
from .masks import check_polygon_cropping, rasterize_polygons
from .panoptic import panoptic_annotations_to_instances

logger = logging.getLogger(__name__)

__all__ = ["DetrDatasetMapper", "build_detr_augmentation"]


def build_detr_augmentation(cfg, is_train: bool):
    """DETR's augmentation as two Detectron2 augmentation lists.

    Returns (resize_branch, crop_branch). Training: the resize branch is [flip, resize to one of
    MIN_SIZE_TRAIN]; the crop branch (None when INPUT.CROP is off) is [flip, resize to one of
    CROP.MIN_SIZE_BEFORE_CROP, random crop of CROP.SIZE, resize to one of MIN_SIZE_TRAIN].
    Test: ([resize to MIN_SIZE_TEST], None).
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")], None
    flip = T.RandomFlip(horizontal=True, vertical=False)
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                  cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    if not cfg.INPUT.CROP.ENABLED:
        return [flip, resize], None
    crop = [
        T.ResizeShortestEdge(cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP, sample_style="choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
    ]
    return [flip, resize], [flip, *crop, resize]


class DetrDatasetMapper:
    """Reads the image, applies DETR's augmentation, and builds ``Instances`` of the annotations.

    Crowd annotations are dropped (crowd panoptic segments unless ``panoptic_drop_crowd`` is False); masks are
    kept only when ``mask_on`` (polygons are rasterised before augmentation when ``mask_format`` is "bitmask").
    Boxes that end up empty (zero width or height, or cropped away) are removed. Grayscale and RGBA images are
    converted to ``image_format`` by Detectron2's ``read_image``; a missing or undecodable image raises
    :class:`~d2_detr.data.images.ImageReadError` naming the file.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        crop_augmentations: Optional[List[T.Augmentation]] = None,
        crop_prob: float = 0.5,
        image_format: str = "RGB",
        mask_on: bool = False,
        mask_format: str = "polygon",
        panoptic_drop_crowd: bool = True,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.crop_augmentations = T.AugmentationList(crop_augmentations) if crop_augmentations else None
        self.crop_prob = crop_prob
        self.image_format = image_format
        self.mask_on = mask_on
        self.mask_format = mask_format
        self.panoptic_drop_crowd = panoptic_drop_crowd
        check_polygon_cropping(mask_on and is_train, mask_format, crop_augmentations is not None)
        mode = "training" if is_train else "inference"
        logger.info(f"DETR augmentation for {mode}: {augmentations}; crop branch: {crop_augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augmentations, crop_augmentations = build_detr_augmentation(cfg, is_train)
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "crop_augmentations": crop_augmentations,
            "crop_prob": cfg.INPUT.CROP.PROB,
            "image_format": cfg.INPUT.FORMAT,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
            "panoptic_drop_crowd": cfg.INPUT.PANOPTIC_DROP_CROWD,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_dataset_image(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        augmentations = self.augmentations
        if self.crop_augmentations is not None and np.random.rand() < self.crop_prob:
            augmentations = self.crop_augmentations
        aug_input = T.AugInput(image)
        transforms = augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (h, w)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        dataset_dict["instances"] = self.annotations_to_instances(dataset_dict, transforms, image_shape)
        return dataset_dict

    def annotations_to_instances(
        self, dataset_dict: Dict, transforms: T.TransformList, image_shape: Tuple[int, int]
    ) -> Instances:
        """Ground truth of a training image: its non-crowd ``annotations`` (popped from ``dataset_dict``)
        transformed like the image (now of size ``image_shape``), as Instances without empty ones; for a
        panoptic dataset dict, its segments (d2_detr.data.panoptic)."""
        if "pan_seg_file_name" in dataset_dict:
            return panoptic_annotations_to_instances(dataset_dict, transforms, image_shape, self.panoptic_drop_crowd)
        original_shape = (dataset_dict["height"], dataset_dict["width"])  # set by check_image_size
        annos = [
            utils.transform_instance_annotations(self._strip(obj, original_shape), transforms, image_shape)
            for obj in dataset_dict.pop("annotations", [])
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.mask_format)
        return utils.filter_empty_instances(instances)

    def _strip(self, obj: Dict, original_shape: Tuple[int, int]) -> Dict:
        """Drop what the model does not use, so it is not transformed for nothing; rasterise polygons for
        bitmask masks."""
        obj.pop("keypoints", None)
        if not self.mask_on:
            obj.pop("segmentation", None)
        elif self.mask_format == "bitmask":
            rasterize_polygons(obj, *original_shape)
        return obj
