"""``DetrTrainer``: Detectron2's ``DefaultTrainer`` with DETR's data, optimizer and evaluation, gradient
accumulation, mixed precision on CUDA and CPU, DDP on CPU too, and atomic checkpoints."""
import logging
import os
import weakref

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.build import build_batched_test_loader
from ..data.categories import dataset_thing_classes
from ..data.check import check_before_training
from ..data.dataset_mapper import DetrDatasetMapper
from ..env import detectron2_has_compiled_ops, require_extra
from .checkpointer import AtomicDetectionCheckpointer
from .optimizer import build_detr_optimizer
from .train_loop import AccumulatingTrainer, amp_dtype, create_ddp_model

logger = logging.getLogger(__name__)

__all__ = ["DetrTrainer", "check_evaluation_dependencies", "check_num_classes", "micro_batch_size"]

# Detectron2 v0.6's DefaultTrainer leaves the optimizer (and AMP grad scaler) out of its checkpoints, so
# --resume restarted AdamW from scratch; later versions save them under "_trainer".
_BASE_SAVES_TRAINER_STATE = "load_state_dict" in vars(DefaultTrainer)


def check_num_classes(cfg) -> None:
    """Fail at start-up, not with a silently wrong head, when MODEL.DETR.NUM_CLASSES disagrees with the
    ``thing_classes`` of a registered dataset the config uses (for a dataset registered with
    ``register_coco_instances``, the categories of its json file)."""
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        classes = dataset_thing_classes(name)
        if classes is not None and len(classes) != cfg.MODEL.DETR.NUM_CLASSES:
            metadata = MetadataCatalog.get(name)
            source = "its metadata" if metadata.get("thing_classes") else f"the categories of {metadata.json_file}"
            raise ValueError(
                f"MODEL.DETR.NUM_CLASSES={cfg.MODEL.DETR.NUM_CLASSES}, but dataset {name!r} has "
                f"{len(classes)} thing_classes (from {source}); set MODEL.DETR.NUM_CLASSES {len(classes)}.")


def _panoptic_evaluation(cfg: CfgNode, dataset_name: str) -> bool:
    """Whether ``dataset_name`` is evaluated by panoptic quality (``COCOPanopticEvaluator``)."""
    return (MetadataCatalog.get(dataset_name).get("evaluator_type") == "coco_panoptic_seg"
            and cfg.MODEL.MASK_ON and cfg.MODEL.DETR.PANOPTIC_ON)


def _require_panoptic_extra(dataset_name: str) -> None:
    require_extra("panoptic", f"Panoptic quality evaluation of {dataset_name!r} (COCOPanopticEvaluator)")


def check_evaluation_dependencies(cfg: CfgNode) -> None:
    """Fail at start-up, not after training, when evaluating a dataset of DATASETS.TEST needs an extra that is not
    installed (panoptic quality: d2-detr's "panoptic" extra)."""
    for name in cfg.DATASETS.TEST:
        if _panoptic_evaluation(cfg, name):
            _require_panoptic_extra(name)


def micro_batch_size(cfg: CfgNode) -> int:
    """Images of one forward/backward pass summed over processes: ``SOLVER.IMS_PER_BATCH`` (the images of one
    optimizer step) / ``SOLVER.ACCUMULATE_STEPS``. Each process gets this / world size."""
    total, steps, world = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS, comm.get_world_size()
    if steps < 1:
        raise ValueError(f"SOLVER.ACCUMULATE_STEPS={steps} must be >= 1: the number of micro-batches whose "
                         "gradients are accumulated into one optimizer step (1: no accumulation)")
    if total < 1 or total % (steps * world):
        multiple = steps * world
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} must be a positive multiple of SOLVER.ACCUMULATE_STEPS="
                         f"{steps} x {world} processes = {multiple} (it counts the images of one optimizer step, "
                         f"over all processes and micro-batches), e.g. {max(1, -(-total // multiple)) * multiple}")
    return total // steps


class DetrTrainer(DefaultTrainer):
    """Trains and evaluates ``Detr`` with Detectron2's loop, hooks, checkpointer and writers.

    Differences from ``DefaultTrainer``'s set-up: each iteration is one :class:`AccumulatingTrainer` step
    (``SOLVER.ACCUMULATE_STEPS`` micro-batches; autocast to ``SOLVER.AMP.DTYPE`` with ``SOLVER.AMP.ENABLED``),
    CPU models get DistributedDataParallel as well, checkpoints are written atomically, and the optimizer
    state is checkpointed (under "_trainer").
    """

    def __init__(self, cfg: CfgNode):
        """``DefaultTrainer.__init__`` with the differences above."""
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        micro = micro_batch_size(cfg) // comm.get_world_size()  # checks the batch keys before any building
        check_evaluation_dependencies(cfg)

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        device_type = next(model.parameters()).device.type
        dtype = amp_dtype(cfg.SOLVER.AMP.DTYPE, device_type) if cfg.SOLVER.AMP.ENABLED else None
        model = create_ddp_model(model)
        self._trainer = AccumulatingTrainer(model, data_loader, optimizer,
                                            accumulate_steps=cfg.SOLVER.ACCUMULATE_STEPS, amp_dtype=dtype)
        logger.info(f"{cfg.SOLVER.IMS_PER_BATCH} images per iteration (optimizer step) = {comm.get_world_size()} "
                    f"processes x {cfg.SOLVER.ACCUMULATE_STEPS} accumulated micro-batches x {micro} images; "
                    f"mixed precision: {dtype or 'off'}")

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
        """Micro-batches of ``micro_batch_size(cfg) / world size`` images per process, after the datasets' check
        of ``DATASETS.CHECK_BEFORE_TRAINING``."""
        batch_size = micro_batch_size(cfg)
        dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                              filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_before_training(cfg, dataset)
        return build_detection_train_loader(cfg, dataset=dataset, mapper=DetrDatasetMapper(cfg, is_train=True),
                                            total_batch_size=batch_size)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_batched_test_loader(dataset_name, DetrDatasetMapper(cfg, is_train=False),
                                         cfg.TEST.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """By the dataset's ``evaluator_type``: "coco_panoptic_seg" -> ``COCOPanopticEvaluator`` (PQ; with
        MODEL.MASK_ON and MODEL.DETR.PANOPTIC_ON, else no evaluation: the box stage of panoptic training), otherwise
        ``COCOEvaluator`` (bbox, and segm with MODEL.MASK_ON)."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "coco_panoptic_seg":
            if not (cfg.MODEL.MASK_ON and cfg.MODEL.DETR.PANOPTIC_ON):
                message = (f"{dataset_name!r} is evaluated by panoptic quality only, which needs MODEL.MASK_ON True "
                           "and MODEL.DETR.PANOPTIC_ON True; not evaluated")
                logger.warning(message)
                raise NotImplementedError(message)  # DefaultTrainer.test skips the dataset
            _require_panoptic_extra(dataset_name)
            return COCOPanopticEvaluator(dataset_name, output_dir=output_folder)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                             use_fast_impl=detectron2_has_compiled_ops())
