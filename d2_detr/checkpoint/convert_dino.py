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
from typing import Dict, Mapping, Optional

import torch

from .convert_deformable import (
    COCO_SIGMOID_HEAD_ROWS,
    coco_sigmoid_class_head_rows,
    maps_coco_class_head,
    rename_original_keys,
)

logger = logging.getLogger(__name__)

__all__ = ["convert_dino_state_dict", "is_dino_state_dict"]

_KEPT_MODULES = ("transformer", "input_proj", "label_enc", "class_embed", "bbox_embed")
_RENAMED = {"transformer.enc_out_class_embed.": "enc_class_embed.",
            "transformer.enc_out_bbox_embed.": "enc_bbox_embed."}
_REQUIRED_KEYS = ("backbone.0.body.conv1.weight", "input_proj.0.0.weight", "transformer.level_embed",
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
    converted = rename_original_keys(state_dict, "DINO", _REQUIRED_KEYS, _KEPT_MODULES, renamed=_RENAMED)
    if not maps_coco_class_head(converted, coco_class_head):
        return converted
    class_rows = coco_sigmoid_class_head_rows()
    for name in [k for k in converted if k.startswith(("class_embed.", "enc_class_embed."))]:
        converted[name] = converted[name].index_select(0, torch.as_tensor(class_rows, device=converted[name].device))
    labels = converted["label_enc.weight"]
    label_rows = class_rows + [i for i in range(labels.shape[0]) if i not in set(class_rows)]
    converted["label_enc.weight"] = labels.index_select(0, torch.as_tensor(label_rows, device=labels.device))
    logger.info("Class heads: %d rows indexed by COCO category id -> %d (Detectron2's contiguous COCO classes), "
                "label_enc permuted alike; use MODEL.DETR.NUM_CLASSES %d", COCO_SIGMOID_HEAD_ROWS, len(class_rows),
                len(class_rows))
    return converted
