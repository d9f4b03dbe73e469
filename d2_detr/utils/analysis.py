"""FLOP counts of DETR with Detectron2's analysis tools (``tools/analyze_model.py``).

Detectron2's :class:`detectron2.utils.analysis.FlopCountAnalysis` (fvcore's counter, traced through the model's
``forward`` on Detectron2 inputs) counts one multiply-add as one flop, as the DETR paper does, and leaves out
elementwise work. fvcore has no rule for ``aten::scaled_dot_product_attention``, through which d2_detr's
transformer computes attention, and would skip it with a warning. :class:`FlopCountAnalysis` here is Detectron2's
with that rule added: attention counts as its two matrix products, softmax(Q K^T) and the product with V. The
sampling of multi-scale deformable attention traces to ``aten::grid_sampler``, which fvcore counts as 4
multiply-adds per output value (bilinear); the attention-weighted sum of the samples is elementwise, not counted.

    from d2_detr.utils.analysis import FlopCountAnalysis
    flops = FlopCountAnalysis(model.eval(), [{"image": image_chw_uint8}])
    flops.total(), flops.by_module()["transformer"], flops.by_operator()["scaled_dot_product_attention"]
"""
import math
from typing import Any, List

import detectron2.utils.analysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["FlopCountAnalysis", "scaled_dot_product_attention_flop_jit"]

SDPA_OPERATOR = "aten::scaled_dot_product_attention"


def scaled_dot_product_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore op handle of ``aten::scaled_dot_product_attention``: query (..., L, E), key (..., S, E) and value
    (..., S, Ev) take ``prod(...) * L * S * (E + Ev)`` multiply-adds (Q K^T, then the weights times V)."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    *batch, length, dim = query
    source = key[-2]
    return math.prod(batch) * length * source * (dim + value[-1])


class FlopCountAnalysis(detectron2.utils.analysis.FlopCountAnalysis):
    """Detectron2's ``FlopCountAnalysis`` that also counts ``scaled_dot_product_attention`` (module docstring).

    Args:
        model: a Detectron2 model (e.g. ``Detr``) in eval mode.
        inputs: its inputs, e.g. a list of dicts with ``"image"`` (3, H, W) as a test loader gives them.
    """

    def __init__(self, model: nn.Module, inputs: Any):
        super().__init__(model, inputs)
        self.set_op_handle(**{SDPA_OPERATOR: scaled_dot_product_attention_flop_jit})
