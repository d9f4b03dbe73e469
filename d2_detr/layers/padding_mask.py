"""Padding masks of a padded image batch, at the resolution of a feature map."""
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F


def feature_padding_mask(
    image_sizes: Union[List[Tuple[int, int]], torch.Tensor],
    feature_hw: Tuple[int, int],
    stride: int,
    device: torch.device,
) -> torch.Tensor:
    """Which cells of a feature map lie outside each image's unpadded area.

    Cell (y, x) of image i is valid iff ``y < ceil(h_i / stride)`` and ``x < ceil(w_i / stride)``: the
    rule of DETR's Detectron2 wrapper, which unlike interpolating the pixel mask does not depend on how
    large the padded batch is, so results do not depend on which images share a batch.

    Args:
        image_sizes: (h, w) of each unpadded image, as in ``ImageList.image_sizes``, or a (B, 2) integer
            tensor of them (traced as an input of the graph by d2_detr.export).
        feature_hw: (H, W) of the feature map.
        stride: the feature map's stride with respect to the input image.
    Returns:
        BoolTensor (B, H, W), True on padded cells.
    """
    height, width = feature_hw
    if torch.jit.is_tracing() and not isinstance(image_sizes, torch.Tensor):
        # Traced ImageList sizes are 0-dim tensors (Detectron2's TracingAdapter, e.g. its FLOP counter): stacked,
        # they stay traced values instead of constants.
        image_sizes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes])
    elif not isinstance(image_sizes, torch.Tensor):
        image_sizes = torch.as_tensor(image_sizes, dtype=torch.int64)
    sizes = image_sizes.to(device=device, dtype=torch.int64).reshape(-1, 2)  # (B, 2)
    valid_hw = torch.div(sizes + stride - 1, stride, rounding_mode="floor")  # ceil(size / stride)
    rows = torch.arange(height, device=device)[None, :, None]  # (1, H, 1)
    cols = torch.arange(width, device=device)[None, None, :]  # (1, 1, W)
    return (rows >= valid_hw[:, 0, None, None]) | (cols >= valid_hw[:, 1, None, None])


def interpolated_padding_mask(
    image_sizes: List[Tuple[int, int]],
    padded_hw: Tuple[int, int],
    feature_hw: Tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """The original Deformable DETR / DINO rule: the padded batch's pixel mask (B, H_pad, W_pad), True outside each
    image, resized to the feature map by nearest interpolation. Unlike :func:`feature_padding_mask` it depends on
    the batch's padded size ``padded_hw``.

    Returns:
        BoolTensor (B, H, W) of the ``feature_hw`` map, True on padded cells.
    """
    pixels = torch.ones(len(image_sizes), *padded_hw, dtype=torch.bool, device=device)
    for i, (h, w) in enumerate(image_sizes):
        pixels[i, :h, :w] = False
    return F.interpolate(pixels[None].float(), size=tuple(feature_hw)).to(torch.bool)[0]
