"""Conversion of original Deformable DETR checkpoints (fundamentalvision/Deformable-DETR) to ``DeformableDetr``'s names.

The original names its backbone as torchvision's ResNet under ``backbone.0.body.`` (renamed to Detectron2's as for
DETR, see :mod:`d2_detr.checkpoint.convert`); ``input_proj.N``, ``transformer.*``, ``query_embed``,
``class_embed.N`` and ``bbox_embed.N`` already have ``DeformableDetr``'s names. With box refinement (and two-stage)
the original's decoder also holds the heads as ``transformer.decoder.bbox_embed.N`` (and ``.class_embed.N``):
copies of ``bbox_embed.N`` / ``class_embed.N``, dropped here after checking that they are equal.

Its COCO class head has 91 rows indexed by COCO category id (row 0 and the ids COCO skips unused) and no "no object"
row: every ``class_embed.N`` maps to Detectron2's 80 contiguous COCO classes. Two-stage, the last head scores the
encoder's proposals with its row 0 (the class-agnostic label 0 it is trained on); it keeps that row first, followed by
the rows of classes 1..79 (which only ever serve as negatives).
"""
import logging
from typing import Dict, List, Mapping, Optional

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .convert import _check_keys, _convert_resnet, _unknown_keys_error

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_SIGMOID_HEAD_ROWS",
    "coco_sigmoid_class_head_rows",
    "convert_deformable_detr_state_dict",
    "deformable_detr_variant",
    "is_deformable_detr_state_dict",
    "maps_coco_class_head",
    "rename_original_keys",
]

#: Rows of the original Deformable DETR COCO class head (category ids 0..90).
COCO_SIGMOID_HEAD_ROWS = 91
_BACKBONE_PREFIX = "backbone.0.body."
_KEPT_MODULES = ("transformer", "input_proj", "query_embed", "class_embed", "bbox_embed")
# The decoder's references to the model's heads (the original's refinement and two-stage implementation).
_DECODER_HEAD_COPIES = ("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")
_REQUIRED_KEYS = (_BACKBONE_PREFIX + "conv1.weight", "input_proj.0.0.weight", "transformer.level_embed",
                  "class_embed.0.weight", "bbox_embed.0.layers.0.weight")


def is_deformable_detr_state_dict(state_dict: Mapping) -> bool:
    """Whether a state dict has the original Deformable DETR layout (multi-level ``input_proj`` and
    ``transformer.level_embed``) rather than DETR's."""
    return "transformer.level_embed" in state_dict and "input_proj.0.0.weight" in state_dict


def deformable_detr_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"base"``, ``"refine"`` (iterative box refinement) or ``"two_stage"`` (with refinement, as released),
    read from the parameters: separate per-layer heads mean refinement, ``transformer.enc_output`` two-stage."""
    if "transformer.enc_output.weight" in state_dict:
        return "two_stage"
    refine = "bbox_embed.1.layers.0.weight" in state_dict and not torch.equal(
        state_dict["bbox_embed.0.layers.0.weight"], state_dict["bbox_embed.1.layers.0.weight"])
    return "refine" if refine else "base"


def coco_sigmoid_class_head_rows(proposal_head: bool = False) -> List[int]:
    """Rows of the original 91-row COCO class head in the order of Detectron2's 80 contiguous COCO classes
    (the category ids of the "isthing" entries of ``COCO_CATEGORIES``); for the two-stage proposal head, row 0 (its
    class-agnostic score) first, then those of classes 1..79."""
    rows = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    return [0] + rows[1:] if proposal_head else rows


def _check_head_copies(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Check that the decoder's head copies equal the model's heads; returns how many there are."""
    copies = [k for k in state_dict if k.startswith(_DECODER_HEAD_COPIES)]
    for key in copies:
        original = key[len("transformer.decoder."):]
        if original not in state_dict or not torch.equal(state_dict[key], state_dict[original]):
            raise ValueError(f"{key} should be a copy of {original} (the original stores the decoder's heads twice), "
                             "but it differs or is missing: the checkpoint is inconsistent")
    return len(copies)


