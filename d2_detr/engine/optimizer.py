"""DETR's optimizer: AdamW (or SGD) with a backbone LR multiplier and full-model gradient clipping."""
import itertools
import logging
import re
from typing import Dict, List, Pattern, Tuple, Type

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["build_detr_optimizer", "lr_multiplier_rules", "parameter_groups", "step_on_unscaled_gradients",
           "with_full_model_gradient_clipping"]


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


def lr_multiplier_rules(cfg) -> List[Tuple[Pattern, float]]:
    """``SOLVER.LR_MULTIPLIERS`` as (compiled pattern, multiplier) pairs; a ValueError names a malformed entry."""
    rules = []
    for entry in cfg.SOLVER.LR_MULTIPLIERS:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)):
            raise ValueError(f"SOLVER.LR_MULTIPLIERS entry {entry!r}: each entry must be a [pattern, multiplier] pair, "
                             "e.g. [['sampling_offsets', 0.1], ['reference_points', 0.1]]")
        try:
            rules.append((re.compile(entry[0]), float(entry[1])))
        except re.error as e:
            raise ValueError(f"SOLVER.LR_MULTIPLIERS pattern {entry[0]!r} is not a regular expression: {e}") from e
    return rules


def parameter_groups(cfg, model: nn.Module) -> List[Dict]:
    """The trainable parameters in optimizer groups with their learning rates.

    A parameter's LR is ``BASE_LR``, times ``BACKBONE_MULTIPLIER`` when its name starts with ``backbone.``, times the
    multiplier of the first ``SOLVER.LR_MULTIPLIERS`` pattern found in its name. Groups: the other parameters first,
    then the backbone, then those of each pattern (without, then with the backbone multiplier); empty ones are left
    out. Each group has "params", "lr" and "name" (for the log).
    """
    rules = lr_multiplier_rules(cfg)
    grouped: Dict[Tuple[int, bool], List[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((i for i, (pattern, _) in enumerate(rules) if pattern.search(name)), -1)
        grouped.setdefault((rule + 1, name.startswith("backbone.")), []).append(param)
    base_lr = cfg.SOLVER.BASE_LR
    groups = []
    for rule, backbone in sorted(grouped):
        lr, labels = base_lr, []
        if backbone:
            lr, labels = lr * cfg.SOLVER.BACKBONE_MULTIPLIER, ["backbone"]
        if rule:
            pattern, multiplier = rules[rule - 1]
            lr, labels = lr * multiplier, labels + [f"'{pattern.pattern}'"]
        groups.append({"params": grouped[(rule, backbone)], "lr": lr, "name": " and ".join(labels) or "other"})
    return groups


def build_detr_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`parameter_groups`; weight decay ``SOLVER.WEIGHT_DECAY`` applies to every
    parameter, as in the recipe. ``SOLVER.FUSED_OPTIMIZER`` steps them in one fused kernel. Under a GradScaler
    the optimizer's ``step`` (clipping included) sees unscaled, finite gradients, fused or not (see
    :func:`step_on_unscaled_gradients`)."""
    groups = parameter_groups(cfg, model)
    base_lr = cfg.SOLVER.BASE_LR
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
    logger.info(f"Optimizer {type(optimizer).__name__}: " + ", ".join(
        f"{len(g['params'])} {g['name']} parameter tensors at lr {g['lr']:g}" for g in groups))
    return optimizer
