"""DETR's mask head (Carion et al. 2020, Sec. 4.4) and the two-stage training around it.

The head turns each object query into a mask logit map at the stride of the finest backbone feature it uses
(res2: stride 4):

1. ``bbox_attention`` (:class:`MHAttentionMap`): multi-head attention scores of each last-layer decoder output
   over the encoder memory, one (H, W) map per head, at the transformer's feature resolution;
2. those M maps, concatenated with the query-independent transformer input (the 1x1-projected backbone
   feature, as in the original code; or the encoder memory, as the paper's Fig. 8 draws it), go through an
   FPN-style convolutional decoder: 3x3 conv + GroupNorm + ReLU blocks, each level upsampled (nearest) and added
   to a 1x1-adapted backbone feature (res4, res3, res2 for a res5 transformer input), then a 3x3 conv to
   one channel.

Parameter names follow facebookresearch/detr's ``DETRsegm`` (``bbox_attention.*`` -> ``mask_head.bbox_attention.*``,
``mask_head.{lay1..5, gn1..5, adapter1..3, out_lay}.*``), so its checkpoints convert by a rename
(:func:`d2_detr.checkpoint.convert.convert_detr_state_dict`).

Two-stage training (the paper's recipe): train the detector, then with ``MODEL.MASK_ON`` load it
(``MODEL.DETR.FROZEN_WEIGHTS``, or ``MODEL.WEIGHTS`` with ``MODEL.DETR.FREEZE_DETECTOR``), freeze it
(:func:`freeze_all_but_mask_head`) and train only the mask head.
"""
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, configurable
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torch import Tensor, nn

from .registry import DETR_MASK_HEAD_REGISTRY

logger = logging.getLogger(__name__)

__all__ = [
    "MASK_HEAD_PREFIX",
    "MHAttentionMap",
    "DetrMaskHead",
    "freeze_all_but_mask_head",
    "gt_masks_to_tensor",
    "load_detector_weights",
]

#: Name of the mask head inside ``Detr``: parameters under it are the only ones a frozen detector trains.
MASK_HEAD_PREFIX = "mask_head."

# GroupNorm groups of the original head (every width of the 256-d model is a multiple of 8).
_GROUPS = 8


class MHAttentionMap(nn.Module):
    """Multi-head attention *scores* (no values) of queries over a feature map.

    As in the original implementation the softmax runs jointly over the heads and the positions of each
    query, and padded positions get zero weight.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0):
        """
        Args:
            query_dim: width of the queries and of the feature map.
            hidden_dim: width of the projected queries and keys (split between the heads).
            num_heads: number M of attention maps per query.
            dropout: dropout on the attention weights (0 in DETR).
        """
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim // num_heads) ** -0.5
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            q: (B, Q, query_dim) queries.
            k: (B, query_dim, H, W) feature map.
            mask: (B, H, W) bool, True on padded positions.

        Returns:
            (B, Q, M, H, W) attention weights, summing to 1 over (M, H, W) for each query.
        """
        q = self.q_linear(q)  # (B, Q, hidden)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)  # (B, hidden, H, W)
        batch, num_queries = q.shape[:2]
        qh = q.reshape(batch, num_queries, self.num_heads, -1)  # (B, Q, M, c)
        kh = k.reshape(batch, self.num_heads, -1, k.shape[-2], k.shape[-1])  # (B, M, c, H, W)
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)  # (B, Q, M, H, W)
        if mask is not None:
            weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        weights = weights.flatten(2).softmax(-1).reshape(weights.shape)
        return self.dropout(weights)


def _group_norm(channels: int) -> nn.GroupNorm:
    """The original's GroupNorm(8, channels); fewer groups (a divisor of 8) for widths of small test models."""
    return nn.GroupNorm(math.gcd(_GROUPS, channels), channels)


def _expand(x: Tensor, num_queries: int) -> Tensor:
    """(B, C, H, W) -> (B * num_queries, C, H, W): each image's map repeated for each of its queries."""
    return x[:, None].expand(-1, num_queries, -1, -1, -1).flatten(0, 1)


