"""The ``DeformableDetr`` meta-architecture (Zhu et al. 2021): multi-level backbone features -> deformable
transformer -> sigmoid class and box heads at every decoder layer.

Options: iterative bounding box refinement (each decoder layer refines the previous layer's boxes with its own
heads) and two-stage (the encoder proposes the decoder's reference boxes and queries). Parameter names follow the
original checkpoints (``input_proj.N``, ``transformer.*``, ``query_embed``, ``class_embed.N``, ``bbox_embed.N``);
without refinement the per-layer heads are one shared module, as there.

Padding masks of every level follow the ``feature_padding_mask`` rule (cell valid iff inside ceil(size / stride)),
which, unlike the original's interpolation of the image mask, does not depend on the batch's padded size; for an
image alone both mark nothing. A transformer built with ``padding_invariant=False``
(``MODEL.DEFORMABLE_DETR.PADDING_INVARIANT``) gets the original's masks.
"""
import copy
import math
from typing import Dict, List, Sequence, Tuple

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import Tensor, nn

from ..layers.box_ops import refine_boxes
from ..layers.mlp import MLP
from ..layers.multiscale_projection import MultiScaleProjection
from ..layers.padding_mask import feature_padding_mask, interpolated_padding_mask
from .registry import build_criterion, build_position_encoding, build_transformer
from .set_prediction import SetPredictionModel

__all__ = ["DeformableDetr", "prediction_heads"]

# Initial foreground probability of every class logit (the focal-loss prior).
_PRIOR_PROB = 0.01
# Initial box-head bias of (w, h): boxes start small (sigmoid(-2) = 0.12) around their reference point.
_INITIAL_SIZE_BIAS = -2.0


def prediction_heads(hidden_dim: int, num_classes: int) -> Tuple[nn.Linear, MLP]:
    """A class head (d -> K sigmoid logits, bias at the focal prior 0.01) and a box head (3-layer MLP d -> 4 box
    deltas, last layer zero), initialised as in the original code."""
    class_head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - _PRIOR_PROB) / _PRIOR_PROB))
    box_head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head


