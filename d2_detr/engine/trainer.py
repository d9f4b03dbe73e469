"""``DetrTrainer``: Detectron2's ``DefaultTrainer`` with DETR's data, optimizer and evaluation."""
import logging
import os

from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

from ..data.build import build_batched_test_loader
from ..data.dataset_mapper import DetrDatasetMapper
from ..data.synthetic import ensure_all_generated
from ..env import detectron2_has_compiled_ops
from .optimizer import build_detr_optimizer

logger = logging.getLogger(__name__)

__all__ = ["DetrTrainer", "check_num_classes"]

# Detectron2 v0.6's DefaultTrainer leaves the optimizer (and AMP grad scaler) out of its checkpoints, so
# --resume restarted AdamW from scratch; later versions save them under "_trainer".
_BASE_SAVES_TRAINER_STATE = "load_state_dict" in vars(DefaultTrainer)


def check_num_classes(cfg) -> None:
    """Fail at start-up, not with a silently wrong head, when MODEL.DETR.NUM_CLASSES disagrees with the
    ``thing_classes`` of a registered dataset the config uses."""
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.DETR.NUM_CLASSES:
            raise ValueError(
                f"MODEL.DETR.NUM_CLASSES={cfg.MODEL.DETR.NUM_CLASSES}, but dataset {name!r} has "
                f"{len(classes)} thing_classes; set MODEL.DETR.NUM_CLASSES {len(classes)}.")


class DetrTrainer(DefaultTrainer):
    """Trains and evaluates ``Detr`` with Detectron2's loop, hooks, checkpointer and writers."""

    def state_dict(self):
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not _BASE_SAVES_TRAINER_STATE and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_model(cls, cfg):
        check_num_classes(cfg)
        model = build_model(cfg)
        num_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"Model {cfg.MODEL.META_ARCHITECTURE}: {num_params:,} parameters ({trainable:,} trainable)")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_detr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_batched_test_loader(dataset_name, DetrDatasetMapper(cfg, is_train=False),
                                         cfg.TEST.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        ensure_all_generated([dataset_name])  # COCOEvaluator opens the dataset's json_file
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             use_fast_impl=detectron2_has_compiled_ops())
