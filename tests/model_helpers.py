"""Shared by the meta-architecture tests (Detr, DeformableDetr): inputs, and the batch-independence check."""
from typing import Sequence

import torch
from detectron2.structures import Boxes, Instances
from torch import nn


def random_image(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, h, w) float pixels in [0, 255)."""
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def gt_instances(h: int, w: int, boxes: Sequence, classes: Sequence[int]) -> Instances:
    """Ground truth of an h x w image: xyxy ``boxes`` (pixels) and their ``classes``."""
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def shift_batchnorm_statistics(model: nn.Module) -> None:
    """Non-zero BatchNorm shifts, so that zero padding does not stay zero through the backbone."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)


def assert_same_alone_and_batched(model: nn.Module, image: torch.Tensor, neighbour: torch.Tensor, atol: float,
                                  image_first: bool = True) -> None:
    """``model.predict``'s logits and boxes of ``image`` are the same alone and in a padded batch with
    ``neighbour`` (first or second in the batch)."""
    batch = [{"image": image}, {"image": neighbour}] if image_first else [{"image": neighbour}, {"image": image}]
    with torch.no_grad():
        alone = model.predict(model.preprocess_image([{"image": image}]))
        batched = model.predict(model.preprocess_image(batch))
    index = 0 if image_first else 1
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batched[key][index], alone[key][0], atol=atol, rtol=0)


def randomize_every_tensor(model: nn.Module, seed: int) -> None:
    """Give every floating-point tensor of ``model`` random values (norm weights near 1, positive running
    variances), so that no zero-initialised head or offset hides a wrong checkpoint mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + 0.75)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * (0.5 if "norm" in name else 0.1)
                             + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
