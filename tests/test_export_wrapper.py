"""d2_detr.export.wrapper: the exportable graph reproduces Detr's inference, per-image backbone included."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from d2_detr.export.exporter import example_inputs
from d2_detr.export.verify import batch_images, compare_outputs, reference_outputs
from d2_detr.export.wrapper import BackboneFeatures, DetrExportWrapper, PerImageBackbone, output_names, trace_detr

from .conftest import PATCH_BACKBONE_OPTS, TINY_CONFIG, load_config


def _model(*opts):
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG, "MODEL.DETR.DROPOUT", 0.0, *opts)).eval()


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 255


def _per_image_backbone(model, names, example=None):
    """PerImageBackbone of the model's backbone; with an example image (1, 3, h, w), around the traced backbone."""
    shapes = model.backbone.output_shape()
    backbone = BackboneFeatures(model.backbone, names, model.channels_last)
    if example is not None:
        backbone = torch.jit.trace(backbone, example)
    return PerImageBackbone(backbone, [shapes[n].stride for n in names], [shapes[n].channels for n in names])


@pytest.mark.parametrize("scripted", [False, True])
def test_per_image_backbone_equals_detr_backbone_features(one_thread, scripted):
    model = _model()
    images = [_image(70, 100, 1), _image(96, 61, 2), _image(33, 40, 3)]
    if scripted:
        backbone = torch.jit.script(_per_image_backbone(model, ["res5"], example=torch.randn(1, 3, 64, 64)))
    else:
        backbone = _per_image_backbone(model, ["res5"])
    padded = ImageList.from_tensors([(im - model.pixel_mean) / model.pixel_std for im in images])
    with torch.no_grad():
        expected = model.backbone_features(padded)["res5"]  # each image alone, zero-padded features
        (got,) = backbone(padded.tensor, torch.tensor(padded.image_sizes))
    assert got.shape == expected.shape == (3, expected.shape[1], 3, 4)  # ceil(96 / 32) x ceil(100 / 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[2, :, 2:] == 0).all() and (got[2, :, :, 2:] == 0).all()  # 33x40 image: 2x2 valid cells


def test_wrapper_equals_detr_inference_with_masks_and_topk(one_thread):
    model = _model("MODEL.MASK_ON", True, "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
                   "MODEL.DETR.CRITERION_NAME", "SetCriterionWithMasks", "MODEL.DETR.TEST_TOPK", 7)
    names = ["res5", "res4", "res3", "res2"]
    wrapper = DetrExportWrapper(model, _per_image_backbone(model, names))
    images = [_image(64, 90, 4), _image(81, 70, 5)]
    batch, sizes = batch_images(images)
    with torch.no_grad():
        expected = reference_outputs(model, images)
        got = dict(zip(output_names(with_masks=True), wrapper(batch, sizes)))
    assert got["boxes"].shape == (2, 7, 4) and got["masks"].shape == (2, 7, 81, 90)
    report = compare_outputs(expected, got, sizes, atol=1e-5, max_mask_mismatch=0.0)
    assert report["labels"] == 0 and report["masks"] == 0


def test_traced_graph_generalises_to_other_batch_and_image_sizes(one_thread):
    """Traced on two images; run on three others of other sizes, among them one larger than the example."""
    model = _model(*PATCH_BACKBONE_OPTS, "MODEL.DETR.POSITION_EMBEDDING", "learned")
    traced = trace_detr(model, *example_inputs(model))
    for images in ([_image(200, 150, 6)], [_image(50, 70, 7), _image(130, 64, 8), _image(99, 99, 9)]):
        batch, sizes = batch_images(images)
        with torch.no_grad():
            expected = reference_outputs(model, images)
            got = dict(zip(output_names(with_masks=False), traced(batch, sizes)))
        compare_outputs(expected, got, sizes, atol=1e-4)


def test_padding_content_does_not_matter(one_thread):
    model = _model()
    traced = trace_detr(model, *example_inputs(model))
    batch, sizes = batch_images([_image(64, 96, 10), _image(96, 64, 11)])
    noisy = batch.clone()
    noisy[0, :, :, 96:] = 255.0  # right of the first image
    noisy[1, :, :, 64:] = -50.0
    with torch.no_grad():
        clean_out, noisy_out = traced(batch, sizes), traced(noisy, sizes)
    for clean, other in zip(clean_out, noisy_out):
        torch.testing.assert_close(clean, other, atol=1e-5, rtol=0)


def test_detections_do_not_depend_on_batch_neighbours(one_thread):
    """The tiny ResNet's convolutions would read a neighbour's padding at the image border if the graph ran the
    backbone on the padded batch: each image goes through it alone, as in Detr."""
    model = _model()
    traced = trace_detr(model, *example_inputs(model))
    small, large = _image(64, 96, 12), _image(128, 160, 13)
    with torch.no_grad():
        alone = traced(*batch_images([small]))
        together = traced(*batch_images([small, large]))
    for a, t in zip(alone, together):
        torch.testing.assert_close(t[:1], a, atol=1e-4, rtol=0)
