"""d2_detr.export.verify: padding images into the graph's inputs, and comparing outputs with clear failures."""
import pytest
import torch

from d2_detr.export import ExportMismatchError, batch_images, compare_outputs


def _outputs(with_masks=False):
    g = torch.Generator().manual_seed(0)
    outputs = {
        "boxes": torch.rand(2, 5, 4, generator=g) * 100,
        "scores": torch.rand(2, 5, generator=g),
        "labels": torch.randint(0, 3, (2, 5), generator=g),
    }
    if with_masks:
        outputs["masks"] = torch.rand(2, 5, 20, 30, generator=g) > 0.5
    return outputs


SIZES = torch.tensor([[20, 30], [10, 12]])


def test_batch_images_pads_bottom_right_with_zeros():
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 2), 2.0)
    batch, sizes = batch_images([a, b])
    assert batch.shape == (2, 3, 5, 6) and sizes.tolist() == [[4, 6], [5, 2]] and sizes.dtype == torch.int64
    assert (batch[0, :, :4, :6] == 1).all() and (batch[0, :, 4:] == 0).all()
    assert (batch[1, :, :, :2] == 2).all() and (batch[1, :, :, 2:] == 0).all()


def test_equal_outputs_within_tolerance_pass():
    expected = _outputs(with_masks=True)
    actual = {k: v.clone() for k, v in expected.items()}
    actual["boxes"][0, 0, 0] += 5e-5
    actual["masks"][1, :, 10:, :] = ~actual["masks"][1, :, 10:, :]  # below image 1 (10 x 12): ignored
    report = compare_outputs(expected, actual, SIZES, atol=1e-4)
    assert report["boxes"] == pytest.approx(5e-5, rel=1e-2)  # pixels
    assert report["boxes_relative"] == pytest.approx(5e-5 / 30, rel=1e-2)  # an x coordinate of the 30-px wide image
    assert report["labels"] == 0 and report["masks"] == 0


@pytest.mark.parametrize("change, message", [
    (lambda o: o["boxes"].__setitem__((1, 2, 3), o["boxes"][1, 2, 3] + 0.01),  # y1 in the 10-px high image
     r"boxes differ by up to 0.001 of the image size \(tolerance 0.0001; 0.01 pixels\)"),
    (lambda o: o["scores"].__setitem__((0, 0), o["scores"][0, 0] - 1e-3), r"scores differ by up to 0.001"),
    (lambda o: o["labels"].__setitem__((0, 1), o["labels"][0, 1] + 1), r"10.0% of the labels differ"),
    (lambda o: o["masks"].__setitem__((0, 0), ~o["masks"][0, 0]), r"20.00% of the mask pixels differ"),
])
def test_differences_beyond_tolerance_are_named(change, message):
    expected = _outputs(with_masks=True)
    actual = {k: v.clone() for k, v in expected.items()}
    change(actual)
    with pytest.raises(ExportMismatchError, match=message):
        compare_outputs(expected, actual, SIZES, atol=1e-4)


def test_missing_output_and_other_shape_are_named():
    expected = _outputs(with_masks=True)
    with pytest.raises(ExportMismatchError, match=r"lacks the outputs \['masks'\]"):
        compare_outputs(expected, _outputs(), SIZES)
    actual = _outputs()
    actual["boxes"] = actual["boxes"][:, :3]
    with pytest.raises(ExportMismatchError, match=r"boxes have shape \(2, 3, 4\), the PyTorch model's \(2, 5, 4\)"):
        compare_outputs(_outputs(), actual, SIZES)
