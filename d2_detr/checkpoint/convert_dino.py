"""Conversion of original DINO checkpoints (IDEA-Research/DINO, e.g. ``checkpoint0011_4scale.pth``) to ``Dino``'s
names.

The original names its backbone as torchvision's ResNet under ``backbone.0.body.`` (renamed as for DETR, see
:mod:`d2_detr.checkpoint.convert`); ``input_proj.N``, ``transformer.*``, ``label_enc``, ``class_embed.N`` and
``bbox_embed.N`` already have ``Dino``'s names. The encoder's heads ``transformer.enc_out_class_embed`` and
``transformer.enc_out_bbox_embed`` become ``enc_class_embed`` and ``enc_bbox_embed``; the decoder's references to
the shared heads (``transformer.decoder.class_embed.N``, ``.bbox_embed.N``) are dropped after checking that they are
copies.

COCO checkpoints have 91 class rows indexed by COCO category id: the class heads (decoder and encoder, both
class-aware) keep the rows of Detectron2's 80 contiguous COCO classes, and the denoising label embedding
``label_enc`` (labelbook 91 + 1 rows) is permuted so that its row c is that of class c's category id, the other
rows following in their order (so MODEL.DINO.DN_LABELBOOK_SIZE stays 91).
"""
import logging
from typing import Dict, List, Mapping, Optional

import torch

from .convert import _check_keys, _convert_resnet, _unknown_keys_error
from .convert_deformable import COCO_SIGMOID_HEAD_ROWS, _check_head_copies, coco_sigmoid_class_head_rows

logger = logging.getLogger(__name__)

__all__ = ["convert_dino_state_dict", "is_dino_state_dict"]

_BACKBONE_PREFIX = "backbone.0.body."
_KEPT_MODULES = ("transformer", "input_proj", "label_enc", "class_embed", "bbox_embed")
_DECODER_HEAD_COPIES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")
_RENAMED = {"transformer.enc_out_class_embed.": "enc_class_embed.", "transformer.enc_out_bbox_embed.": "enc_bbox_embed."}
_REQUIRED_KEYS = (_BACKBONE_PREFIX + "conv1.weight", "input_proj.0.0.weight", "transformer.level_embed",
                  "label_enc.weight", "class_embed.0.weight", "bbox_embed.0.layers.0.weight")


def is_dino_state_dict(state_dict: Mapping) -> bool:
    """Whether a state dict has the original DINO layout (a denoising label embedding and box-conditioned
    positional queries)."""
    return "label_enc.weight" in state_dict and "transformer.decoder.ref_point_head.layers.0.weight" in state_dict


def convert_dino_state_dict(state_dict: Mapping[str, torch.Tensor],
                            coco_class_head: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """An original DINO model state dict in ``Dino``'s names.

    Args:
        state_dict: the original model's ``state_dict()`` (the ``"model"`` entry of its checkpoints).
        coco_class_head: map the 91-row COCO class heads and label embedding to Detectron2's 80 classes (see the
            module docstring). None (default): do so iff the heads have 91 rows; False: keep them (then
            MODEL.DETR.NUM_CLASSES = rows).

    Raises:
        ValueError: if ``state_dict`` does not look like an original DINO state dict, has keys with no counterpart in
            ``Dino``, or ``coco_class_head`` is True for heads without 91 rows.
    """
    hint = " Pass the checkpoint's 'model' entry, not the whole checkpoint." if "model" in state_dict else ""
    _check_keys(state_dict, _REQUIRED_KEYS, "an original DINO model state dict", hint)
    num_copies = _check_head_copies(state_dict)
    unknown: List[str] = []
    converted = _convert_resnet(state_dict, _BACKBONE_PREFIX, "backbone.", unknown)
    num_backbone = len(converted)
    for key, value in state_dict.items():
        if key.startswith((_BACKBONE_PREFIX, *_DECODER_HEAD_COPIES)):
            continue
        renamed = next((new + key[len(old):] for old, new in _RENAMED.items() if key.startswith(old)), key)
        if renamed.split(".", 1)[0] in _KEPT_MODULES + ("enc_class_embed", "enc_bbox_embed"):
            converted[renamed] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(unknown, "the DINO state dict",
                                  f"torchvision ResNet keys under '{_BACKBONE_PREFIX}' and modules {list(_KEPT_MODULES)}")
    logger.info("DINO checkpoint: %d backbone tensors renamed from torchvision's ResNet to Detectron2's, %d kept, "
                "%d decoder copies of the heads dropped", num_backbone, len(converted) - num_backbone, num_copies)
    rows = converted["class_embed.0.weight"].shape[0]
    if coco_class_head is None:
        coco_class_head = rows == COCO_SIGMOID_HEAD_ROWS
    if not coco_class_head:
        logger.info("Class heads kept: %d rows; use MODEL.DETR.NUM_CLASSES %d", rows, rows)
        return converted
    if rows != COCO_SIGMOID_HEAD_ROWS:
        raise ValueError(f"coco_class_head=True needs the original COCO class heads of {COCO_SIGMOID_HEAD_ROWS} rows, "
                         f"got {rows} rows")
    class_rows = coco_sigmoid_class_head_rows()
    for name in [k for k in converted if k.startswith(("class_embed.", "enc_class_embed."))]:
        converted[name] = converted[name].index_select(0, torch.as_tensor(class_rows, device=converted[name].device))
    labels = converted["label_enc.weight"]
    label_rows = class_rows + [i for i in range(labels.shape[0]) if i not in set(class_rows)]
    converted["label_enc.weight"] = labels.index_select(0, torch.as_tensor(label_rows, device=labels.device))
    logger.info("Class heads: %d rows indexed by COCO category id -> %d (Detectron2's contiguous COCO classes), "
                "label_enc permuted alike; use MODEL.DETR.NUM_CLASSES %d", rows, len(class_rows), len(class_rows))
    return converted
