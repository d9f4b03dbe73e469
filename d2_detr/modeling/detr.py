"""The ``Detr`` meta-architecture: backbone -> transformer -> set prediction heads."""
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import Tensor, nn

from ..layers.frozen_bn import FoldedFrozenBNConv2d, fold_frozen_batchnorm
from ..layers.mlp import MLP
from ..layers.padding_mask import feature_padding_mask
from .registry import build_criterion, build_mask_head, build_position_encoding, build_transformer
from .set_prediction import SetPredictionModel
from .segmentation import freeze_all_but_mask_head, gt_masks_to_tensor, load_detector_weights
from .segmentation_inference import SegmentationPostprocessor

__all__ = ["Detr", "FoldedFrozenBNConv2d", "fold_frozen_batchnorm"]


@META_ARCH_REGISTRY.register()
class Detr(SetPredictionModel):
    """DETR (Carion et al., 2020) taking and returning Detectron2's standard formats (see
    :class:`~d2_detr.modeling.set_prediction.SetPredictionModel`).

    With a mask head (``MODEL.MASK_ON``): training also needs gt_masks in the instances; inference adds
    full-image ``pred_masks`` and, with ``MODEL.DETR.PANOPTIC_ON``, ``"panoptic_seg"`` to each result
    (see d2_detr.modeling.segmentation and segmentation_inference).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        position_encoding: nn.Module,
        transformer: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        num_queries: int,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        test_topk: int = 0,
        mask_head: Optional[nn.Module] = None,
        mask_postprocessor: Optional[Callable] = None,
        frozen_weights: str = "",
        freeze_detector: bool = False,
        fold_frozen_bn: bool = True,
        channels_last: bool = True,
        test_backbone_per_image: bool = True,
        compile_transformer: bool = False,
        compile_backend: str = "inductor",
    ):
        """
        Args:
            backbone: any Detectron2 backbone; only its ``in_feature`` output is used.
            position_encoding: maps a padding mask (B, H, W) to encodings (B, hidden_dim, H, W).
            transformer: maps (src, mask, query_embed, pos) to decoder outputs (L, B, Q, hidden_dim).
            criterion: maps (outputs, targets) to (weighted losses, logging-only metrics).
            num_classes: foreground classes; the class head has one more output ("no object").
            num_queries: object queries, i.e. predictions per image.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            test_topk: 0 for the paper's per-query rule at inference, k > 0 to keep the best k
                (query, class) pairs per image.
            mask_head: maps (last decoder outputs, memory, projected feature, padding mask, backbone features)
                to mask logits (B, Q, h, w) at stride ``mask_head.output_stride``; None for boxes only.
            mask_postprocessor: adds masks (and panoptic segmentation) to the inference results.
            frozen_weights: checkpoint of the detector, loaded here and frozen (two-stage mask training).
            freeze_detector: freeze every parameter outside the mask head (implied by ``frozen_weights``).
            fold_frozen_bn: fold the backbone's frozen BatchNorms into the preceding convolutions
                (:func:`fold_frozen_batchnorm`): same outputs up to float rounding, less work.
            channels_last: feed the backbone channels-last (NHWC) images: same outputs up to float rounding,
                faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
            test_backbone_per_image: see :class:`~d2_detr.modeling.set_prediction.SetPredictionModel`.
            compile_transformer: compile the transformer in place with ``torch.compile`` (parameter names are
                unchanged); the first calls, and calls with new input shapes, pay the compilation.
            compile_backend: ``torch.compile`` backend used with ``compile_transformer``.
        """
        if in_feature not in backbone.output_shape():
            raise ValueError(f"MODEL.DETR.IN_FEATURE={in_feature!r} is not a backbone output; "
                             f"available: {sorted(backbone.output_shape())}")
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, pixel_mean=pixel_mean,
                         pixel_std=pixel_std, test_topk=test_topk, fold_frozen_bn=fold_frozen_bn,
                         channels_last=channels_last, test_backbone_per_image=test_backbone_per_image)
        self.in_feature = in_feature
        self.feature_stride = backbone.output_shape()[in_feature].stride
        self.position_encoding = position_encoding
        self.transformer = transformer
        if compile_transformer:
            transformer.compile(backend=compile_backend)
        hidden_dim = transformer.d_model
        self.input_proj = Conv2d(backbone.output_shape()[in_feature].channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.mask_head = mask_head
        self.mask_postprocessor = mask_postprocessor
        if mask_head is not None and not getattr(criterion, "computes_mask_losses", False):
            raise ValueError(f"MODEL.MASK_ON needs a criterion with mask losses, not {type(criterion).__name__}: "
                             "set MODEL.DETR.CRITERION_NAME SetCriterionWithMasks")
        if (frozen_weights or freeze_detector) and mask_head is None:
            raise ValueError("MODEL.DETR.FROZEN_WEIGHTS / FREEZE_DETECTOR freeze the detector to train a mask head: "
                             "set MODEL.MASK_ON True")
        if frozen_weights:
            load_detector_weights(self, frozen_weights)
        if frozen_weights or freeze_detector:
            freeze_all_but_mask_head(self)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        mask_on = cfg.MODEL.MASK_ON
        return {
            "backbone": backbone,
            "in_feature": cfg.MODEL.DETR.IN_FEATURE,
            "position_encoding": build_position_encoding(cfg),
            "transformer": build_transformer(cfg),
            "criterion": build_criterion(cfg),
            "num_classes": cfg.MODEL.DETR.NUM_CLASSES,
            "num_queries": cfg.MODEL.DETR.NUM_OBJECT_QUERIES,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "test_topk": cfg.MODEL.DETR.TEST_TOPK,
            "mask_head": build_mask_head(cfg, backbone.output_shape()) if mask_on else None,
            "mask_postprocessor": SegmentationPostprocessor(cfg) if mask_on else None,
            "frozen_weights": cfg.MODEL.DETR.FROZEN_WEIGHTS,
            "freeze_detector": cfg.MODEL.DETR.FREEZE_DETECTOR,
            "fold_frozen_bn": cfg.MODEL.DETR.FOLD_FROZEN_BN,
            "channels_last": cfg.MODEL.DETR.CHANNELS_LAST,
            "test_backbone_per_image": cfg.MODEL.DETR.TEST_BACKBONE_PER_IMAGE,
            "compile_transformer": cfg.MODEL.DETR.COMPILE_TRANSFORMER,
            "compile_backend": cfg.MODEL.DETR.COMPILE_BACKEND,
        }

    def postprocess(self, processed: List[Dict], outputs: Dict, images: ImageList) -> None:
        """With a mask head: add masks (and panoptic segmentation) to the inference results."""
        if self.mask_postprocessor is not None:
            self.mask_postprocessor(processed, outputs, images.image_sizes, self.test_topk)

    def predict(self, images: ImageList) -> Dict:
        """Raw predictions: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) normalised cxcywh, and
        aux_outputs (one dict per earlier decoder layer) when the transformer returns them; with a mask head
        also pred_masks (B, Q, h, w) logits of the last layer at stride mask_stride (an int)."""
        all_features = self.backbone_features(images)  # name -> (B, C_f, H_f, W_f)
        feature_hw = all_features[self.in_feature].shape[-2:]
        mask = feature_padding_mask(images.image_sizes, feature_hw, self.feature_stride, self.device)  # (B, H, W)
        # Without padded cells (one image, or images of one size) attention needs no mask: skip the masking work.
        return self.predict_from_features(all_features, mask, self._any_padding(images.image_sizes, feature_hw))

    def predict_from_features(self, all_features: Dict[str, Tensor], mask: Tensor, mask_attention: bool) -> Dict:
        """:meth:`predict`'s outputs from the backbone features (name -> (B, C_f, H_f, W_f)) and the padding mask
        (B, H, W) of ``in_feature``, True on padded cells. ``mask_attention`` False skips masking the attention
        (only correct when no cell is padded); the exported graph (d2_detr.export) always masks."""
        features = all_features[self.in_feature]  # (B, C, H, W)
        pos = self.position_encoding(mask).to(features.dtype)  # (B, d, H, W)
        src_proj = self.input_proj(features)  # (B, d, H, W)
        # hs: (L, B, Q, d), memory: (B, d, H, W)
        hs, memory = self.transformer(src_proj, mask if mask_attention else None, self.query_embed.weight, pos)
        if not self.training:
            hs = hs[-1:]  # earlier layers' predictions only feed the auxiliary losses
        logits = self.class_embed(hs)  # (L, B, Q, K+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        aux = zip(logits[:-1], boxes[:-1]) if self.training else ()  # nothing to iterate (nor trace) at inference
        outputs["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in aux]
        if self.mask_head is not None:
            outputs["pred_masks"] = self.mask_head(hs[-1], memory, src_proj, mask, all_features)  # (B, Q, h, w)
            outputs["mask_stride"] = self.mask_head.output_stride
        return outputs

    def backbone_features(self, images: ImageList) -> Dict[str, Tensor]:
        """Backbone features of the batch, name -> (B, C_f, H_f, W_f); at inference each image goes through the
        backbone alone (see :meth:`~d2_detr.modeling.set_prediction.SetPredictionModel.features_per_image`)."""
        return self.features_per_image(self.backbone, images)

    def _any_padding(self, image_sizes: List[Tuple[int, int]], feature_hw: Tuple[int, int]) -> bool:
        """Whether :func:`feature_padding_mask` marks any cell as padded, decided on the host (no device sync)."""
        stride = self.feature_stride
        height, width = feature_hw
        return any(-(-h // stride) < height or -(-w // stride) < width for h, w in image_sizes)

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]) -> List[Dict]:
        """Ground truth as the criterion wants it: labels (n,) and boxes (n, 4), cxcywh normalised by the
        unpadded image size; with a mask head also masks (n, h, w) bool at the unpadded image size."""
        targets = super().prepare_targets(batched_inputs, image_sizes)
        if self.mask_head is not None:
            for target, inp, image_size in zip(targets, batched_inputs, image_sizes):
                target["masks"] = gt_masks_to_tensor(inp["instances"], image_size, self.device)  # (n, h, w)
        return targets
