"""Training and evaluation on Detectron2's engine."""
from .allocator import keep_freed_memory
from .checkpointer import AtomicDetectionCheckpointer, atomic_write
from .launch import launch
from .optimizer import build_detr_optimizer, step_on_unscaled_gradients, with_full_model_gradient_clipping
from .train_loop import AccumulatingTrainer, amp_dtype, create_ddp_model
from .trainer import DetrTrainer, check_num_classes, micro_batch_size

__all__ = [
    "AccumulatingTrainer",
    "AtomicDetectionCheckpointer",
    "DetrTrainer",
    "amp_dtype",
    "atomic_write",
    "build_detr_optimizer",
    "check_num_classes",
    "create_ddp_model",
    "keep_freed_memory",
    "launch",
    "micro_batch_size",
    "step_on_unscaled_gradients",
    "with_full_model_gradient_clipping",
]
