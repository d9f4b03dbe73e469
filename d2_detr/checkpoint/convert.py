"""Conversion of original DETR and torchvision ResNet checkpoints to d2_detr's parameter names.

The original DETR (facebookresearch/detr) names its backbone as torchvision's ResNet under
``backbone.0.body.``; d2_detr's backbone is Detectron2's ResNet. Everything else (``transformer.*``,
``input_proj.*``, ``query_embed.*``, ``class_embed.*``, ``bbox_embed.*``) already has the original names.

Name mapping of the ResNet (torchvision -> Detectron2; ``i`` in 1..4, ``B`` the block, ``j`` in 1..3)::

    conv1.weight                   -> stem.conv1.weight
    bn1.{w,b,running_mean,var}     -> stem.conv1.norm.*
    layer{i}.B.conv{j}.weight      -> res{i+1}.B.conv{j}.weight
    layer{i}.B.bn{j}.*             -> res{i+1}.B.conv{j}.norm.*
    layer{i}.B.downsample.0.weight -> res{i+1}.B.shortcut.weight
    layer{i}.B.downsample.1.*      -> res{i+1}.B.shortcut.norm.*

BatchNorm's four tensors load as they are into Detectron2's ``FrozenBatchNorm2d`` (same buffers, same eps);
``num_batches_tracked`` has no counterpart there and is dropped.

Segmentation (``DETRsegm``, e.g. the panoptic models) checkpoints hold the detector under ``detr.`` and the mask
head as ``bbox_attention.*`` and ``mask_head.*``; they become ``Detr``'s names with the mask head under
``mask_head.`` (``bbox_attention.*`` -> ``mask_head.bbox_attention.*``). Their 251-row panoptic class head
(indexed by COCO panoptic category id, row 250 "no object") maps to Detectron2's 133 contiguous panoptic
classes + "no object".
"""
import argparse
import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from ..utils.file_io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "COCO_NO_OBJECT_ROW",
    "COCO_PANOPTIC_NO_OBJECT_ROW",
    "DETR_CHECKPOINT_DESCRIPTION",
    "TORCHVISION_RESNET_DESCRIPTION",
    "coco_class_head_rows",
    "coco_panoptic_class_head_rows",
    "convert_detr_state_dict",
    "convert_torchvision_resnet_state_dict",
    "load_state_dict_file",
    "resnet_depth",
    "save_converted_checkpoint",
]

# Row of the original COCO class head that scores "no object" (rows 1..90 are COCO category ids).
COCO_NO_OBJECT_ROW = 91
_COCO_HEAD_ROWS = COCO_NO_OBJECT_ROW + 1
# Row of the original COCO panoptic class head (num_classes 250) that scores "no object".
COCO_PANOPTIC_NO_OBJECT_ROW = 250
_COCO_PANOPTIC_HEAD_ROWS = COCO_PANOPTIC_NO_OBJECT_ROW + 1
_SEGM_DETR_PREFIX = "detr."
_SEGM_MASK_PREFIXES = ("bbox_attention.", "mask_head.")

#: What tools/convert_detr_checkpoint.py expects, for its error messages.
DETR_CHECKPOINT_DESCRIPTION = (
    "an original DETR checkpoint of facebookresearch/detr (e.g. detr-r50-e632da11.pth) or Deformable DETR "
    "checkpoint of fundamentalvision/Deformable-DETR (e.g. r50_deformable_detr-checkpoint.pth): a torch.save file "
    "with a \"model\" state dict of keys backbone.0.body.* (torchvision ResNet), transformer.*, input_proj.*, "
    "class_embed.*, bbox_embed.* (and query_embed.*)")
#: What tools/convert_torchvision_resnet.py expects, for its error messages.
TORCHVISION_RESNET_DESCRIPTION = (
    "a torchvision ResNet state dict (e.g. resnet50-0676ba61.pth): a torch.save file of keys conv1.*, bn1.*, "
    "layer1.* .. layer4.*, fc.*")

_DETR_BACKBONE_PREFIX = "backbone.0.body."
# The original Joiner's position embedding (``backbone.1``) has parameters only when "learned".
_DETR_POSITION_PREFIX = "backbone.1."
_DETR_KEPT_MODULES = ("transformer", "input_proj", "query_embed", "class_embed", "bbox_embed")
_DETR_REQUIRED_KEYS = (
    _DETR_BACKBONE_PREFIX + "conv1.weight",
    "input_proj.weight",
    "query_embed.weight",
    "class_embed.weight",
    "class_embed.bias",
)
# First bytes of a torch.save file: a zip archive (the default), or a pickle of protocol 2 (the legacy format).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02")
_RESNET_REQUIRED_KEYS = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer4.0.conv1.weight")

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_STEM_RE = re.compile(r"(?P<module>conv1|bn1)\.(?P<tensor>\w+)")
_BLOCK_RE = re.compile(
    r"layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<module>conv[1-3]|bn[1-3]|downsample\.[01])\.(?P<tensor>\w+)"
)
# Block counts of res2..res5 -> depth, for bottleneck (conv3 present) and basic blocks.
_BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BASIC_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


