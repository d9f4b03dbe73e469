"""The ``Detr`` meta-architecture: backbone -> transformer -> set prediction heads."""
import logging
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..layers.mlp import MLP
from ..layers.padding_mask import feature_padding_mask
from .inference import select_predictions
from .registry import build_criterion, build_position_encoding, build_transformer

logger = logging.getLogger(__name__)

__all__ = ["Detr"]


@META_ARCH_REGISTRY.register()
class Detr(nn.Module):
    """DETR (Carion et al., 2020) taking and returning Detectron2's standard formats.

    Training: ``list[dict]`` with "image" (C, H, W) and "instances" (gt_boxes, gt_classes) -> loss dict.
    Inference: ``list[dict]`` with "image" and optional "height"/"width" -> ``[{"instances": Instances}]``
    with pred_boxes (XYXY, in the requested height/width), scores and pred_classes.
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
        hidden_dim = transformer.d_model
        self.input_proj = Conv2d(backbone.output_shape()[in_feature].channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        return {
            "backbone": build_backbone(cfg),
            "in_feature": cfg.MODEL.DETR.IN_FEATURE,
            "position_encoding": build_position_encoding(cfg),
            "transformer": build_transformer(cfg),
            "criterion": build_criterion(cfg),
            "num_classes": cfg.MODEL.DETR.NUM_CLASSES,
            "num_queries": cfg.MODEL.DETR.NUM_OBJECT_QUERIES,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "test_topk": cfg.MODEL.DETR.TEST_TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if self.training:
            storage = get_event_storage()
            self.check_finite(outputs, storage.iter)
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            losses, metrics = self.criterion(outputs, targets)
            for name, value in metrics.items():
                storage.put_scalar(name, float(value))
            return losses
        results = select_predictions(outputs["pred_logits"], outputs["pred_boxes"], self.test_topk)
        return [
            {"instances": self.to_instances(scores, labels, boxes, image_size, inp)}
            for (scores, labels, boxes), image_size, inp in zip(results, images.image_sizes, batched_inputs)
        ]

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise, then pad bottom/right with zeros to a common size."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def predict(self, images: ImageList) -> Dict:
        """Raw predictions: pred_logits (B, Q, K+1), pred_boxes (B, Q, 4) normalised cxcywh, and
        aux_outputs (one dict per earlier decoder layer) when the transformer returns them."""
        features = self.backbone(images.tensor)[self.in_feature]  # (B, C, H, W)
        mask = feature_padding_mask(images.image_sizes, features.shape[-2:], self.feature_stride, self.device)
        pos = self.position_encoding(mask).to(features.dtype)  # (B, d, H, W)
        hs, _ = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)  # (L, B, Q, d)
        if not self.training:
            hs = hs[-1:]  # earlier layers' predictions only feed the auxiliary losses
        logits = self.class_embed(hs)  # (L, B, Q, K+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        outputs["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        return outputs

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
        unpadded image size."""
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
            targets.append({"labels": labels, "boxes": boxes})
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
