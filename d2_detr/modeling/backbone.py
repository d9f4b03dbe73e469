"""DETR's ResNet backbone: Detectron2's ResNet with torchvision's DC5 dilation semantics."""
import logging

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet, build_resnet_backbone

logger = logging.getLogger(__name__)

__all__ = ["build_detr_resnet_backbone", "undilate_first_res5_block"]


def undilate_first_res5_block(resnet: ResNet) -> None:
    """Give the first block of a dilated res5 torchvision's dilation 1 (its later blocks keep dilation 2).

    torchvision's ``replace_stride_with_dilation`` (used by the original DETR-DC5) keeps the previous
    dilation in the first block of the dilated stage; Detectron2's RES5_DILATION dilates every block.
    """
    first = resnet.res5[0]
    if not isinstance(first, BottleneckBlock):
        raise ValueError(f"DC5 needs bottleneck blocks (R-50 and deeper), got {type(first).__name__}")
    first.conv2.dilation = (1, 1)
    first.conv2.padding = (1, 1)


@BACKBONE_REGISTRY.register()
def build_detr_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2's ResNet (``MODEL.RESNETS.*``); with ``RES5_DILATION: 2`` and
    ``MODEL.DETR.TORCHVISION_DILATION`` (default), the dilation follows torchvision as DETR-DC5 does."""
    resnet = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.RES5_DILATION == 2 and cfg.MODEL.DETR.TORCHVISION_DILATION:
        undilate_first_res5_block(resnet)
        logger.info("res5 dilated with torchvision's semantics (first block dilation 1, others 2)")
    return resnet
