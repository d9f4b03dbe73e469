"""Running an exported file (TorchScript or ONNX) and comparing its outputs with the PyTorch ``Detr``'s."""
import logging
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..env import import_optional
from .exporter import ExportError
from .wrapper import INPUT_NAMES, output_names

__all__ = [
    "ExportMismatchError",
    "batch_images",
    "compare_outputs",
    "load_exported",
    "reference_outputs",
    "verify_export",
]

logger = logging.getLogger(__name__)

#: An exported model as a function: (images (B, 3, H, W), image_sizes (B, 2)) -> output name -> tensor.
ExportedModel = Callable[[Tensor, Tensor], Dict[str, Tensor]]


class ExportMismatchError(ExportError):
    """An exported model's outputs differ from the PyTorch model's."""


def batch_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """(3, h_i, w_i) images -> the graph's inputs: (B, 3, H, W) zero-padded pixels and (B, 2) int64 sizes."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    batch = images[0].new_zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]] = image
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    return batch, sizes


def load_exported(path: str) -> ExportedModel:
    """An exported file as a function on CPU tensors: ``.onnx`` through onnxruntime (CPU), anything else through
    ``torch.jit.load``."""
    if path.endswith(".onnx"):
        onnxruntime = import_optional("onnxruntime", "export", "Running an ONNX file")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings about de-duplicated initializers
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def run_onnx(images: Tensor, image_sizes: Tensor) -> Dict[str, Tensor]:
            feed = {INPUT_NAMES[0]: images.cpu().numpy(), INPUT_NAMES[1]: image_sizes.cpu().numpy()}
            return {name: torch.from_numpy(np.asarray(value)) for name, value in zip(names, session.run(None, feed))}

        return run_onnx
    module = torch.jit.load(path, map_location="cpu")

    def run_torchscript(images: Tensor, image_sizes: Tensor) -> Dict[str, Tensor]:
        with torch.no_grad():
            outputs = module(images.cpu(), image_sizes.cpu())
        return dict(zip(output_names(with_masks=len(outputs) == 4), outputs))

    return run_torchscript


def reference_outputs(model: nn.Module, images: Sequence[Tensor]) -> Dict[str, Tensor]:
    """``Detr.inference`` on ``images`` ((3, h_i, w_i) pixels) as the exported graph's outputs: boxes (B, N, 4),
    scores (B, N), labels (B, N) and with a mask head masks (B, N, H, W), False beyond each image; on CPU."""
    results = [r["instances"].to("cpu") for r in model.inference([{"image": image} for image in images])]
    outputs = {
        "boxes": torch.stack([r.pred_boxes.tensor for r in results]),
        "scores": torch.stack([r.scores for r in results]),
        "labels": torch.stack([r.pred_classes for r in results]),
    }
    if results[0].has("pred_masks"):
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        masks = torch.zeros(len(results), len(results[0]), height, width, dtype=torch.bool)
        for i, r in enumerate(results):
            masks[i, :, : r.image_size[0], : r.image_size[1]] = r.pred_masks
        outputs["masks"] = masks
    return outputs


def compare_outputs(expected: Dict[str, Tensor], actual: Dict[str, Tensor], image_sizes: Tensor,
                    atol: float = 1e-4, max_mask_mismatch: float = 1e-3) -> Dict[str, float]:
    """How far ``actual`` outputs are from ``expected`` ones; raises :class:`ExportMismatchError` beyond tolerance.

    Scores must agree within ``atol``, and boxes within ``atol`` of the image size (x by the width, y by the
    height: the model's normalised boxes within ``atol``; float32 rounding grows with the pixel coordinates);
    labels exactly; masks are compared inside each image (the graph leaves the padding unspecified) and may
    differ on a fraction ``max_mask_mismatch`` of the pixels (logits within rounding of 0 flip). Returns per
    output the max absolute difference ("boxes" in pixels, "boxes_relative" relative to the image size; for
    labels and masks the fraction of differing labels and pixels).
    """
    missing = sorted(set(expected) - set(actual))
    if missing:
        raise ExportMismatchError(f"the exported model lacks the outputs {missing}; re-export it with this version.")
    report: Dict[str, float] = {}
    for name in ("boxes", "scores"):
        if expected[name].shape != actual[name].shape:
            raise ExportMismatchError(f"exported {name} have shape {tuple(actual[name].shape)}, the PyTorch model's "
                                      f"{tuple(expected[name].shape)}.")
        report[name] = float((expected[name].float() - actual[name].float()).abs().max())
    box_scale = image_sizes.flip(-1).repeat(1, 2).float()[:, None, :]  # (B, 1, 4): w, h, w, h
    report["boxes_relative"] = float(((expected["boxes"].float() - actual["boxes"].float()) / box_scale).abs().max())
    report["labels"] = float((expected["labels"] != actual["labels"]).float().mean())
    if "masks" in expected:
        differing: List[float] = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            differing.append(float((expected["masks"][i, :, :h, :w] != actual["masks"][i, :, :h, :w]).float().mean()))
        report["masks"] = max(differing)
    failures = []
    if not report["boxes_relative"] <= atol:
        failures.append(f"boxes differ by up to {report['boxes_relative']:.3g} of the image size (tolerance "
                        f"{atol:g}; {report['boxes']:.3g} pixels)")
    if not report["scores"] <= atol:
        failures.append(f"scores differ by up to {report['scores']:.3g} (tolerance {atol:g})")
    if report["labels"] > 0:
        failures.append(f"{report['labels']:.1%} of the labels differ")
    if report.get("masks", 0.0) > max_mask_mismatch:
        failures.append(f"{report['masks']:.2%} of the mask pixels differ (tolerance {max_mask_mismatch:.2%})")
    if failures:
        raise ExportMismatchError("the exported model's outputs differ from the PyTorch model's: "
                                  + "; ".join(failures))
    return report


def verify_export(model: nn.Module, path: str, images: Sequence[Tensor], atol: float = 1e-4) -> Dict[str, float]:
    """Run the exported file ``path`` and ``model`` (eval mode) on ``images`` ((3, h_i, w_i) pixels, one padded
    batch) and :func:`compare_outputs`; returns its report."""
    exported = load_exported(path)
    batch, sizes = batch_images([image.cpu() for image in images])
    with torch.no_grad():
        expected = reference_outputs(model, images)
    report = compare_outputs(expected, exported(batch, sizes), sizes, atol=atol)
    logger.info("Verified %s on %d image(s) of sizes %s against the PyTorch model: %s", path, len(images),
                sizes.tolist(), ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    return report
