"""Padding masks of a padded image batch, at the resolution of a feature map."""
from typing import List, Tuple

import torch


def feature_padding_mask(
    image_sizes: List[Tuple[int, int]], feature_hw: Tuple[int, int], stride: int, device: torch.device
) -> torch.Tensor:
    """Which cells of a feature map lie outside each image's unpadded area.

    Cell (y, x) of image i is valid iff ``y < ceil(h_i / stride)`` and ``x < ceil(w_i / stride)``: the
    rule of DETR's Detectron2 wrapper, which unlike interpolating the pixel mask does not depend on how
    large the padded batch is, so results do not depend on which images share a batch.

    Args:
        image_sizes: (h, w) of each unpadded image, as in ``ImageList.image_sizes``.
        feature_hw: (H, W) of the feature map.
        stride: the feature map's stride with respect to the input image.
    Returns:
        BoolTensor (B, H, W), True on padded cells.
    """
    height, width = feature_hw
    sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=device).reshape(-1, 2)  # (B, 2)
    valid_hw = torch.div(sizes + stride - 1, stride, rounding_mode="floor")  # ceil(size / stride)
    rows = torch.arange(height, device=device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(width, device=device)[None, None, :]  # (1, 1, W)
    return (rows >= valid_hw[:, 0, None, None]) | (cols >= valid_hw[:, 1, None, None])
