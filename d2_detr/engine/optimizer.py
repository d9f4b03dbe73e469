"""DETR's optimizer: AdamW (or SGD) with a backbone LR multiplier and full-model gradient clipping."""
import itertools
import logging
from typing import Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["build_detr_optimizer", "step_on_unscaled_gradients", "with_full_model_gradient_clipping"]


def step_on_unscaled_gradients(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``torch.amp.GradScaler.step`` treat ``optimizer`` like an unfused one: unscale its gradients and
    check them for inf/NaN before ``optimizer.step()``, and skip ``step()`` entirely when it finds any.

    For a fused optimizer (``fused=True``) GradScaler otherwise calls ``step()`` on the scaled gradients, also
    when they overflowed, and leaves unscaling and skipping to the fused kernel. Whatever ``step()`` does
    before the kernel then goes wrong: gradient clipping sees the gradients multiplied by the loss scale (or
    inf/NaN ones), and fused SGD with momentum (torch 2.14) keeps uninitialised momentum buffers after a skipped
    first step, which corrupt the parameters at the next one. The fused kernel still does the update; the cost is
    reading the inf flag on the host once per step. Returns ``optimizer``.
    """
    optimizer._step_supports_amp_scaling = False  # read by GradScaler.step; set to True by fused optimizers
    return optimizer


def with_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float,
                                      norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optim_cls`` whose ``step`` first clips the gradient norm of all its parameters
    together (the whole model, as DETR's recipe does), not parameter by parameter. With a GradScaler, ``step``
    runs on unscaled, finite gradients also when fused (see :func:`step_on_unscaled_gradients`)."""

    class FullModelGradientClipping(optim_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            step_on_unscaled_gradients(self)

        def step(self, closure=None):
            params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optim_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_detr_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Parameters whose name starts with ``backbone.`` get ``BASE_LR * BACKBONE_MULTIPLIER``; weight decay
    ``SOLVER.WEIGHT_DECAY`` applies to every parameter, as in the recipe. ``SOLVER.FUSED_OPTIMIZER`` steps
    them in one fused kernel. Under a GradScaler the optimizer's ``step`` (clipping included) sees unscaled,
    finite gradients, fused or not (see :func:`step_on_unscaled_gradients`)."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(param)
    base_lr = cfg.SOLVER.BASE_LR
    groups = [{"params": rest, "lr": base_lr}]
    if backbone:
        groups.append({"params": backbone, "lr": base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER})
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'ADAMW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = with_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    optimizer = step_on_unscaled_gradients(
        optim_cls(groups, lr=base_lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY, fused=cfg.SOLVER.FUSED_OPTIMIZER, **kwargs))
    logger.info(f"Optimizer {type(optimizer).__name__}: {len(rest)} parameter tensors at lr {base_lr}, "
                f"{len(backbone)} backbone tensors at lr {base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER}")
    return optimizer
