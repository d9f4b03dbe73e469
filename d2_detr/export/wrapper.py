"""``Detr`` and ``DeformableDetr`` inference as one traceable graph: a padded image batch and its image sizes in,
detections out.

The graph's inputs and outputs (B images, N predictions per image: N = MODEL.DETR.NUM_OBJECT_QUERIES, or
MODEL.DETR.TEST_TOPK when it is set):

* ``images``: (B, 3, H, W) float32 pixels in ``INPUT.FORMAT`` channel order (0-255, not normalised), each image
  in the top-left corner; (H, W) is the largest image's size (Detectron2's ``ImageList`` padding). What the
  padding holds does not matter.
* ``image_sizes``: (B, 2) int64, the (height, width) of each image.
* ``boxes``: (B, N, 4) float32, (x0, y0, x1, y1) in pixels of each image, clipped to it;
  ``scores``: (B, N) float32; ``labels``: (B, N) int64 contiguous class ids;
  with ``MODEL.MASK_ON`` also ``masks``: (B, N, H, W) bool, meaningful inside each image's (height, width).

These are the model's ``inference``'s ``pred_boxes``, ``scores``, ``pred_classes`` (and ``pred_masks``) for
inputs without "height"/"width", in the same order. As in ``Detr.backbone_features`` (``DeformableDetr.level_features``:
backbone and input projections), the backbone sees each image alone, cropped to its size, and its features are
zero-padded to the batch's feature size, so that a detection does not depend on the other images of the batch:
:class:`PerImageBackbone` does this in a TorchScript loop
(``torch.jit.script``) over the batch, with the crop sizes read from ``image_sizes`` at run time; that loop
becomes an ONNX ``Loop`` and the crops ``Slice`` nodes with run-time bounds. The rest of the graph is traced.
The attention is always masked (``Detr`` skips the mask when nothing is padded; masking nothing gives the same
result), so one graph serves every batch.
"""
import warnings
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy
from ..layers.padding_mask import feature_padding_mask
from ..modeling.deformable_detr import DeformableDetr
from ..modeling.detr import Detr
from ..modeling.inference import select_batch_predictions

__all__ = [
    "BackboneFeatures",
    "DeformableDetrExportWrapper",
    "DetrExportWrapper",
    "INPUT_NAMES",
    "LevelFeatures",
    "PerImageBackbone",
    "output_names",
    "per_image_feature_module",
    "trace_detr",
]

#: Names of the graph's inputs, in order.
INPUT_NAMES: Tuple[str, str] = ("images", "image_sizes")


def output_names(with_masks: bool) -> Tuple[str, ...]:
    """Names of the graph's outputs, in order."""
    return ("boxes", "scores", "labels", "masks") if with_masks else ("boxes", "scores", "labels")


class BackboneFeatures(nn.Module):
    """The backbone outputs the graph needs, as a tuple (a traced module cannot return a dict to TorchScript)."""

    def __init__(self, backbone: nn.Module, names: Sequence[str], channels_last: bool):
        """
        Args:
            backbone: a Detectron2 backbone.
            names: its outputs to return, in this order.
            channels_last: feed it channels-last (NHWC) images, as ``MODEL.DETR.CHANNELS_LAST`` does.
        """
        super().__init__()
        self.backbone = backbone
        self.names = list(names)
        self.channels_last = channels_last

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        """(1, 3, h, w) normalised image -> one (1, C_f, ceil(h / s_f), ceil(w / s_f)) map per name."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        features = self.backbone(image)
        return tuple(features[name] for name in self.names)


class LevelFeatures(nn.Module):
    """``DeformableDetr``'s transformer input levels of one image, as a tuple: backbone, then input projections."""

    def __init__(self, model: DeformableDetr):
        """
        Args:
            model: a ``DeformableDetr``; its backbone and input projections are shared, not copied.
        """
        super().__init__()
        self.backbone = model.backbone
        self.input_proj = model.input_proj
        self.in_features = list(model.in_features)
        self.channels_last = model.channels_last

    def forward(self, image: Tensor) -> Tuple[Tensor, ...]:
        """(1, 3, h, w) normalised image -> one (1, d, ceil(h / s_l), ceil(w / s_l)) map per level."""
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        features = self.backbone(image)
        return tuple(self.input_proj([features[name] for name in self.in_features]))