@DETR_MASK_HEAD_REGISTRY.register()
class DetrMaskHead(nn.Module):
    """DETR's mask head: per-query attention maps + FPN-style convolutional decoder -> mask logits.

    Layers (d = hidden dim, M = heads, n = number of FPN levels, widths w_i = d / 2^i):
    ``lay1`` (d+M -> d+M), ``lay2`` (d+M -> w_1), then for level i = 1..n: ``adapter{i}`` (1x1, C_i -> w_i) added
    to the nearest-upsampled map, ``lay{i+2}`` (w_i -> w_{i+1}); each 3x3 conv followed by GroupNorm and ReLU;
    finally ``out_lay`` (3x3, w_{n+1} -> 1). With d = 256, M = 8 and res4/res3/res2 this is the original
    ``MaskHeadSmallConv(264, [1024, 512, 256], 256)``.
    """

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        num_heads: int,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        output_stride: int,
        input_source: str = "input_proj",
    ):
        """
        Args:
            hidden_dim: transformer width d.
            num_heads: attention maps per query (M).
            in_features: backbone features the FPN adds in, coarse to fine (e.g. res4, res3, res2).
            in_channels: channels of each of ``in_features``.
            output_stride: stride of the last (finest) of ``in_features``: the stride of the mask logits.
            input_source: "input_proj" (the original code: the projected backbone feature that enters the
                encoder) or "memory" (the encoder output), concatenated with the attention maps.
        """
        super().__init__()
        if input_source not in ("input_proj", "memory"):
            raise ValueError(f"MODEL.DETR.MASK_HEAD_INPUT={input_source!r}: use 'input_proj' or 'memory'")
        if len(in_features) != len(in_channels) or not in_features:
            raise ValueError(f"need one channel count per mask head feature, got {in_features} / {in_channels}")
        self.in_features = list(in_features)
        self.output_stride = output_stride
        self.input_source = input_source
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, num_heads, dropout=0.0)

        dim = hidden_dim + num_heads
        widths = [hidden_dim // 2**i for i in range(1, len(in_features) + 2)]  # w_1 .. w_{n+1}
        if widths[-1] < 1:
            raise ValueError(f"MODEL.DETR.HIDDEN_DIM={hidden_dim} is too small for {len(in_features)} FPN levels")
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = _group_norm(dim)
        self.lay2 = nn.Conv2d(dim, widths[0], 3, padding=1)
        self.gn2 = _group_norm(widths[0])
        for i, channels in enumerate(in_channels, start=1):
            self.add_module(f"adapter{i}", nn.Conv2d(channels, widths[i - 1], 1))
            self.add_module(f"lay{i + 2}", nn.Conv2d(widths[i - 1], widths[i], 3, padding=1))
            self.add_module(f"gn{i + 2}", _group_norm(widths[i]))
        self.out_lay = nn.Conv2d(widths[-1], 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Mapping[str, ShapeSpec]) -> Dict:
        detr = cfg.MODEL.DETR
        in_features = list(detr.MASK_IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.DETR.MASK_IN_FEATURES {missing} are not backbone outputs (available: "
                             f"{sorted(input_shape)}); add them to MODEL.RESNETS.OUT_FEATURES")
        strides = [input_shape[f].stride for f in in_features]
        if strides != sorted(strides, reverse=True) or len(set(strides)) != len(strides):
            raise ValueError(f"MODEL.DETR.MASK_IN_FEATURES must go from coarse to fine, got {in_features} "
                             f"with strides {strides}")
        return {
            "hidden_dim": detr.HIDDEN_DIM,
            "num_heads": detr.NHEADS,
            "in_features": in_features,
            "in_channels": [input_shape[f].channels for f in in_features],
            "output_stride": strides[-1],
            "input_source": detr.MASK_HEAD_INPUT,
        }

    def forward(
        self, hs: Tensor, memory: Tensor, src_proj: Tensor, mask: Tensor, features: Mapping[str, Tensor]
    ) -> Tensor:
        """
        Args:
            hs: (B, Q, d) last decoder layer's outputs.
            memory: (B, d, H, W) encoder output.
            src_proj: (B, d, H, W) projected backbone feature (the encoder's input).
            mask: (B, H, W) bool, True on padded cells of the transformer's feature map.
            features: backbone outputs, including ``in_features`` ((B, C_i, H_i, W_i) each).

        Returns:
            (B, Q, H_s, W_s) mask logits at ``output_stride`` of the padded batch.
        """
        batch, num_queries = hs.shape[:2]
        attention = self.bbox_attention(hs, memory, mask)  # (B, Q, M, H, W)
        context = memory if self.input_source == "memory" else src_proj  # (B, d, H, W)
        x = torch.cat([_expand(context, num_queries), attention.flatten(0, 1)], 1)  # (B*Q, d+M, H, W)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))  # (B*Q, w_1, H, W)
        for i, name in enumerate(self.in_features, start=1):
            fpn = _expand(getattr(self, f"adapter{i}")(features[name]), num_queries)  # (B*Q, w_i, H_i, W_i)
            x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            x = F.relu(getattr(self, f"gn{i + 2}")(getattr(self, f"lay{i + 2}")(x)))  # (B*Q, w_{i+1}, H_i, W_i)
        x = self.out_lay(x)  # (B*Q, 1, H_s, W_s)
        return x.reshape(batch, num_queries, x.shape[-2], x.shape[-1])


def gt_masks_to_tensor(instances: Instances, image_size: Tuple[int, int], device: torch.device) -> Tensor:
    """Ground-truth masks of one image as a (n, h, w) bool tensor on ``device``.

    Args:
        instances: the image's ground truth; its ``gt_masks`` are ``BitMasks`` (INPUT.MASK_FORMAT "bitmask",
            panoptic data) or ``PolygonMasks`` ("polygon"). Only an image without objects may lack them.
        image_size: (h, w) of the (augmented, unpadded) image the masks belong to.
    """
    if not instances.has("gt_masks"):
        if len(instances):
            raise ValueError("MODEL.MASK_ON: the ground truth has no masks; the dataset needs segmentation "
                             "annotations (or panoptic segments with MODEL.DETR.PANOPTIC_ON)")
        return torch.zeros((0, *image_size), dtype=torch.bool, device=device)
    gt_masks = instances.gt_masks
    if isinstance(gt_masks, PolygonMasks):
        gt_masks = BitMasks.from_polygon_masks(gt_masks, *image_size)
    if not isinstance(gt_masks, BitMasks):
        raise TypeError(f"gt_masks must be BitMasks or PolygonMasks, got {type(gt_masks).__name__}")
    masks = gt_masks.tensor.to(device=device, dtype=torch.bool)  # (n, h, w)
    if tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(f"gt_masks of size {tuple(masks.shape[-2:])} for an image of size {tuple(image_size)}")
    return masks


def load_detector_weights(model: nn.Module, path: str) -> None:
    """Load a box-detector checkpoint (``MODEL.DETR.FROZEN_WEIGHTS``) into a model with a mask head.

    Loading goes through Detectron2's ``DetectionCheckpointer``, which logs the model's keys missing from the
    checkpoint (the mask head's, expected here) and the checkpoint's unexpected keys as it always does.
    A detector key (outside ``mask_head.``) that the checkpoint does not provide is an error: that part
    would stay at its random initialisation and then be frozen.
    """
    logger.info("Loading the detector to freeze from MODEL.DETR.FROZEN_WEIGHTS=%s", path)
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(path, checkpointables=[])
    incompatible = checkpointer.incompatible
    if incompatible is None:
        raise ValueError(f"MODEL.DETR.FROZEN_WEIGHTS={path!r} holds no model weights")
    wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = sorted({k for k in (*incompatible.missing_keys, *wrong_shape) if not k.startswith(MASK_HEAD_PREFIX)})
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} keys)" if len(missing) > 8 else "")
        raise ValueError(f"MODEL.DETR.FROZEN_WEIGHTS={path!r} lacks (or has another shape for) {len(missing)} "
                         f"detector parameters, which would be frozen at random values: {shown}. Pass a checkpoint "
                         "of the same detector config trained without masks.")


class _RecordingCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that keeps the incompatible keys it logged, for the caller to check."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def freeze_all_but_mask_head(model: nn.Module) -> List[str]:
    """Freeze every parameter outside ``mask_head.`` and turn the backbone's BatchNorm into
    ``FrozenBatchNorm2d`` (its statistics would otherwise keep changing in training mode).

    Returns the names of the parameters left trainable.
    """
    for name, param in model.named_parameters():
        if not name.startswith(MASK_HEAD_PREFIX):
            param.requires_grad_(False)
    if hasattr(model, "backbone"):
        model.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(model.backbone)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    logger.info("Detector frozen (%d parameters); training only the mask head (%d parameters in %d tensors)",
                frozen, sum(p.numel() for p in model.parameters() if p.requires_grad), len(trainable))
    return trainable
