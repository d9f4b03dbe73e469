"""MultiScaleProjection (d2_detr.layers.multiscale_projection): levels, sizes, names, initialisation."""
import pytest
import torch

from d2_detr.layers.multiscale_projection import MultiScaleProjection


def test_levels_sizes_and_original_names():
    proj = MultiScaleProjection([8, 16], 32, num_levels=4)
    assert [name for name, _ in proj.named_parameters()][:4] == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    assert proj[2][0].in_channels == 16 and proj[3][0].in_channels == 32  # extra levels: last map, then previous
    features = [torch.randn(2, 8, 13, 10), torch.randn(2, 16, 7, 5)]
    levels = proj(features)
    assert [tuple(x.shape) for x in levels] == [(2, 32, 13, 10), (2, 32, 7, 5), (2, 32, 4, 3), (2, 32, 2, 2)]
    torch.testing.assert_close(levels[2], proj[2](features[1]))
    torch.testing.assert_close(levels[3], proj[3](levels[2]))
    assert all(not level[0].bias.any() for level in proj)


def test_bad_arguments():
    with pytest.raises(ValueError, match="NUM_FEATURE_LEVELS to at least 2"):
        MultiScaleProjection([8, 16], 32, num_levels=1)
    with pytest.raises(ValueError, match="divisible by 32"):
        MultiScaleProjection([8], 40, num_levels=1)
    with pytest.raises(ValueError, match="built for 2 backbone maps, got 1"):
        MultiScaleProjection([8, 16], 32, num_levels=2)([torch.randn(1, 8, 4, 4)])
