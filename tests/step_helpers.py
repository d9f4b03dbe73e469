"""Shared by the training-step tests: fixed inputs and one optimisation step of the tiny DETR."""
from typing import Dict, List, Sequence

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


def one_step(opts: Sequence, micro_batches: List[List[Dict]], amp_dtype=None) -> Dict[str, torch.Tensor]:
    """Parameters of the tiny DETR (seed 0) after one AccumulatingTrainer step over ``micro_batches`` (this
    process's share of the step), DDP-wrapped when distributed."""
    cfg = load_config(TINY_CONFIG, *opts)
    torch.manual_seed(0)
    model = DetrTrainer.build_model(cfg)
    optimizer = DetrTrainer.build_optimizer(cfg, model)
    trainer = AccumulatingTrainer(create_ddp_model(model), micro_batches, optimizer,
                                  accumulate_steps=len(micro_batches), amp_dtype=amp_dtype)
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
