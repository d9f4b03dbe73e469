"""The DETR family's model parts, each registered so that a config can swap it."""
from . import (  # noqa: F401  (registration)
    backbone,
    criterion,
    deformable_transformer,
    dino_criterion,
    dino_transformer,
    focal,
    mask_losses,
    matcher,
    segmentation,
    transformer,
)
from .deformable_detr import DeformableDetr
from .detr import Detr
from .dino import Dino
from .registry import (
    DETR_CRITERION_REGISTRY,
    DETR_MASK_HEAD_REGISTRY,
    DETR_MATCHER_REGISTRY,
    DETR_POSITION_ENCODING_REGISTRY,
    DETR_TRANSFORMER_REGISTRY,
    build_criterion,
    build_mask_head,
    build_matcher,
    build_position_encoding,
    build_transformer,
)

__all__ = [
    "DeformableDetr",
    "Detr",
    "Dino",
    "DETR_CRITERION_REGISTRY",
    "DETR_MASK_HEAD_REGISTRY",
    "DETR_MATCHER_REGISTRY",
    "DETR_POSITION_ENCODING_REGISTRY",
    "DETR_TRANSFORMER_REGISTRY",
    "build_criterion",
    "build_mask_head",
    "build_matcher",
    "build_position_encoding",
    "build_transformer",
]