class PerImageBackbone(nn.Module):
    """Backbone features of a padded batch, each image through the backbone alone (``torch.jit.script``-able).

    Image i is cropped to ``image_sizes[i]``, its feature maps are zero-padded to the batch's feature size
    ``ceil(H / stride)`` x ``ceil(W / stride)`` and the images' maps are stacked: ``Detr.backbone_features`` at
    inference, with run-time crop sizes. The backbone must give an h x w image ``ceil(h / stride)`` x
    ``ceil(w / stride)`` maps (the rule of ``feature_padding_mask``; d2_detr.export checks it before tracing).
    """

    strides: List[int]
    channels: List[int]

    def __init__(self, backbone: nn.Module, strides: Sequence[int], channels: Sequence[int]):
        """
        Args:
            backbone: maps a (1, 3, h, w) image to a tuple of feature maps (a traced :class:`BackboneFeatures`).
            strides: stride of each of its maps.
            channels: channels of each of its maps.
        """
        super().__init__()
        self.backbone = backbone
        self.strides = list(strides)
        self.channels = list(channels)

    def forward(self, images: Tensor, image_sizes: Tensor) -> List[Tensor]:
        """
        Args:
            images: (B, 3, H, W) normalised, padded images.
            image_sizes: (B, 2) int64 (h, w) of each image, h <= H and w <= W.

        Returns:
            one (B, C_f, ceil(H / s_f), ceil(W / s_f)) map per backbone output, zero beyond each image's cells.
        """
        height, width = images.shape[-2], images.shape[-1]
        heights: List[int] = []
        widths: List[int] = []
        for stride in self.strides:
            heights.append((height + stride - 1) // stride)
            widths.append((width + stride - 1) // stride)
        # All of an image's padded maps, flattened into one row: a list of equal-size tensors, which an ONNX
        # Loop can accumulate (a list of lists could not be exported).
        rows: List[Tensor] = []
        for i in range(images.shape[0]):
            h, w = int(image_sizes[i, 0]), int(image_sizes[i, 1])
            maps = self.backbone(images[i : i + 1, :, :h, :w])
            parts: List[Tensor] = []
            j = 0
            for feature in maps:
                padding = [0, widths[j] - feature.shape[-1], 0, heights[j] - feature.shape[-2]]
                parts.append(F.pad(feature, padding).flatten(1))  # (1, C_f * H_f * W_f)
                j += 1
            rows.append(torch.cat(parts, 1))
        batch = torch.cat(rows)  # (B, sum of C_f * H_f * W_f)
        features: List[Tensor] = []
        start = 0
        for j in range(len(self.strides)):
            size = self.channels[j] * heights[j] * widths[j]
            features.append(batch[:, start : start + size].reshape(-1, self.channels[j], heights[j], widths[j]))
            start += size
        return features


class _ExportWrapper(nn.Module):
    """Inference on (images, image_sizes) tensors: normalisation, per-image features, the model's predictions,
    their selection and boxes in pixels; subclasses compute the predictions from the features."""

    def __init__(self, model: nn.Module, backbone: nn.Module, sigmoid_scores: bool):
        """
        Args:
            model: the model in eval mode; its modules are shared, not copied.
            backbone: :class:`PerImageBackbone` (scripted) returning the features the subclass needs.
            sigmoid_scores: class probabilities by sigmoid (see ``select_batch_predictions``).
        """
        super().__init__()
        self.model = model
        self.backbone = backbone
        self.sigmoid_scores = sigmoid_scores

    def predict(self, maps: List[Tensor], image_sizes: Tensor) -> Dict:
        """The model's raw outputs from the per-image features ``maps`` of the batch."""
        raise NotImplementedError

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, ...]:
        """(B, 3, H, W) float32 pixels and (B, 2) int64 sizes -> boxes, scores, labels[, masks]."""
        model = self.model
        normalised = (images - model.pixel_mean) / model.pixel_std  # (B, 3, H, W)
        outputs = self.predict(self.backbone(normalised, image_sizes), image_sizes)
        scores, labels, boxes, queries = select_batch_predictions(
            outputs["pred_logits"], outputs["pred_boxes"], model.test_topk, self.sigmoid_scores
        )  # (B, N), (B, N), (B, N, 4), (B, N)
        size_xyxy = image_sizes.flip(-1).repeat(1, 2).to(boxes.dtype)[:, None, :]  # (B, 1, 4): w, h, w, h
        boxes = torch.min((box_cxcywh_to_xyxy(boxes) * size_xyxy).clamp(min=0), size_xyxy)  # (B, N, 4) pixels
        return (boxes, scores, labels) + self.extra_outputs(outputs, queries, images)

    def extra_outputs(self, outputs: Dict, queries: Tensor, images: Tensor) -> Tuple[Tensor, ...]:
        """Further outputs of the selected predictions (``queries`` (B, N)); none here."""
        return ()


class DetrExportWrapper(_ExportWrapper):
    """``Detr`` inference on (images, image_sizes) tensors; see the module's documentation for the outputs.

    Built with :func:`trace_detr`, which scripts the per-image backbone loop and traces the rest.
    """

    def __init__(self, model: Detr, backbone: nn.Module):
        """
        Args:
            model: a ``Detr`` in eval mode; its modules are shared, not copied.
            backbone: :class:`PerImageBackbone` (scripted) returning ``model.in_feature`` first, then the mask
                head's features if there is a mask head.
        """
        super().__init__(model, backbone, sigmoid_scores=False)
        self.feature_names = [model.in_feature] + (list(model.mask_head.in_features) if model.mask_head else [])

    def predict(self, maps: List[Tensor], image_sizes: Tensor) -> Dict:
        model = self.model
        all_features: Dict[str, Tensor] = dict(zip(self.feature_names, maps))  # name -> (B, C_f, H_f, W_f)
        feature_hw = all_features[model.in_feature].shape[-2:]
        mask = feature_padding_mask(image_sizes, feature_hw, model.feature_stride, image_sizes.device)  # (B, H_f, W_f)
        return model.predict_from_features(all_features, mask, mask_attention=True)

    def extra_outputs(self, outputs: Dict, queries: Tensor, images: Tensor) -> Tuple[Tensor, ...]:
        """With a mask head: (B, N, H, W) bool masks of the selected queries."""
        if self.model.mask_head is None:
            return ()
        mask_logits = outputs["pred_masks"]  # (B, Q, h, w) at stride s
        picked = queries[:, :, None, None].expand(-1, -1, mask_logits.shape[-2], mask_logits.shape[-1])
        mask_logits = torch.gather(mask_logits, 1, picked).float()  # (B, N, h, w)
        stride = outputs["mask_stride"]
        full = F.interpolate(mask_logits, scale_factor=stride, mode="bilinear", align_corners=False)  # (B, N, hs, ws)
        return (full[:, :, : images.shape[-2], : images.shape[-1]] > 0,)  # (B, N, H, W)


class DeformableDetrExportWrapper(_ExportWrapper):
    """``DeformableDetr`` inference on (images, image_sizes) tensors; see the module's documentation for the outputs.

    Built with :func:`trace_detr`, which scripts the per-image loop over backbone and input projections
    (:class:`LevelFeatures`) and traces the rest.
    """

    def __init__(self, model: DeformableDetr, backbone: nn.Module):
        """
        Args:
            model: a ``DeformableDetr`` in eval mode; its modules are shared, not copied.
            backbone: :class:`PerImageBackbone` (scripted) around :class:`LevelFeatures`, returning every level.
        """
        super().__init__(model, backbone, sigmoid_scores=True)

    def predict(self, maps: List[Tensor], image_sizes: Tensor) -> Dict:
        masks = [feature_padding_mask(image_sizes, level.shape[-2:], stride, image_sizes.device)
                 for level, stride in zip(maps, self.model.level_strides)]  # L x (B, H_l, W_l)
        return self.model.predict_from_levels(maps, masks)


def per_image_feature_module(model: nn.Module) -> Tuple[nn.Module, List[str], List[int], List[int]]:
    """The per-image feature module of ``model``, and the names, strides and channels of its outputs."""
    if isinstance(model, DeformableDetr):
        num_levels = len(model.level_strides)
        names = [f"level {i}" for i in range(num_levels)]
        return LevelFeatures(model), names, list(model.level_strides), [model.transformer.d_model] * num_levels
    names = [model.in_feature] + (list(model.mask_head.in_features) if model.mask_head else [])
    shapes = model.backbone.output_shape()
    features = BackboneFeatures(model.backbone, names, model.channels_last)
    return features, names, [shapes[n].stride for n in names], [shapes[n].channels for n in names]


def trace_detr(model: nn.Module, images: Tensor, image_sizes: Tensor) -> torch.jit.ScriptModule:
    """The export wrapper of ``model`` (a ``Detr`` or ``DeformableDetr`` in eval mode) as a TorchScript module.

    The per-image features (backbone; for ``DeformableDetr`` with the input projections) are traced on the first
    example image, the per-image loop around them scripted, and the wrapper traced on the example batch. The result
    runs on batches of any size and images of any size; save it with ``torch.jit.save`` or export it with
    ``torch.onnx.export(..., dynamo=False)``.

    Args:
        model: ``Detr`` or ``DeformableDetr`` in eval mode.
        images: (B, 3, H, W) example pixels; best a padded batch of images of different sizes.
        image_sizes: (B, 2) int64 example sizes.
    """
    features, _, strides, channels = per_image_feature_module(model)
    wrapper_cls = DeformableDetrExportWrapper if isinstance(model, DeformableDetr) else DetrExportWrapper
    h, w = (int(v) for v in image_sizes[0])
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit is deprecated in favour of torch.export, which cannot express the per-image loop
        # (see d2_detr.export.exporter); the warning says nothing about this model.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        # GroupNorm (DeformableDetr's input projections) checks its sizes for training, comparing traced sizes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.nn\.functional")
        first = ((images[:1, :, :h, :w] - model.pixel_mean) / model.pixel_std).contiguous()
        per_image = torch.jit.script(PerImageBackbone(torch.jit.trace(features, first), strides, channels))
        return torch.jit.trace(wrapper_cls(model, per_image), (images, image_sizes))