def rename_original_keys(state_dict: Mapping[str, torch.Tensor], model: str, required: tuple, kept_modules: tuple,
                         detail: str = "", renamed: Optional[Mapping[str, str]] = None) -> Dict[str, torch.Tensor]:
    """The original ``model``'s (Deformable DETR, DINO) state dict in d2_detr's names, class heads untouched: the
    torchvision ResNet under ``backbone.0.body.`` renamed to Detectron2's, the decoder's copies of the heads checked
    and dropped, keys starting with a key of ``renamed`` given its value instead, modules ``kept_modules`` kept.

    Raises:
        ValueError: if ``required`` keys are missing or other keys have no counterpart.
    """
    hint = " Pass the checkpoint's 'model' entry, not the whole checkpoint." if "model" in state_dict else ""
    _check_keys(state_dict, required, f"an original {model} model state dict", hint)
    num_copies = _check_head_copies(state_dict)
    unknown: List[str] = []
    converted = _convert_resnet(state_dict, _BACKBONE_PREFIX, "backbone.", unknown)
    num_backbone = len(converted)
    renamed = renamed or {}
    for key, value in state_dict.items():
        if key.startswith((_BACKBONE_PREFIX, *_DECODER_HEAD_COPIES)):
            continue
        new_key = next((new + key[len(old):] for old, new in renamed.items() if key.startswith(old)), key)
        if new_key != key or key.split(".", 1)[0] in kept_modules:
            converted[new_key] = value
        else:
            unknown.append(key)
    if unknown:
        expected = f"torchvision ResNet keys under '{_BACKBONE_PREFIX}' and modules {list(kept_modules)}"
        raise _unknown_keys_error(unknown, f"the {model} state dict", expected)
    logger.info("%s checkpoint %s: %d backbone tensors renamed from torchvision's ResNet to Detectron2's, %d kept as "
                "they are, %d decoder copies of the heads dropped", model, detail, num_backbone,
                len(converted) - num_backbone, num_copies)
    return converted


def maps_coco_class_head(converted: Mapping[str, torch.Tensor], coco_class_head: Optional[bool]) -> bool:
    """Whether to map the 91-row COCO class heads of ``converted`` to Detectron2's 80 classes: ``coco_class_head``,
    or when None whether ``class_embed.0`` has 91 rows.

    Raises:
        ValueError: if ``coco_class_head`` is True for heads without 91 rows.
    """
    rows = converted["class_embed.0.weight"].shape[0]
    if coco_class_head is None:
        coco_class_head = rows == COCO_SIGMOID_HEAD_ROWS
    if not coco_class_head:
        logger.info("Class heads kept: %d rows; use MODEL.DETR.NUM_CLASSES %d", rows, rows)
        return False
    if rows != COCO_SIGMOID_HEAD_ROWS:
        raise ValueError(f"coco_class_head=True needs the original COCO class heads of {COCO_SIGMOID_HEAD_ROWS} rows, "
                         f"got {rows} rows")
    return True


def convert_deformable_detr_state_dict(
    state_dict: Mapping[str, torch.Tensor], coco_class_head: Optional[bool] = None
) -> Dict[str, torch.Tensor]:
    """An original Deformable DETR model state dict in ``DeformableDetr``'s names.

    Args:
        state_dict: the original model's ``state_dict()`` (the ``"model"`` entry of its checkpoints), any variant.
        coco_class_head: select the 80 rows of Detectron2's COCO classes from the 91-row COCO class heads. None
            (default): do so iff the heads have 91 rows; False: keep them (then MODEL.DETR.NUM_CLASSES = rows).

    Returns:
        The converted state dict (the same tensors, renamed; class head rows selected).

    Raises:
        ValueError: if ``state_dict`` does not look like an original Deformable DETR state dict, has keys with no
            counterpart in ``DeformableDetr``, or ``coco_class_head`` is True for heads without 91 rows.
    """
    converted = rename_original_keys(state_dict, "Deformable DETR", _REQUIRED_KEYS, _KEPT_MODULES,
                                     f"({deformable_detr_variant(state_dict)})")
    heads = [k for k in converted if k.startswith("class_embed.")]
    if not maps_coco_class_head(converted, coco_class_head):
        return converted
    proposal_head = _proposal_class_head(converted)
    for name in heads:
        index = torch.as_tensor(coco_sigmoid_class_head_rows(proposal_head=name.startswith(proposal_head or "-")))
        converted[name] = converted[name].index_select(0, index.to(converted[name].device))
    logger.info("Class heads: %d rows indexed by COCO category id -> %d (Detectron2's contiguous COCO classes%s); "
                "use MODEL.DETR.NUM_CLASSES %d", COCO_SIGMOID_HEAD_ROWS, len(index),
                f"; {proposal_head}* scores proposals with row 0" if proposal_head else "", len(index))
    return converted


def _proposal_class_head(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Two-stage: the key prefix of the proposals' class head (the last ``class_embed.N.``); None otherwise.

    Raises:
        ValueError: if the proposals share the class head with the decoder layers (two-stage without refinement),
            whose rows cannot serve both as proposal score (row 0) and as Detectron2's class 0 (row 1).
    """
    if "transformer.enc_output.weight" not in state_dict:
        return None
    last = max(int(k.split(".")[1]) for k in state_dict if k.startswith("class_embed."))
    if torch.equal(state_dict[f"class_embed.{last}.weight"], state_dict["class_embed.0.weight"]):
        raise ValueError("This two-stage checkpoint without box refinement scores proposals with row 0 of the class "
                         "head it shares with the detections, so the head cannot be mapped to Detectron2's 80 COCO "
                         "classes: convert with --keep-class-head (coco_class_head=False) and use "
                         "MODEL.DETR.NUM_CLASSES 91")
    return f"class_embed.{last}."
