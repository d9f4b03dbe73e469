"""static_size (d2_detr.layers.tracing): a model-fixed size as a Python int, quietly, also while tracing."""
import warnings

import torch

from d2_detr.layers.tracing import static_size


def test_static_size_eager_and_traced_without_warning():
    assert static_size(torch.zeros(2, 5), -1) == 5

    def branch(x):
        return x * 2 if static_size(x, -1) == 4 else x

    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(branch, torch.ones(3, 4))
    torch.testing.assert_close(traced(torch.ones(5, 4)), torch.full((5, 4), 2.0))
