"""Shared by the training-step tests: fixed inputs and one optimisation step of the tiny DETR."""
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from d2_detr.data.dataset_mapper import DetrDatasetMapper
from d2_detr.engine import AccumulatingTrainer, DetrTrainer, create_ddp_model

from .conftest import TINY_CONFIG, load_config

# Deterministic model (no dropout) and plain SGD without clipping: the step is -lr * gradient, so any
# difference in the gradient's scale or direction shows in the parameters.
SGD_OPTS = ["MODEL.DETR.DROPOUT", 0.0, "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 0.05,
            "SOLVER.CLIP_GRADIENTS.ENABLED", False]


def fixed_inputs(num_images: int = 4) -> List[Dict]:
    """The first training images of the tiny config, mapped once (64x64, no crop): the same inputs for every
    run. Their target counts differ (2, 2, 4, 2), so halves of the batch have different loss normalisers."""
    cfg = load_config(TINY_CONFIG, "INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", (64,))
    mapper = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)  # the flip
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]]


def initial_params(opts: Sequence) -> Dict[str, torch.Tensor]:
    """Parameters of the tiny DETR built with seed 0, as :func:`one_step` starts from."""
    torch.manual_seed(0)
    model = DetrTrainer.build_model(load_config(TINY_CONFIG, *opts))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def one_step(opts: Sequence, micro_batches: List[List[Dict]], amp_dtype=None,
             grad_scaler: Optional[torch.amp.GradScaler] = None) -> Dict[str, torch.Tensor]:
    """Parameters of the tiny DETR (seed 0) after one AccumulatingTrainer step over ``micro_batches`` (this
    process's share of the step), DDP-wrapped when distributed; ``grad_scaler`` replaces the trainer's."""
    cfg = load_config(TINY_CONFIG, *opts)
    torch.manual_seed(0)
    model = DetrTrainer.build_model(cfg)
    optimizer = DetrTrainer.build_optimizer(cfg, model)
    trainer = AccumulatingTrainer(create_ddp_model(model), micro_batches, optimizer,
                                  accumulate_steps=len(micro_batches), amp_dtype=amp_dtype)
    if grad_scaler is not None:
        trainer.grad_scaler = grad_scaler
    with EventStorage(0):
        trainer.run_step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_step(params: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor],
                     initial: Dict[str, torch.Tensor]) -> None:
    """``params`` equal ``reference`` within 1e-5, and the step moved them by much more than that."""
    assert params.keys() == reference.keys()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1e-3
    for name in reference:
        torch.testing.assert_close(params[name], reference[name], rtol=0, atol=1e-5, msg=name)


class ClipRecorder:
    """Wraps torch's clipping functions (looked up at call time, by d2_detr's optimizer and Detectron2's) to
    record the L2 norm of the gradients each call sees, in ``norms``."""

    def __init__(self, monkeypatch) -> None:
        self.norms: List[float] = []
        for name in ("clip_grad_norm_", "clip_grad_value_"):
            monkeypatch.setattr(torch.nn.utils, name, self._recording(getattr(torch.nn.utils, name)))

    def _recording(self, clip: Callable) -> Callable:
        def recorded(params, *args, **kwargs):
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
            return clip(params, *args, **kwargs)
        return recorded
