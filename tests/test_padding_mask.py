"""d2_detr.layers.padding_mask: the ceil rule of the padding masks, and the original's interpolated pixel mask."""
import torch

from d2_detr.layers.padding_mask import feature_padding_mask, interpolated_padding_mask

CPU = torch.device("cpu")


def test_interpolated_mask_follows_the_padded_batch_where_the_ceil_rule_follows_the_image():
    """A 30-row image in a batch padded to 100 rows, at stride 16 (7 cells): nearest interpolation reads pixel rows
    0, 14, 28, 42, ... (row 28 < 30 is inside: 3 valid cells); the ceil rule keeps ceil(30 / 16) = 2."""
    sizes = [(30, 100), (100, 100)]
    interpolated = interpolated_padding_mask(sizes, (100, 100), (7, 7), CPU)
    assert interpolated.shape == (2, 7, 7) and interpolated.dtype == torch.bool
    assert interpolated[0, :, 0].tolist() == [False] * 3 + [True] * 4
    assert not interpolated[0, :, :].all(0).any() and not interpolated[1].any()
    ceil_rule = feature_padding_mask(sizes, (7, 7), stride=16, device=CPU)
    assert ceil_rule[0, :, 0].tolist() == [False] * 2 + [True] * 5


def test_interpolated_mask_of_an_image_alone_marks_nothing():
    assert not interpolated_padding_mask([(37, 53)], (37, 53), (5, 7), CPU).any()