def _resnet_name(name: str) -> Optional[str]:
    """Detectron2's name of a torchvision ResNet tensor (``name`` without prefix); None if not a ResNet
    convolution or BatchNorm tensor."""
    stem = _STEM_RE.fullmatch(name)
    if stem:
        if stem["module"] == "conv1":
            return "stem.conv1.weight" if stem["tensor"] == "weight" else None
        return f"stem.conv1.norm.{stem['tensor']}" if stem["tensor"] in _BN_TENSORS else None
    block = _BLOCK_RE.fullmatch(name)
    if not block:
        return None
    prefix = f"res{int(block['stage']) + 1}.{block['block']}"
    module, tensor = block["module"], block["tensor"]
    if module.startswith("conv") or module == "downsample.0":
        conv = "shortcut" if module == "downsample.0" else module
        return f"{prefix}.{conv}.weight" if tensor == "weight" else None
    conv = "shortcut" if module == "downsample.1" else "conv" + module[-1]
    return f"{prefix}.{conv}.norm.{tensor}" if tensor in _BN_TENSORS else None


def _check_keys(state_dict: Mapping, required: tuple, what: str, hint: str = "") -> None:
    """Raise a ValueError naming the expected and the found keys if ``state_dict`` lacks ``required``."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"Expected {what} (a dict of tensors), got {type(state_dict).__name__}")
    missing = [k for k in required if k not in state_dict]
    if missing:
        found = sorted(state_dict)
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} keys)" if len(found) > 8 else "")
        raise ValueError(
            f"This does not look like {what}: expected keys {list(required)}, missing {missing}; "
            f"found: {shown or 'no keys'}.{hint}"
        )


def _unknown_keys_error(unknown: List[str], what: str, expected: str) -> ValueError:
    """A ValueError naming (some of) the ``unknown`` keys of ``what`` and the ``expected`` key families."""
    unknown = sorted(unknown)
    shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} keys)" if len(unknown) > 8 else "")
    return ValueError(f"{len(unknown)} keys of {what} have no counterpart in d2_detr ({shown}); expected {expected}.")


def _convert_resnet(
    state_dict: Mapping[str, torch.Tensor], src_prefix: str, dst_prefix: str, unknown: List[str]
) -> Dict[str, torch.Tensor]:
    """Rename the tensors under ``src_prefix``; dropped: num_batches_tracked; unmatched keys go to ``unknown``."""
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(src_prefix) or key.endswith("num_batches_tracked"):
            continue
        name = _resnet_name(key[len(src_prefix):])
        if name is None:
            unknown.append(key)
        else:
            converted[dst_prefix + name] = value
    return converted


def coco_class_head_rows() -> List[int]:
    """Rows of the original 92-row COCO class head, in the order of d2_detr's COCO head.

    Entry ``i`` (< 80) is the COCO category id of Detectron2's contiguous class ``i`` (the "isthing"
    categories of ``COCO_CATEGORIES``, in order); the last entry is the "no object" row.
    """
    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]] + [COCO_NO_OBJECT_ROW]


def coco_panoptic_class_head_rows() -> List[int]:
    """Rows of the original 251-row COCO panoptic class head, in the order of d2_detr's COCO panoptic head:
    the COCO category ids of ``COCO_CATEGORIES`` (Detectron2's 133 contiguous panoptic classes, things and stuff),
    then the "no object" row."""
    return [c["id"] for c in COCO_CATEGORIES] + [COCO_PANOPTIC_NO_OBJECT_ROW]


def _split_segm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict, Dict]:
    """A DETRsegm state dict -> (the detector's state dict without ``detr.``, the mask head in d2_detr's names).
    Other keys stay in the detector's dict, to be reported as unknown there."""
    detector: Dict[str, torch.Tensor] = {}
    mask_head: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_SEGM_DETR_PREFIX):
            detector[key[len(_SEGM_DETR_PREFIX):]] = value
        elif key.startswith(_SEGM_MASK_PREFIXES):
            mask_head[key if key.startswith("mask_head.") else "mask_head." + key] = value
        else:
            detector[key] = value
    return detector, mask_head


