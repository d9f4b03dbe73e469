"""Writing a ``Detr`` or ``DeformableDetr`` to a TorchScript or ONNX file (see d2_detr.export.wrapper for the graph's inputs and outputs).

Both formats come from one TorchScript module (:func:`~d2_detr.export.wrapper.trace_detr`): saved as it is with
``torch.jit.save``, or converted by PyTorch's TorchScript-based ONNX exporter (``torch.onnx.export(...,
dynamo=False)``), which turns its scripted per-image backbone loop into an ONNX ``Loop``. That exporter is
deprecated in favour of the ``torch.export``-based one (``dynamo=True``), which is not used here: ``torch.export``
cannot capture a Python loop over a run-time batch size, so the loop would have to be rewritten with torch's
control-flow operators (``scan``/``while_loop``) around crops whose sizes are read from a tensor (data-dependent
shapes through the whole backbone), and it needs the onnxscript package; the TorchScript-based exporter converts
the very module shipped as the TorchScript file.
"""
import logging
import math
import os
import warnings
from typing import Tuple

import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from ..env import import_optional, require_extra
from ..modeling.deformable_detr import DeformableDetr
from ..modeling.detr import Detr
from ..modeling.dino import Dino
from .wrapper import INPUT_NAMES, per_image_feature_module, output_names, trace_detr

__all__ = [
    "EXPORT_FORMATS",
    "MIN_ONNX_OPSET",
    "ExportError",
    "check_exportable_config",
    "check_exportable_model",
    "example_inputs",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "exported_file_name",
]

logger = logging.getLogger(__name__)

#: Formats :func:`export_model` writes.
EXPORT_FORMATS: Tuple[str, ...] = ("torchscript", "onnx")
#: Oldest ONNX opset written (the default): opset 17 has LayerNormalization and the attention ops' masking.
MIN_ONNX_OPSET = 17
# Example sizes (h, w) of the two padded images the graph is traced on: different sizes, not multiples of 32.
_EXAMPLE_SIZES = ((128, 160), (97, 131))
# Meta-architectures d2_detr.export exports.
_EXPORTABLE = {"Detr": Detr, "DeformableDetr": DeformableDetr, "Dino": Dino}


_PADDING_VARIANT = (
    "MODEL.DEFORMABLE_DETR.PADDING_INVARIANT=False: the exported graph computes each image's padding masks from its "
    "own size (the ceil rule), which the original's masks interpolated from the padded batch are not. Export with "
    "the override MODEL.DEFORMABLE_DETR.PADDING_INVARIANT True: the weights are the same, and for one image at a "
    "time so are the detections.")


class ExportError(ValueError):
    """A model or config that cannot be exported; the message names the part, says why and what to do."""


def check_exportable_config(cfg: CfgNode) -> None:
    """Raise :class:`ExportError` if a model built from ``cfg`` cannot be exported (check before building it)."""
    if cfg.MODEL.META_ARCHITECTURE not in _EXPORTABLE:
        raise ExportError(f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}: d2_detr.export exports the "
                          f"{', '.join(_EXPORTABLE)} meta-architectures only; use a DETR, Deformable DETR or DINO config "
                          "(e.g. configs/detr_r50.yaml, configs/deformable_detr_r50.yaml).")
    if cfg.MODEL.DETR.COMPILE_TRANSFORMER:
        raise ExportError("MODEL.DETR.COMPILE_TRANSFORMER=True: a torch.compile'd transformer cannot be traced "
                          "for export (its graph belongs to the compiler). Export with the override "
                          "MODEL.DETR.COMPILE_TRANSFORMER False: the exported file is the same model.")
    if cfg.MODEL.META_ARCHITECTURE != "Detr" and not cfg.MODEL.DEFORMABLE_DETR.PADDING_INVARIANT:
        raise ExportError(_PADDING_VARIANT)
    if cfg.MODEL.MASK_ON and cfg.MODEL.DETR.PANOPTIC_ON:
        raise ExportError(
            "MODEL.DETR.PANOPTIC_ON=True: the panoptic post-processing "
            "(d2_detr.modeling.segmentation_inference.panoptic_inference) cannot be exported: it merges the kept "
            "queries into segments in a data-dependent Python loop (the number of segments, stuff-class merging "
            "and re-assignment of too-small segments depend on the predictions), which neither TorchScript "
            "tracing nor ONNX can express. Export with the override MODEL.DETR.PANOPTIC_ON False (the graph then "
            "returns boxes, scores, labels and masks) and run panoptic_inference on its outputs.")


def check_exportable_model(model: nn.Module) -> None:
    """Raise :class:`ExportError` if ``model`` cannot be exported: not a ``Detr`` or ``DeformableDetr``, a compiled
    transformer, panoptic post-processing, or a backbone whose feature sizes break the rule the graph pads by."""
    if not isinstance(model, tuple(_EXPORTABLE.values())):
        raise ExportError(f"d2_detr.export exports {', '.join(_EXPORTABLE)} models, not {type(model).__name__}; "
                          f"set MODEL.META_ARCHITECTURE to one of them.")
    if getattr(model.transformer, "_compiled_call_impl", None) is not None:
        raise ExportError("the transformer is compiled (MODEL.DETR.COMPILE_TRANSFORMER=True): a torch.compile'd "
                          "module cannot be traced for export; build the model with "
                          "MODEL.DETR.COMPILE_TRANSFORMER False.")
    if getattr(getattr(model, "mask_postprocessor", None), "panoptic_on", False):
        raise ExportError("MODEL.DETR.PANOPTIC_ON=True: the panoptic post-processing cannot be exported (a "
                          "data-dependent Python loop); export with MODEL.DETR.PANOPTIC_ON False and run "
                          "d2_detr.modeling.segmentation_inference.panoptic_inference on the exported outputs.")
    if not getattr(model.transformer, "padding_invariant", True):
        raise ExportError(_PADDING_VARIANT)
    _check_backbone_sizes(model)


