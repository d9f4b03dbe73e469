"""Utilities around a trained DETR: inference on image files and visualisation (``d2_detr.utils.visualize``)."""