def convert_detr_state_dict(
    state_dict: Mapping[str, torch.Tensor], coco_class_head: Optional[bool] = None
) -> Dict[str, torch.Tensor]:
    """An original DETR model state dict (facebookresearch/detr) in d2_detr's ``Detr`` names.

    Args:
        state_dict: the original model's ``state_dict()`` (the ``"model"`` entry of its checkpoint); a DETRsegm
            one (keys under ``detr.``) also gives the mask head's tensors.
        coco_class_head: map the COCO class head (92 rows indexed by COCO category id, row 91 "no object")
            to Detectron2's 80 contiguous COCO classes + "no object", or the COCO panoptic head (251 rows,
            row 250 "no object") to its 133 panoptic classes + "no object". None (default): do so iff the head
            has 92 or 251 rows; False: keep the head as it is (then MODEL.DETR.NUM_CLASSES = rows - 1).

    Returns:
        The converted state dict (the same tensors, renamed; class head rows selected).

    Raises:
        ValueError: if ``state_dict`` does not look like an original DETR state dict, has keys with no
            counterpart in ``Detr``, or ``coco_class_head`` is True for a head that does not have 92 rows.
    """
    mask_head: Dict[str, torch.Tensor] = {}
    if isinstance(state_dict, Mapping) and any(str(k).startswith(_SEGM_DETR_PREFIX) for k in state_dict):
        state_dict, mask_head = _split_segm_state_dict(state_dict)
        logger.info("DETRsegm checkpoint: %d mask head tensors -> mask_head.*", len(mask_head))
    hint = ""
    if isinstance(state_dict, Mapping) and "model" in state_dict:
        hint = " Pass the checkpoint's 'model' entry, not the whole checkpoint."
    _check_keys(state_dict, _DETR_REQUIRED_KEYS, "an original DETR model state dict", hint)

    unknown: List[str] = []
    converted = _convert_resnet(state_dict, _DETR_BACKBONE_PREFIX, "backbone.", unknown)
    num_backbone = len(converted)
    for key, value in state_dict.items():
        if key.startswith(_DETR_BACKBONE_PREFIX) or key.endswith("num_batches_tracked"):
            continue
        if key.startswith(_DETR_POSITION_PREFIX):
            converted["position_encoding." + key[len(_DETR_POSITION_PREFIX):]] = value
        elif key.split(".", 1)[0] in _DETR_KEPT_MODULES:
            converted[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(
            unknown, "the DETR state dict",
            f"torchvision ResNet keys under '{_DETR_BACKBONE_PREFIX}' and modules {list(_DETR_KEPT_MODULES)}",
        )
    num_dropped = sum(1 for k in state_dict if k.endswith("num_batches_tracked"))
    logger.info(
        "DETR checkpoint: %d backbone tensors renamed from torchvision's ResNet (backbone.0.body.*) to "
        "Detectron2's (backbone.stem/res2..res5.*), %d kept as they are, %d num_batches_tracked dropped",
        num_backbone, len(converted) - num_backbone, num_dropped,
    )

    rows = converted["class_embed.weight"].shape[0]
    if coco_class_head is None:
        coco_class_head = rows in (_COCO_HEAD_ROWS, _COCO_PANOPTIC_HEAD_ROWS)
    if coco_class_head:
        if rows not in (_COCO_HEAD_ROWS, _COCO_PANOPTIC_HEAD_ROWS):
            raise ValueError(f"coco_class_head=True needs the original COCO class head of {_COCO_HEAD_ROWS} rows "
                             f"(or the panoptic one of {_COCO_PANOPTIC_HEAD_ROWS}), got {rows} rows")
        panoptic = rows == _COCO_PANOPTIC_HEAD_ROWS
        index = torch.as_tensor(coco_panoptic_class_head_rows() if panoptic else coco_class_head_rows())
        for name in ("class_embed.weight", "class_embed.bias"):
            converted[name] = converted[name].index_select(0, index.to(converted[name].device))
        logger.info(
            "Class head: %d rows indexed by COCO category id -> %d (Detectron2's contiguous COCO %sclasses, then "
            "'no object' from row %d); use MODEL.DETR.NUM_CLASSES %d",
            rows, len(index), "panoptic " if panoptic else "", index[-1].item(), len(index) - 1,
        )
    else:
        logger.info("Class head kept: %d rows; use MODEL.DETR.NUM_CLASSES %d", rows, rows - 1)
    converted.update(mask_head)
    return converted


def convert_torchvision_resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A torchvision (ImageNet) ResNet state dict as initial weights of ``Detr``'s backbone.

    Returns the backbone tensors in Detectron2's names prefixed with ``backbone.``; the classifier (``fc``)
    and ``num_batches_tracked`` are dropped.

    Raises:
        ValueError: if ``state_dict`` does not look like a torchvision ResNet state dict or has keys that
            are not part of one.
    """
    hint = ""
    if isinstance(state_dict, Mapping) and _DETR_BACKBONE_PREFIX + "conv1.weight" in state_dict:
        hint = " This is an original DETR state dict: use convert_detr_state_dict (tools/convert_detr_checkpoint.py)."
    _check_keys(state_dict, _RESNET_REQUIRED_KEYS, "a torchvision ResNet state dict", hint)
    unknown: List[str] = []
    converted = _convert_resnet(state_dict, "", "backbone.", unknown)
    unknown = [k for k in unknown if not k.startswith("fc.")]
    if unknown:
        raise _unknown_keys_error(
            unknown, "the ResNet state dict", "torchvision ResNet keys (conv1, bn1, layer1..4, fc)"
        )
    logger.info(
        "torchvision ResNet: %d tensors renamed to Detectron2's backbone.stem/res2..res5.*; "
        "dropped fc and num_batches_tracked (%d keys)", len(converted), len(state_dict) - len(converted),
    )
    return converted


def resnet_depth(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> Optional[int]:
    """Depth (18, 34, 50, 101, 152) of the Detectron2-named ResNet under ``prefix``; None if not a standard one."""
    blocks = []
    for stage in range(2, 6):
        pattern = re.compile(re.escape(f"{prefix}res{stage}.") + r"(\d+)\.")
        ids = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
        blocks.append(max(ids) + 1 if ids else 0)
    bottleneck = f"{prefix}res2.0.conv3.weight" in state_dict
    return (_BOTTLENECK_DEPTHS if bottleneck else _BASIC_DEPTHS).get(tuple(blocks))


def _describe_start(head: bytes) -> str:
    """What the first bytes of a file that torch.save did not write look like, for an error message."""
    if head[:1] == b"\x80":
        return f"it is a plain Python pickle (protocol {head[1]}), not a torch.save file"
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
        kind = "an HTML page" if text.lstrip().lower().startswith(("<!doctype html", "<html")) else "text"
        return f"it is {kind}, starting with {first_line!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _unsupported_global(error: Exception) -> Optional[str]:
    """The class or function a ``weights_only`` load refused, from torch's message; None if not such an error."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return match.group(1) if match else None


def load_state_dict_file(path: str, expected: str = "a checkpoint written by torch.save") -> Dict[str, torch.Tensor]:
    """The model state dict of a ``torch.save`` file: its ``"model"`` entry if it has one, else the file's dict.

    Loads with ``weights_only=True`` where torch supports it (argparse.Namespace, which DETR's training
    checkpoints store under ``"args"``, is allowed), so no code from the file runs.

    Args:
        expected: what the file should be, for the error messages.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: naming ``path`` and ``expected``, if the file is empty, was not written by torch.save (text,
            a web page, a plain pickle), is truncated or corrupt, holds objects other than tensors and plain
            containers (e.g. a whole pickled model), or holds no dict.
    """
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path} {what}; expected {expected}.")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ValueError(f"{path} is empty: download or copy it again; expected {expected}.")
    if not head.startswith(_TORCH_MAGIC):
        raise ValueError(f"{path} was not written by torch.save: {_describe_start(head)}; expected {expected}.")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:  # torch < 2.5: no allow-list for weights_only loading
            data = torch.load(path, map_location="cpu")
        else:
            with safe_globals([argparse.Namespace]):
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds of errors on a damaged file
        refused = _unsupported_global(e)
        if refused:
            raise ValueError(
                f"{path} holds a {refused}, not only tensors and plain containers; d2_detr loads checkpoints "
                f"without running code from them. Expected {expected}. (For a whole model saved with "
                f"torch.save(model), save torch.save(model.state_dict(), path) instead.)") from e
        reason = str(e).strip().split(". ")[0].splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"{path} cannot be read by torch.load ({type(e).__name__}: {reason}): it is truncated or "
                         f"corrupt. Download or copy it again; expected {expected}.") from e
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        return dict(data["model"])
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict or a checkpoint dict; "
                         f"expected {expected}.")
    return dict(data)


def save_converted_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Write ``{"model": state_dict, "__author__": "d2_detr", "matching_heuristics": False}`` with
    ``torch.save``, atomically (:func:`d2_detr.utils.file_io.atomic_write`).

    Detectron2's ``DetectionCheckpointer`` (``MODEL.WEIGHTS``) loads the result by exact names.

    Raises:
        ValueError: if ``path`` ends with ``.pkl`` (Detectron2 reads those as pickles, not torch files).
    """
    if path.endswith(".pkl"):
        raise ValueError(f"{path}: Detectron2 reads .pkl files as plain pickles; use a .pth name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoint = {"model": dict(state_dict), "__author__": "d2_detr", "matching_heuristics": False}
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    logger.info("Wrote %d tensors to %s", len(state_dict), path)