def _check_backbone_sizes(model: nn.Module) -> None:
    """The exported graph pads each image's features to ceil(H / stride) x ceil(W / stride), the padding mask's
    rule; a backbone giving other sizes would misplace or cut features, so it is refused here."""
    features, names, strides, _ = per_image_feature_module(model)
    h, w = _EXAMPLE_SIZES[1]
    image = torch.zeros(1, 3, h, w, device=model.device)
    with torch.no_grad():
        maps = features(image)
    for name, feature, stride in zip(names, maps, strides):
        expected = (math.ceil(h / stride), math.ceil(w / stride))
        if tuple(feature.shape[-2:]) != expected:
            raise ExportError(
                f"backbone {type(model.backbone).__name__} (MODEL.BACKBONE.NAME) gives a {h}x{w} image "
                f"{tuple(feature.shape[-2:])} '{name}' cells, not ceil(size / stride {stride}) = {expected}: the "
                "exported graph runs the backbone on each image alone and pads its features to ceil(H / stride) x "
                "ceil(W / stride) cells (the padding mask's rule), so this backbone cannot be exported. Use a "
                "backbone that pads as Detectron2's ResNet does (every stride-s layer gives ceil(size / s)).")


def example_inputs(model: Detr) -> Tuple[Tensor, Tensor]:
    """A padded batch of two random images of different sizes, (2, 3, H, W) pixels and (2, 2) int64 sizes,
    on the model's device: the inputs the graph is traced on."""
    generator = torch.Generator().manual_seed(0)
    height = max(h for h, _ in _EXAMPLE_SIZES)
    width = max(w for _, w in _EXAMPLE_SIZES)
    images = torch.zeros(len(_EXAMPLE_SIZES), 3, height, width)
    for i, (h, w) in enumerate(_EXAMPLE_SIZES):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=generator) * 255
    sizes = torch.tensor(_EXAMPLE_SIZES, dtype=torch.int64)
    return images.to(model.device), sizes.to(model.device)


def exported_file_name(fmt: str) -> str:
    """File name :func:`export_model` writes in its output folder for format ``fmt``."""
    return {"torchscript": "model.ts", "onnx": "model.onnx"}[fmt]


def export_torchscript(module: torch.jit.ScriptModule, path: str) -> None:
    """Save the traced graph of :func:`~d2_detr.export.wrapper.trace_detr` (load it with ``torch.jit.load``)."""
    torch.jit.save(module, path)


def export_onnx(module: torch.jit.ScriptModule, inputs: Tuple[Tensor, Tensor], path: str, with_masks: bool,
                opset: int = MIN_ONNX_OPSET) -> None:
    """Convert the traced graph of :func:`~d2_detr.export.wrapper.trace_detr` to ONNX at ``path``, with dynamic
    batch size and image size, and check the file with ``onnx.checker``.

    Args:
        module: the traced graph.
        inputs: the example inputs it was traced on.
        with_masks: whether the graph returns masks (the model has a mask head).
        opset: ONNX opset, at least :data:`MIN_ONNX_OPSET`.
    """
    onnx = import_optional("onnx", "export", "ONNX export")
    _check_opset(opset)
    outputs = output_names(with_masks)
    dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}}
    dynamic_axes.update({name: {0: "batch"} for name in outputs})
    if with_masks:
        dynamic_axes["masks"] = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated (see the module's documentation) and cannot read a traced
        # module's argument names (they are given as input_names): both warnings say nothing about this model.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="no signature found for", category=UserWarning)
        torch.onnx.export(module, inputs, path, dynamo=False, opset_version=opset, input_names=list(INPUT_NAMES),
                          output_names=list(outputs), dynamic_axes=dynamic_axes)
    onnx.checker.check_model(path)


def _check_opset(opset: int) -> None:
    if opset < MIN_ONNX_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: the export needs opset {MIN_ONNX_OPSET} or newer.")


def export_model(model: nn.Module, fmt: str, output_dir: str, opset: int = MIN_ONNX_OPSET) -> str:
    """Export ``model`` (a ``Detr`` or ``DeformableDetr``; put in eval mode) to ``output_dir`` in format ``fmt``; returns the file's path.

    Raises :class:`ExportError` for an unknown format or a model that cannot be exported, and
    :class:`~d2_detr.env.MissingExtraError` for ONNX without d2-detr's "export" extra (onnx, onnxruntime).
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    if fmt == "onnx":
        _check_opset(opset)
        require_extra("export", "ONNX export")  # before tracing, not after
    check_exportable_model(model)
    model.eval()
    inputs = example_inputs(model)
    try:
        module = trace_detr(model, *inputs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ExportError(f"tracing the model failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); a part "
                          "of the model (a custom backbone, transformer or head) is not traceable with "
                          "torch.jit.trace: it must compute with tensor operations only, without converting "
                          "tensors to Python numbers.") from e
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, exported_file_name(fmt))
    if fmt == "torchscript":
        export_torchscript(module, path)
    else:
        export_onnx(module, inputs, path, with_masks=getattr(model, "mask_head", None) is not None, opset=opset)
    logger.info("Exported %s to %s (%.1f MB)", fmt, path, os.path.getsize(path) / 2**20)
    return path
