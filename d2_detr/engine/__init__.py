"""Training and evaluation on Detectron2's engine."""
from .optimizer import build_detr_optimizer, with_full_model_gradient_clipping
from .trainer import DetrTrainer, check_num_classes

__all__ = ["DetrTrainer", "build_detr_optimizer", "check_num_classes", "with_full_model_gradient_clipping"]
