"""Registries of DETR's swappable parts; each part registers itself in its own module, except the position
encodings: they live in ``d2_detr.layers``, which does not know about these registries, and are registered here.

A config names the part (``MODEL.DETR.TRANSFORMER_NAME`` etc.) and the builder here constructs it with
``cls(cfg)``, which every registered class supports through Detectron2's ``@configurable``.
"""
from detectron2.utils.registry import Registry

from ..layers.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine

DETR_POSITION_ENCODING_REGISTRY = Registry("DETR_POSITION_ENCODING")
DETR_POSITION_ENCODING_REGISTRY.__doc__ = "Position encodings of a feature map; built with cls(cfg)."
DETR_POSITION_ENCODING_REGISTRY.register(PositionEmbeddingSine)
DETR_POSITION_ENCODING_REGISTRY.register(PositionEmbeddingLearned)

DETR_TRANSFORMER_REGISTRY = Registry("DETR_TRANSFORMER")
DETR_TRANSFORMER_REGISTRY.__doc__ = "DETR encoder-decoders; built with cls(cfg)."

DETR_MATCHER_REGISTRY = Registry("DETR_MATCHER")
DETR_MATCHER_REGISTRY.__doc__ = "Matchers between predictions and targets; built with cls(cfg)."

DETR_CRITERION_REGISTRY = Registry("DETR_CRITERION")
DETR_CRITERION_REGISTRY.__doc__ = "Set criteria (losses); built with cls(cfg)."

DETR_MASK_HEAD_REGISTRY = Registry("DETR_MASK_HEAD")
DETR_MASK_HEAD_REGISTRY.__doc__ = "Mask heads (MODEL.MASK_ON); built with cls(cfg, backbone.output_shape())."

# Short names accepted by MODEL.DETR.POSITION_EMBEDDING besides registered class names.
POSITION_ENCODING_ALIASES = {"sine": "PositionEmbeddingSine", "learned": "PositionEmbeddingLearned"}


def build_position_encoding(cfg):
    name = cfg.MODEL.DETR.POSITION_EMBEDDING
    return DETR_POSITION_ENCODING_REGISTRY.get(POSITION_ENCODING_ALIASES.get(name, name))(cfg)


def build_transformer(cfg):
    return DETR_TRANSFORMER_REGISTRY.get(cfg.MODEL.DETR.TRANSFORMER_NAME)(cfg)


def transformer_size_args(cfg) -> dict:
    """The constructor arguments every DETR-family transformer reads from ``MODEL.DETR``: width, heads, depths,
    feed-forward width, dropout, and the oneDNN and attention-kernel options."""
    detr = cfg.MODEL.DETR
    return {
        "d_model": detr.HIDDEN_DIM,
        "nhead": detr.NHEADS,
        "num_encoder_layers": detr.ENC_LAYERS,
        "num_decoder_layers": detr.DEC_LAYERS,
        "dim_feedforward": detr.DIM_FEEDFORWARD,
        "dropout": detr.DROPOUT,
        "onednn_linear": detr.ONEDNN_LINEAR,
        "attention_kernel": detr.ATTENTION_KERNEL,
    }


def build_matcher(cfg):
    return DETR_MATCHER_REGISTRY.get(cfg.MODEL.DETR.MATCHER_NAME)(cfg)


def build_criterion(cfg):
    return DETR_CRITERION_REGISTRY.get(cfg.MODEL.DETR.CRITERION_NAME)(cfg)


def build_mask_head(cfg, input_shape):
    """The mask head ``MODEL.DETR.MASK_HEAD_NAME`` for a backbone with outputs ``input_shape`` (name -> ShapeSpec)."""
    return DETR_MASK_HEAD_REGISTRY.get(cfg.MODEL.DETR.MASK_HEAD_NAME)(cfg, input_shape)
