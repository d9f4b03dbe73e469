"""Export of ``Detr`` to TorchScript and ONNX (``tools/export_model.py``), and verification of the exported files.

    from d2_detr.export import export_model, verify_export
    path = export_model(model, "onnx", "exported/")              # -> exported/model.onnx
    verify_export(model, path, [image_a, image_b])                # outputs equal the PyTorch model's, or raises

The graph takes a padded image batch and the image sizes and returns boxes, scores, labels (and masks); see
d2_detr.export.wrapper. ONNX needs d2-detr's "export" extra (onnx, onnxruntime): pip install 'd2-detr[export]'.
"""
from .exporter import (
    EXPORT_FORMATS,
    MIN_ONNX_OPSET,
    ExportError,
    check_exportable_config,
    check_exportable_model,
    export_model,
    exported_file_name,
)
from .verify import ExportMismatchError, batch_images, compare_outputs, load_exported, reference_outputs, verify_export
from .wrapper import DetrExportWrapper, trace_detr

__all__ = [
    "EXPORT_FORMATS",
    "MIN_ONNX_OPSET",
    "DetrExportWrapper",
    "ExportError",
    "ExportMismatchError",
    "batch_images",
    "check_exportable_config",
    "check_exportable_model",
    "compare_outputs",
    "export_model",
    "exported_file_name",
    "load_exported",
    "reference_outputs",
    "trace_detr",
    "verify_export",
]
