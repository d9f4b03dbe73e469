"""What the DETR-family meta-architectures share: Detectron2 inputs in, losses or ``Instances`` out.

:class:`SetPredictionModel` holds the input normalisation, the per-image feature extraction at inference (results
independent of batch neighbours), the ground-truth preparation, the non-finite check, the training step's
criterion call and the conversion of selected predictions to ``Instances``. A subclass builds its own network and
implements :meth:`SetPredictionModel.predict`.
"""
import logging
from typing import Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..layers.frozen_bn import fold_frozen_batchnorm
from .inference import select_predictions

logger = logging.getLogger(__name__)

__all__ = ["SetPredictionModel"]


class SetPredictionModel(nn.Module):
    """Base of the set-prediction meta-architectures (``Detr``, ``DeformableDetr``).

    Training: ``list[dict]`` with "image" (C, H, W) and "instances" (gt_boxes, gt_classes) -> loss dict.
    Inference: ``list[dict]`` with "image" and optional "height"/"width" -> ``[{"instances": Instances}]``
    with pred_boxes (XYXY, in the requested height/width), scores and pred_classes.

    Subclasses implement :meth:`predict` (raw outputs of a padded batch: "pred_logits", "pred_boxes",
    "aux_outputs" and optionally "enc_outputs") and set ``test_topk``; ``sigmoid_scores`` says how class logits
    become probabilities (see :func:`~d2_detr.modeling.inference.select_batch_predictions`).
    """

    #: Class probabilities by sigmoid (focal-loss heads without "no object") instead of softmax.
    sigmoid_scores: bool = False

    def __init__(self, *, backbone: nn.Module, criterion: nn.Module, num_classes: int, pixel_mean: Tuple[float, ...],
                 pixel_std: Tuple[float, ...], test_topk: int, fold_frozen_bn: bool = True, channels_last: bool = True,
                 test_backbone_per_image: bool = True):
        """
        Args:
            backbone: a Detectron2 backbone.
            criterion: maps (outputs, targets) to (weighted losses, logging-only metrics).
            num_classes: foreground classes; ground-truth classes must lie in [0, num_classes).
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            test_topk: 0 to return every query with its best class, k > 0 for the best k (query, class) pairs.
            fold_frozen_bn: fold the backbone's frozen BatchNorms into the preceding convolutions
                (:func:`~d2_detr.layers.frozen_bn.fold_frozen_batchnorm`): same outputs up to float rounding.
            channels_last: feed the backbone channels-last (NHWC) images: same outputs up to float rounding,
                faster convolutions on CPU (oneDNN) and on tensor-core GPUs.
            test_backbone_per_image: at inference, run the backbone image by image when a batch holds images of
                different sizes (:meth:`features_per_image`), so that detections do not depend on which images
                share a batch; False runs the padded batch at once, as the original implementations do.
        """
        super().__init__()
        self.backbone = backbone
        self.criterion = criterion
        self.num_classes = num_classes
        self.test_topk = test_topk
        self.channels_last = channels_last
        self.test_backbone_per_image = test_backbone_per_image
        if fold_frozen_bn:
            logger.info(f"Folded {fold_frozen_batchnorm(backbone)} frozen BatchNorms into their convolutions")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def predict(self, images: ImageList) -> Dict:
        """Raw outputs of a padded batch: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalised cxcywh,
        "aux_outputs" (a list of such dicts for earlier decoder layers; empty at inference)."""
        raise NotImplementedError

    def training_outputs(self, images: ImageList, targets: List[Dict]) -> Dict:
        """The raw outputs the criterion gets in training: :meth:`predict`'s, which do not depend on the targets
        (a model that feeds them to its network, such as DINO's denoising, overrides this)."""
        return self.predict(images)

    def forward(self, batched_inputs: List[Dict]):
        """Training mode: the weighted losses (name -> scalar); the criterion's metrics go to the event storage.
        Eval mode: :meth:`inference`."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        outputs = self.training_outputs(images, targets)
        storage = get_event_storage()
        self.check_finite(outputs, storage.iter)
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
        results = select_predictions(outputs["pred_logits"], outputs["pred_boxes"], self.test_topk, self.sigmoid_scores)
        processed = [
            {"instances": self.to_instances(scores, labels, boxes, image_size, inp)}
            for (scores, labels, boxes), image_size, inp in zip(results, images.image_sizes, batched_inputs)
        ]
        self.postprocess(processed, outputs, images)
        return processed

    def postprocess(self, processed: List[Dict], outputs: Dict, images: ImageList) -> None:
        """Add further results (e.g. masks) to :meth:`inference`'s per-image dicts, in place; nothing here."""

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise, then pad bottom/right with zeros to a common size."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def features_per_image(
        self, compute: Callable[[Tensor], Mapping[str, Tensor]], images: ImageList
    ) -> Dict[str, Tensor]:
        """``compute`` (pixels (b, 3, h, w) -> name -> (b, C_f, H_f, W_f) maps) on the batch.

        In training the padded batch goes through ``compute`` at once (BatchNorm statistics need the batch). At
        inference, images of different sizes go through it one by one, cropped to their size, and their maps are
        zero-padded to the largest: otherwise convolutions (and normalisations) near an image's bottom/right border
        read the batch's padding, and a detection would depend on which images share its batch. That gives up
        batching for mixed-size batches (benchmarks/README.md measures it); with ``test_backbone_per_image`` False
        the padded batch goes through at once, as in the original implementations.
        """
        pixels = images.tensor  # (B, 3, H_pad, W_pad)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.training or not self.test_backbone_per_image or len(set(images.image_sizes)) == 1:
            return dict(compute(pixels))
        per_image = [compute(pixels[i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(images.image_sizes)]
        batched = {}
        for name in per_image[0]:
            maps = [features[name] for features in per_image]  # (1, C_f, h_f, w_f) each
            height = max(m.shape[-2] for m in maps)
            width = max(m.shape[-1] for m in maps)
            batched[name] = torch.cat([F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps])
        return batched

    @staticmethod
    def check_finite(outputs: Dict, iteration: int) -> None:
        """Stop training, naming the iteration, when predictions are NaN or infinite (the loss would be too)."""
        sets = [outputs, *outputs["aux_outputs"], *([outputs["enc_outputs"]] if "enc_outputs" in outputs else [])]
        tensors = [o[k] for o in sets for k in ("pred_logits", "pred_boxes")]
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
                raise ValueError(f"{type(self).__name__} in training mode needs 'instances' in every input dict; "
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
