import math

import pytest
import torch

from d2_detr.layers.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
    inverse_sigmoid,
    refine_boxes,
)


def _random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    cxcywh = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    return box_cxcywh_to_xyxy(cxcywh)


def test_conversion_known_values_and_roundtrip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.8, 0.1, 1.0]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 5, 4, generator=g)  # extra leading dims are supported
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)


def test_giou_hand_computed_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    giou = generalized_box_iou(a, b)
    assert giou.shape == (2, 3)
    # identical boxes
    assert giou[0, 0].item() == pytest.approx(1.0)
    # disjoint: inter 0, union 2, enclosing [0,0,3,1] area 3 -> 0 - (3 - 2) / 3
    assert giou[0, 1].item() == pytest.approx(-1.0 / 3.0)
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, enclosing 9
    assert giou[1, 2].item() == pytest.approx(1.0 / 7.0 - 2.0 / 9.0)
    # [0,0,1,1] vs [1,1,3,3]: touching corners, inter 0, union 5, enclosing 9
    assert giou[0, 2].item() == pytest.approx(-4.0 / 9.0)


def test_giou_zero_size_boxes_have_no_nan():
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    points = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.5],  # inside the unit box: iou 0, enclosing = unit box -> 0
            [2.0, 2.0, 2.0, 2.0],  # outside: union 1, enclosing 4 -> -(4 - 1) / 4
            [0.5, 0.2, 0.5, 0.8],  # vertical segment inside
        ],
        requires_grad=True,
    )
    giou = generalized_box_iou(points, unit)
    torch.testing.assert_close(giou[:, 0], torch.tensor([0.0, -0.75, 0.0]))
    giou.sum().backward()
    assert torch.isfinite(points.grad).all()

    # Two identical points: union and enclosing area are both 0; defined as 0, not NaN.
    same = torch.tensor([[0.3, 0.3, 0.3, 0.3]], requires_grad=True)
    value = elementwise_generalized_box_iou(same, same.detach().clone())
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(same.grad).all()


def test_degenerate_boxes_raise_value_error():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # x1 < x0
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="x1 >= x0"):
        elementwise_generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="non-finite"):
        generalized_box_iou(torch.full((1, 4), float("nan")), good)
    with pytest.raises(ValueError, match="same shape"):
        elementwise_generalized_box_iou(good, torch.cat([good, good]))


def test_elementwise_equals_diagonal_and_empty_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = _random_xyxy(7, g), _random_xyxy(7, g)
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal())
    assert generalized_box_iou(a[:0], b).shape == (0, 7)
    assert elementwise_generalized_box_iou(a[:0], b[:0]).shape == (0,)


def test_inverse_sigmoid_is_clamped_and_inverts_sigmoid():
    x = torch.tensor([-0.5, 0.0, 0.3, 1.0, 2.0])
    out = inverse_sigmoid(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[[0, 1]], torch.full((2,), math.log(1e-5)))  # clamped at 0, then to eps
    torch.testing.assert_close(out[[3, 4]], torch.full((2,), -math.log(1e-5)))
    torch.testing.assert_close(out[2].sigmoid(), torch.tensor(0.3))


def test_refine_boxes_points_and_boxes():
    deltas = torch.tensor([[0.5, -0.5, 1.0, -1.0]])
    point = torch.tensor([[0.3, 0.6]])
    expected = torch.cat([deltas[:, :2] + inverse_sigmoid(point), deltas[:, 2:]], -1).sigmoid()
    torch.testing.assert_close(refine_boxes(deltas, point), expected)
    box = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    torch.testing.assert_close(refine_boxes(torch.zeros(1, 4), box), box)
    torch.testing.assert_close(refine_boxes(deltas, box), (deltas + inverse_sigmoid(box)).sigmoid())