@META_ARCH_REGISTRY.register()
class DeformableDetr(SetPredictionModel):
    """Deformable DETR taking and returning Detectron2's standard formats (see
    :class:`~d2_detr.modeling.set_prediction.SetPredictionModel`).

    Inference returns the ``test_topk`` (100 in the paper) best (query, class) pairs of each image by sigmoid score.
    As for ``Detr``, images of different sizes go through the backbone and the input projections one by one at
    inference (the projections' GroupNorm would otherwise see the batch's padding), so an image's detections do
    not depend on its batch neighbours.
    """

    sigmoid_scores = True
    #: Learn a (Q, 2d) query embedding unless the transformer is two-stage (False: the transformer owns its queries).
    learned_query_embed = True

    @configurable
    def __init__(self, *, backbone: Backbone, in_features: Sequence[str], position_encoding: nn.Module,
                 transformer: nn.Module, criterion: nn.Module, num_classes: int, num_queries: int,
                 pixel_mean: Tuple[float, ...], pixel_std: Tuple[float, ...], with_box_refine: bool = False,
                 test_topk: int = 100, fold_frozen_bn: bool = True, channels_last: bool = True,
                 test_backbone_per_image: bool = True):
        """
        Args:
            backbone: any Detectron2 backbone; its ``in_features`` outputs are used, finest first.
            in_features: backbone outputs fed to the transformer (the first levels); the transformer's further
                levels are computed from the last of them (:class:`~d2_detr.layers.MultiScaleProjection`).
            position_encoding: maps a level's padding mask (B, H, W) to encodings (B, d, H, W).
            transformer: a :class:`~d2_detr.modeling.deformable_transformer.DeformableTransformer` (two-stage or not).
            criterion: maps (outputs, targets) to (weighted losses, logging-only metrics), e.g.
                :class:`~d2_detr.modeling.focal.FocalSetCriterion`.
            num_classes: foreground classes = class logits per query (no "no object" logit).
            num_queries: object queries; with a two-stage transformer its number of proposals.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            with_box_refine: iterative bounding box refinement (one head per decoder layer).
            test_topk: (query, class) pairs kept per image at inference; 0 keeps every query with its best class.
            fold_frozen_bn, channels_last: speed options, see
                :class:`~d2_detr.modeling.set_prediction.SetPredictionModel`.
        """
        shapes = backbone.output_shape()
        missing = [name for name in in_features if name not in shapes]
        if missing or not in_features:
            raise ValueError(f"MODEL.DEFORMABLE_DETR.IN_FEATURES={list(in_features)}: {missing or 'none'} not among the "
                             f"backbone's outputs {sorted(shapes)}; list backbone outputs (MODEL.RESNETS.OUT_FEATURES)")
        for attribute in ("num_feature_levels", "num_decoder_layers", "two_stage", "d_model"):
            if not hasattr(transformer, attribute):
                raise ValueError(f"{type(self).__name__} needs a deformable transformer, not "
                                 f"{type(transformer).__name__}: set MODEL.DETR.TRANSFORMER_NAME DeformableTransformer "
                                 "(DinoTransformer for Dino)")
        if getattr(criterion, "num_classes", num_classes) != num_classes:
            raise ValueError(f"The criterion has {criterion.num_classes} classes, the model {num_classes}")
        if transformer.two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(f"A two-stage transformer keeping {transformer.two_stage_num_proposals} proposals gives "
                             f"that many queries, not num_queries={num_queries}")
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, test_topk=test_topk, fold_frozen_bn=fold_frozen_bn,
                         channels_last=channels_last, test_backbone_per_image=test_backbone_per_image)
        self.in_features = list(in_features)
        strides = [shapes[name].stride for name in in_features]
        num_levels = transformer.num_feature_levels
        self.level_strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(num_levels - len(strides))]
        self.position_encoding = position_encoding
        self.transformer = transformer
        self.with_box_refine = with_box_refine
        self.two_stage = transformer.two_stage
        hidden_dim = transformer.d_model
        self.input_proj = MultiScaleProjection([shapes[name].channels for name in in_features], hidden_dim, num_levels)
        if self.learned_query_embed and not self.two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self.class_embed, self.bbox_embed = self._heads(hidden_dim, num_classes)

    def _heads(self, hidden_dim: int, num_classes: int) -> Tuple[nn.ModuleList, nn.ModuleList]:
        """Class and box heads of every decoder layer (and, two-stage, of the proposals last), initialised as in the
        original: the class bias at the prior 0.01, the last box layer zero but for a (w, h) bias of -2 (in the
        first head only with refinement, in none when two-stage)."""
        class_head, box_head = prediction_heads(hidden_dim, num_classes)
        num_heads = self.transformer.num_decoder_layers + int(self.two_stage)
        if self.with_box_refine:
            class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads))
            box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads))
        else:
            class_heads = nn.ModuleList([class_head] * num_heads)
            box_heads = nn.ModuleList([box_head] * num_heads)
        if not self.two_stage:
            nn.init.constant_(box_heads[0].layers[-1].bias[2:], _INITIAL_SIZE_BIAS)
        return class_heads, box_heads

    @classmethod
    def from_config(cls, cfg):
        detr, deformable = cfg.MODEL.DETR, cfg.MODEL.DEFORMABLE_DETR
        return {
            "backbone": build_backbone(cfg),
            "in_features": deformable.IN_FEATURES,
            "position_encoding": build_position_encoding(cfg),
            "transformer": build_transformer(cfg),
            "criterion": build_criterion(cfg),
            "num_classes": detr.NUM_CLASSES,
            "num_queries": detr.NUM_OBJECT_QUERIES,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "with_box_refine": deformable.WITH_BOX_REFINE,
            "test_topk": detr.TEST_TOPK,
            "fold_frozen_bn": detr.FOLD_FROZEN_BN,
            "channels_last": detr.CHANNELS_LAST,
            "test_backbone_per_image": detr.TEST_BACKBONE_PER_IMAGE,
        }

    def predict(self, images: ImageList) -> Dict:
        """Raw predictions: pred_logits (B, Q, K), pred_boxes (B, Q, 4) normalised cxcywh of the last decoder layer;
        in training also aux_outputs (the earlier layers') and, two-stage, enc_outputs (the proposals at every
        encoder cell: pred_logits (B, S, K), pred_boxes (B, S, 4))."""
        return self.predict_from_levels(*self.levels_and_masks(images))

    def levels_and_masks(self, images: ImageList) -> Tuple[List[Tensor], List[Tensor]]:
        """The transformer's input levels (B, d, H_l, W_l) (:meth:`level_features`) and their padding masks
        (B, H_l, W_l): the ceil rule, or the original's interpolated pixel mask where the transformer is not
        ``padding_invariant``."""
        levels = self.level_features(images)
        if not getattr(self.transformer, "padding_invariant", True):
            return levels, [interpolated_padding_mask(images.image_sizes, images.tensor.shape[-2:], level.shape[-2:],
                                                      self.device) for level in levels]
        masks = [feature_padding_mask(images.image_sizes, level.shape[-2:], stride, self.device)
                 for level, stride in zip(levels, self.level_strides)]
        return levels, masks

    def level_features(self, images: ImageList) -> List[Tensor]:
        """The transformer's input levels (B, d, H_l, W_l): the projected backbone features, then the extra levels.
        At inference each image is computed alone (see
        :meth:`~d2_detr.modeling.set_prediction.SetPredictionModel.features_per_image`)."""

        def compute(pixels: Tensor) -> Dict[int, Tensor]:
            features = self.backbone(pixels)
            return dict(enumerate(self.input_proj([features[name] for name in self.in_features])))

        levels = self.features_per_image(compute, images)
        return [levels[i] for i in range(len(self.level_strides))]

    def predict_from_levels(self, levels: List[Tensor], masks: List[Tensor]) -> Dict:
        """:meth:`predict`'s outputs from the input levels (B, d, H_l, W_l) and their padding masks (B, H_l, W_l)."""
        pos = [self.position_encoding(mask).to(level.dtype) for level, mask in zip(levels, masks)]
        num_layers = self.transformer.num_decoder_layers
        out = self.transformer(
            levels, masks, pos,
            query_embed=None if self.two_stage else self.query_embed.weight,
            box_heads=self.bbox_embed[:num_layers] if self.with_box_refine else None,
            proposal_heads=(self.class_embed[num_layers], self.bbox_embed[num_layers]) if self.two_stage else None,
        )
        hs, references = out["hs"], out["references"]  # (L, B, Q, d), L x (B, Q, 2|4)
        # Earlier layers' predictions only feed the auxiliary losses.
        layer_ids = range(num_layers) if self.training else [num_layers - 1]
        predictions = [{"pred_logits": self.class_embed[i](hs[i]),
                        "pred_boxes": refine_boxes(self.bbox_embed[i](hs[i]), references[i])} for i in layer_ids]
        outputs = {**predictions[-1], "aux_outputs": predictions[:-1]}
        if self.two_stage and self.training:
            outputs["enc_outputs"] = {"pred_logits": out["enc_logits"], "pred_boxes": out["enc_boxes"]}
        return outputs
