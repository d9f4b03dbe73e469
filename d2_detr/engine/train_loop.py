"""The training step: gradient accumulation, mixed precision (float16 or bfloat16, CUDA or CPU) and
DistributedDataParallel for CUDA and CPU modules, on top of Detectron2's ``SimpleTrainer``."""
import logging
import time
from contextlib import ExitStack, nullcontext
from typing import Any, ContextManager, Dict, Iterable, List, Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .optimizer import step_on_unscaled_gradients

logger = logging.getLogger(__name__)

__all__ = ["AccumulatingTrainer", "amp_dtype", "create_ddp_model"]

_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def create_ddp_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Detectron2's ``create_ddp_model`` (``broadcast_buffers=False``, as ``DefaultTrainer``), also for CPU
    modules: Detectron2 passes ``device_ids=[local rank]``, which DistributedDataParallel rejects for them."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
    kwargs.setdefault("broadcast_buffers", False)
    return _d2_create_ddp_model(model, **kwargs)


def amp_dtype(name: str, device_type: str) -> torch.dtype:
    """The autocast dtype of ``SOLVER.AMP.DTYPE``: "float16", "bfloat16", or "auto" (float16 on CUDA,
    bfloat16 elsewhere)."""
    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if name not in _AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE={name!r}: use 'float16', 'bfloat16' or 'auto'")
    return _AMP_DTYPES[name]


class AccumulatingTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose step (one Detectron2 iteration) accumulates the gradients of
    ``accumulate_steps`` micro-batches, optionally under autocast, before one optimizer step.

    * The step's micro-batches are read first, and the model's loss normalisers (modules with a
      ``normalize_over(num_targets)`` context, such as DETR's ``SetCriterion``) are told the target counts of
      all of them, so the accumulated gradient equals that of one batch of all their images. A model without
      one gets its micro-batch losses averaged instead.
    * Under DistributedDataParallel, gradients are all-reduced once per step (``no_sync`` before).
    * Clipping (inside the optimizer's ``step``, see ``build_detr_optimizer``) and the LR scheduler (a hook,
      once per iteration) therefore act once per step, on the accumulated gradient.
    * ``amp_dtype`` float16 uses a gradient scaler (bfloat16 needs none): the accumulated gradients are
      unscaled before the optimizer's ``step``, so clipping inside it sees true gradients, fused optimizer or
      not, and a step whose gradients hold inf/NaN is skipped whole (the scaler then lowers its scale).
    The logged losses are those of the whole step (summed normalised shares, or the average).
    """

    def __init__(self, model: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer, *,
                 accumulate_steps: int = 1, amp_dtype: Optional[torch.dtype] = None):
        """
        Args:
            model, data_loader, optimizer: as for ``SimpleTrainer``; ``data_loader`` yields micro-batches.
            accumulate_steps: micro-batches per optimizer step.
            amp_dtype: autocast to this dtype (float16 or bfloat16) in the forward pass; None: no autocast.
        """
        super().__init__(model, data_loader, optimizer)
        if accumulate_steps < 1:
            raise ValueError(f"SOLVER.ACCUMULATE_STEPS={accumulate_steps} must be >= 1")
        self.accumulate_steps = accumulate_steps
        self.amp_dtype = amp_dtype
        self.device_type = next(model.parameters()).device.type
        self.grad_scaler = None
        if amp_dtype == torch.float16:
            self.grad_scaler = torch.amp.GradScaler(self.device_type)
            step_on_unscaled_gradients(optimizer)
        self._loss_normalizers = [m for m in model.modules() if callable(getattr(m, "normalize_over", None))]
        if accumulate_steps > 1 and not self._loss_normalizers:
            logger.warning("The model has no loss normaliser (normalize_over); the losses of the "
                           f"{accumulate_steps} accumulated micro-batches are averaged.")

    def run_step(self) -> None:
        """Read ``accumulate_steps`` micro-batches, accumulate their gradients, log, and step once."""
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        micro_batches = [next(self._data_loader_iter) for _ in range(self.accumulate_steps)]
        data_time = time.perf_counter() - start

        self.optimizer.zero_grad()
        step_losses: Dict[str, Tensor] = {}
        with self._normalize_over(micro_batches):
            for index, data in enumerate(micro_batches):
                is_last = index == len(micro_batches) - 1
                with self._gradient_sync(is_last):
                    with self._autocast():
                        loss_dict = self.model(data)
                        if isinstance(loss_dict, Tensor):
                            loss_dict = {"total_loss": loss_dict}
                        if not self._loss_normalizers:
                            loss_dict = {k: v / self.accumulate_steps for k, v in loss_dict.items()}
                        losses = sum(loss_dict.values())
                    (losses if self.grad_scaler is None else self.grad_scaler.scale(losses)).backward()
                for name, value in loss_dict.items():
                    step_losses[name] = step_losses.get(name, 0) + value.detach()

        self._write_metrics(step_losses, data_time)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.unscale_(self.optimizer)  # clipping in step() needs the true gradients
            self.grad_scaler.step(self.optimizer)  # not called when they hold inf/NaN
            self.grad_scaler.update()

    def _normalize_over(self, micro_batches: List[List[Dict]]) -> ContextManager:
        """The loss normalisers' context for the step: the target counts of all its images."""
        stack = ExitStack()
        if self.accumulate_steps > 1:
            num_targets = [len(inp["instances"]) for batch in micro_batches for inp in batch]
            for module in self._loss_normalizers:
                stack.enter_context(module.normalize_over(num_targets))
        return stack

    def _gradient_sync(self, is_last: bool) -> ContextManager:
        """DistributedDataParallel all-reduces the gradients on the step's last backward pass only."""
        if isinstance(self.model, DistributedDataParallel) and not is_last:
            return self.model.no_sync()
        return nullcontext()

    def _autocast(self) -> ContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
