"""The ``Detr`` meta-architecture: backbone -> transformer -> set prediction heads."""
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..layers.mlp import MLP
from ..layers.padding_mask import feature_padding_mask
from .inference import select_predictions
from .registry import build_criterion, build_mask_head, build_position_encoding, build_transformer
from .segmentation import freeze_all_but_mask_head, gt_masks_to_tensor, load_detector_weights
from .segmentation_inference import SegmentationPostprocessor

logger = logging.getLogger(__name__)

__all__ = ["Detr", "FoldedFrozenBNConv2d", "fold_frozen_batchnorm"]


class FoldedFrozenBNConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` followed by a ``FrozenBatchNorm2d`` that applies the norm through its weights.

    A frozen BatchNorm is a fixed per-channel affine map ``y * scale + shift``, so
    ``norm(conv(x, w, b)) == conv(x, w * scale, b * scale + shift)``. The folded weights are recomputed at
    every call (one pass over the weights, negligible next to the convolution), so training, checkpoint
    loading and gradients (which flow to ``weight`` and ``bias`` through the fold) behave as before, while the
    normalisation pass over the activations (and, in training, its backward) disappears. Parameters, buffers
    and state-dict keys are those of the unfolded module.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W'), equal to ``activation(norm(conv(x)))`` up to rounding."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # (C_out,)
        shift = norm.bias - norm.running_mean * scale  # (C_out,)
        weight = self.weight * scale.view(-1, 1, 1, 1)  # (C_out, C_in / groups, kh, kw)
        bias = shift if self.bias is None else self.bias * scale + shift  # (C_out,)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every Detectron2 ``Conv2d`` in ``module`` whose norm is a ``FrozenBatchNorm2d`` fold that norm into
    its weights (:class:`FoldedFrozenBNConv2d`), in place; outputs are unchanged up to float rounding.

    Only the modules' class changes: their identity, parameters, buffers and state-dict keys stay, so
    optimizers, freezing and checkpoints are unaffected. Returns the number of convolutions converted.
    """
    converted = 0
    for submodule in module.modules():
        if type(submodule) is Conv2d and type(submodule.norm) is FrozenBatchNorm2d:
            submodule.__class__ = FoldedFrozenBNConv2d
            converted += 1
    return converted


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """DETR (Carion et al., 2020) taking and returning Detectron2's standard formats.

    Training: ``list[dict]`` with "image" (C, H, W) and "instances" (gt_boxes, gt_classes) -> loss dict.
    Inference: ``list[dict]`` with "image" and optional "height"/"width" -> ``[{"instances": Instances}]``
    with pred_boxes (XYXY, in the requested height/width), scores and pred_classes.

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
            test_backbone_per_image: at inference, run the backbone image by image when a batch holds images of
                different sizes (see :meth:`backbone_features`), so that detections do not depend on which images
                share a batch; False runs the padded batch at once, as the original implementation does.
            compile_transformer: compile the transformer in place with ``torch.compile`` (parameter names are
                unchanged); the first calls, and calls with new input shapes, pay the compilation.
            compile_backend: ``torch.compile`` backend used with ``compile_transformer``.
        """
        super().__init__()
        if in_feature not in backbone.output_shape():
            raise ValueError(f"MODEL.DETR.IN_FEATURE={in_feature!r} is not a backbone output; "
                             f"available: {sorted(backbone.output_shape())}")
        self.backbone = backbone
        self.in_feature = in_feature
        self.feature_stride = backbone.output_shape()[in_feature].stride
        self.position_encoding = position_encoding
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.test_topk = test_topk
        self.channels_last = channels_last
        self.test_backbone_per_image = test_backbone_per_image
        if fold_frozen_bn:
            logger.info(f"Folded {fold_frozen_batchnorm(backbone)} frozen BatchNorms into their convolutions")
        if compile_transformer:
            transformer.compile(backend=compile_backend)
        hidden_dim = transformer.d_model
        self.input_proj = Conv2d(backbone.output_shape()[in_feature].channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
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

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        """Training mode: the weighted losses (name -> scalar). Eval mode: :meth:`inference`."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        storage = get_event_storage()
        self.check_finite(outputs, storage.iter)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        losses, metrics = self.criterion(outputs, targets)
        for name, value in metrics.items():
            storage.put_scalar(name, float(value))
        return losses

    @torch.inference_mode()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict]:
        """Detections of each image, computed under ``torch.inference_mode``: the returned tensors are
        inference tensors (no autograd, no in-place changes outside inference mode); :meth:`predict` gives
        differentiable raw outputs."""
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        results = select_predictions(outputs["pred_logits"], outputs["pred_boxes"], self.test_topk)
        processed = [
            {"instances": self.to_instances(scores, labels, boxes, image_size, inp)}
            for (scores, labels, boxes), image_size, inp in zip(results, images.image_sizes, batched_inputs)
        ]
        if self.mask_postprocessor is not None:
            self.mask_postprocessor(processed, outputs, images.image_sizes, self.test_topk)
        return processed

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise, then pad bottom/right with zeros to a common size."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

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
        """Backbone features of the batch, name -> (B, C_f, H_f, W_f).

        In training the padded batch goes through the backbone at once (BatchNorm statistics need the batch).
        At inference with ``test_backbone_per_image``, images of different sizes go through it one by one and
        their features are zero-padded to the batch's feature size: otherwise convolutions near an image's
        bottom/right border read the batch's padding, and a detection would depend on which images share its
        batch. That gives up batching the backbone for mixed-size batches (benchmarks/README.md measures it);
        without it the padded batch goes through at once, as in the original implementation.
        """
        pixels = images.tensor  # (B, 3, H_pad, W_pad)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.training or not self.test_backbone_per_image or len(set(images.image_sizes)) == 1:
            return self.backbone(pixels)
        per_image = [self.backbone(pixels[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(images.image_sizes)]
        batched = {}
        for name in per_image[0]:
            maps = [features[name] for features in per_image]  # (1, C_f, h_f, w_f) each
            height = max(m.shape[-2] for m in maps)
            width = max(m.shape[-1] for m in maps)
            batched[name] = torch.cat([F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps])
        return batched

    def _any_padding(self, image_sizes: List[Tuple[int, int]], feature_hw: Tuple[int, int]) -> bool:
        """Whether :func:`feature_padding_mask` marks any cell as padded, decided on the host (no device sync)."""
        stride = self.feature_stride
        height, width = feature_hw
        return any(-(-h // stride) < height or -(-w // stride) < width for h, w in image_sizes)

    @staticmethod
    def check_finite(outputs: Dict, iteration: int) -> None:
        """Stop training, naming the iteration, when predictions are NaN or infinite (the loss would be too)."""
        tensors = [o[k] for o in (outputs, *outputs["aux_outputs"]) for k in ("pred_logits", "pred_boxes")]
        if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            raise FloatingPointError(
                f"Predictions became infinite or NaN at iteration={iteration}, so the loss would be too. "
                "Check the inputs (MODEL.PIXEL_STD, images) or lower SOLVER.BASE_LR.")

    def prepare_targets(self, batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]) -> List[Dict]:
        """Ground truth as the criterion wants it: labels (n,) and boxes (n, 4), cxcywh normalised by the
        unpadded image size; with a mask head also masks (n, h, w) bool at the unpadded image size."""
        targets = []
        for inp, (h, w) in zip(batched_inputs, image_sizes):
            if "instances" not in inp:
                raise ValueError("Detr in training mode needs 'instances' in every input dict; "
                                 "use a dataset mapper that keeps annotations (is_train=True).")
            instances = inp["instances"].to(self.device)
            labels = instances.gt_classes
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"gt class ids {labels.tolist()} fall outside [0, {self.num_classes}); "
                                 "set MODEL.DETR.NUM_CLASSES to the dataset's number of classes.")
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float() / scale)
            target = {"labels": labels, "boxes": boxes}
            if self.mask_head is not None:
                target["masks"] = gt_masks_to_tensor(instances, (h, w), self.device)  # (n, h, w)
            targets.append(target)
        return targets

    def to_instances(self, scores, labels, boxes, image_size: Tuple[int, int], inp: Dict) -> Instances:
        """Predictions of one image as Instances in the requested output size (default: the input's)."""
        h, w = image_size
        out_h, out_w = inp.get("height", h), inp.get("width", w)
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=boxes.dtype, device=boxes.device)
        result = Instances((out_h, out_w))
        result.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes) * scale)
        result.pred_boxes.clip((out_h, out_w))
        result.scores = scores
        result.pred_classes = labels
        return result
