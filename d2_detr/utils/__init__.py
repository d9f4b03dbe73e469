"""Utilities around a DETR: inference on image files and visualisation (``d2_detr.utils.visualize``), FLOP counts
with Detectron2's analysis tools (``d2_detr.utils.analysis``), atomic file writes (``d2_detr.utils.file_io``,
importing nothing of d2_detr)."""
