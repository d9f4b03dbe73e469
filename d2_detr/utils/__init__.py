"""Utilities: atomic file writes (``d2_detr.utils.file_io``, importing nothing of d2_detr), inference on image
files and visualisation of a trained DETR (``d2_detr.utils.visualize``)."""
