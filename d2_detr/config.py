"""Every config key d2_detr adds to Detectron2's config, with the DETR recipe's defaults.

Keys written for facebookresearch/detr's Detectron2 wrapper (``MODEL.DETR.{NUM_CLASSES, GIOU_WEIGHT,
L1_WEIGHT, DEEP_SUPERVISION, NO_OBJECT_WEIGHT, NHEADS, DROPOUT, DIM_FEEDFORWARD, ENC_LAYERS, DEC_LAYERS,
PRE_NORM, HIDDEN_DIM, NUM_OBJECT_QUERIES, FROZEN_WEIGHTS}``, ``SOLVER.{OPTIMIZER, BACKBONE_MULTIPLIER}``)
keep their names and meaning, so configs written for it load unchanged.

:func:`load_config` is how every tool reads a config: Detectron2's defaults, these keys, a YAML file, then
``KEY VALUE`` overrides, with an error naming the file, key or value for what cannot be loaded.
"""
import difflib
import os
import re
from typing import Iterator, Optional, Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["ConfigError", "add_detr_config", "load_config"]


def add_detr_config(cfg: CN) -> None:
    """Add d2_detr's keys to a Detectron2 config, in place. Calling it twice is harmless."""
    cfg.MODEL.DETR = CN()
    detr = cfg.MODEL.DETR
    # Number of foreground classes; the class head has NUM_CLASSES + 1 outputs (last = "no object").
    detr.NUM_CLASSES = 80
    # Backbone feature map fed to the transformer (one level only; position encodings are computed for it alone).
    detr.IN_FEATURE = "res5"
    # Checkpoint whose weights are loaded and frozen before training (two-stage mask training); "" = none.
    detr.FROZEN_WEIGHTS = ""

    # ---- transformer ----
    # Registered name of the encoder-decoder (see d2_detr.modeling.transformer.DETR_TRANSFORMER_REGISTRY).
    detr.TRANSFORMER_NAME = "DetrTransformer"
    # Transformer width d; the backbone feature is projected to it by a 1x1 conv.
    detr.HIDDEN_DIM = 256
    # Attention heads in every attention layer.
    detr.NHEADS = 8
    # Dropout in attention and feed-forward blocks.
    detr.DROPOUT = 0.1
    # Hidden width of the feed-forward blocks.
    detr.DIM_FEEDFORWARD = 2048
    # Encoder layers.
    detr.ENC_LAYERS = 6
    # Decoder layers.
    detr.DEC_LAYERS = 6
    # LayerNorm before (True) or after (False, the paper's default) each sub-layer.
    detr.PRE_NORM = False
    # Number of learned object queries = number of predictions per image.
    detr.NUM_OBJECT_QUERIES = 100
    # Position encoding of the feature map: "sine" (default), "learned", or a registered name.
    detr.POSITION_EMBEDDING = "sine"
    # Sine encoding: added to the cell positions (1, 2, ...) before they are normalised. 0.0 for DETR (the last
    # cell sits at 2*pi); -0.5 for Deformable DETR (cell centres), as its original code.
    detr.POSITION_EMBEDDING_OFFSET = 0.0
    # Sine encoding: base of the geometric progression of wavelengths (10000 in DETR and Deformable DETR, 20 in DINO).
    detr.POSITION_EMBEDDING_TEMPERATURE = 10000.0

    # ---- set loss ----
    # Registered name of the set criterion (d2_detr.modeling.criterion.DETR_CRITERION_REGISTRY).
    detr.CRITERION_NAME = "SetCriterion"
    # Apply the loss to every decoder layer's output (auxiliary losses).
    detr.DEEP_SUPERVISION = True
    # Cross-entropy weight of the "no object" class (eos_coef).
    detr.NO_OBJECT_WEIGHT = 0.1
    # Weight of the classification (cross-entropy) loss.
    detr.CLASS_WEIGHT = 1.0
    # Weight of the L1 box loss (normalised cx, cy, w, h).
    detr.L1_WEIGHT = 5.0
    # Weight of the generalised-IoU box loss.
    detr.GIOU_WEIGHT = 2.0
    # With several processes: divide loss_ce by the class weights (1 per matched query, NO_OBJECT_WEIGHT per other
    # query) of the whole step averaged over processes, like the box losses' target count, so that the gradient
    # does not depend on how the batch is split (True); or by each process's own, as the original implementation
    # (False: F.cross_entropy's weighted mean over the local batch). The same in one process.
    detr.LOSS_CE_NORM_ACROSS_PROCESSES = True

    # ---- Hungarian matcher (costs are independent of the loss weights) ----
    # Registered name of the matcher (d2_detr.modeling.matcher.DETR_MATCHER_REGISTRY).
    detr.MATCHER_NAME = "HungarianMatcher"
    # Weight of -softmax probability of the target class in the matching cost.
    detr.COST_CLASS = 1.0
    # Weight of the L1 box distance in the matching cost.
    detr.COST_BBOX = 5.0
    # Weight of -GIoU in the matching cost.
    detr.COST_GIOU = 2.0
    # Sigmoid focal loss and focal matching cost (MATCHER_NAME FocalHungarianMatcher, CRITERION_NAME
    # FocalSetCriterion; see d2_detr.modeling.focal): weight of the positives (1 - alpha for the negatives).
    detr.FOCAL_ALPHA = 0.25
    # Focal loss and focal matching cost: exponent of the modulating factor (1 - p_t).
    detr.FOCAL_GAMMA = 2.0

    # ---- inference ----
    # 0: the paper's rule (every query returned, score = best non-"no object" probability);
    # k > 0: keep the k best (query, class) pairs of each image instead (Deformable DETR: 100, by sigmoid score).
    detr.TEST_TOPK = 0
    # Batches of images of different sizes (TEST.IMS_PER_BATCH > 1): the backbone runs image by image, so that
    # no image's features see another's padding and detections do not depend on the batch (True); or on the
    # padded batch at once, as the original implementation (False: faster where batching pays, e.g. on GPUs;
    # detections near an image's bottom/right border then change slightly with the batch's padding).
    detr.TEST_BACKBONE_PER_IMAGE = True

    # ---- speed (none of these changes the outputs beyond float rounding) ----
    # Fold the backbone's frozen BatchNorms into the preceding convolutions' weights at every call.
    detr.FOLD_FROZEN_BN = True
    # Feed the backbone channels-last (NHWC) images: faster convolutions on CPU and on tensor-core GPUs.
    detr.CHANNELS_LAST = True
    # Opt-in: the transformer's matrix products through oneDNN on CPU (fp32, 256+ rows; forward and backward)
    # instead of the BLAS library behind F.linear (MKL in official builds). Faster or slower depending on the CPU,
    # thread count and load (benchmarks/README.md); no effect on GPU, under autocast, or while exporting. Uses a
    # private torch entry point, checked once per process: where it is missing or wrong, F.linear is used.
    detr.ONEDNN_LINEAR = False
    # How the transformers' multi-head attention is computed: "sdpa" (F.scaled_dot_product_attention, fused kernels
    # where the device has them) or, opt-in, "matmul" (explicit matrix products, softmax in float32). Under bfloat16
    # autocast on CPU the fused kernel can be several times slower for short sequences and narrow heads
    # (benchmarks/README.md); same outputs up to float rounding.
    detr.ATTENTION_KERNEL = "sdpa"
    # Compile the transformer with torch.compile (the first iterations, and new input shapes, compile).
    detr.COMPILE_TRANSFORMER = False
    # torch.compile backend used with COMPILE_TRANSFORMER ("inductor", "aot_eager", ...).
    detr.COMPILE_BACKEND = "inductor"

    # ---- backbone ----
    # With MODEL.RESNETS.RES5_DILATION = 2 (DC5): keep dilation 1 in the first res5 block as torchvision
    # does (True, the original DETR) instead of dilating every block as Detectron2 does (False).
    detr.TORCHVISION_DILATION = True

    # ---- segmentation (MODEL.MASK_ON: DETR's mask head; see d2_detr.modeling.segmentation) ----
    # With FROZEN_WEIGHTS empty: still freeze everything but the mask head (the detector then comes from
    # MODEL.WEIGHTS), for the paper's second training stage. FROZEN_WEIGHTS non-empty implies it.
    detr.FREEZE_DETECTOR = False
    # Registered name of the mask head (d2_detr.modeling.registry.DETR_MASK_HEAD_REGISTRY).
    detr.MASK_HEAD_NAME = "DetrMaskHead"
    # Backbone features the mask head's FPN adds in, coarse to fine; each must be in MODEL.RESNETS.OUT_FEATURES.
    # The last one's stride (res2: 4) is the stride of the predicted masks.
    detr.MASK_IN_FEATURES = ["res4", "res3", "res2"]
    # Map concatenated with the attention maps at the head's input: "input_proj" (the original code: the
    # projected backbone feature entering the encoder) or "memory" (the encoder output, as the paper's Fig. 8).
    detr.MASK_HEAD_INPUT = "input_proj"
    # Weight of the sigmoid focal loss (alpha 0.25, gamma 2) on matched masks (loss_mask).
    detr.MASK_WEIGHT = 1.0
    # Weight of the DICE loss on matched masks (loss_dice).
    detr.DICE_WEIGHT = 1.0
    # Leave each image's padding out of loss_mask and loss_dice, predictions upsampled by exactly their stride, so
    # that the losses do not depend on the batch's other images (True); or, as the original implementation
    # (False), resize predictions to the batch's largest target size and average over the padding too.
    detr.MASK_LOSS_IGNORE_PADDING = True
    # Inference also returns "panoptic_seg" (needs MODEL.MASK_ON; stuff classes are predicted as objects;
    # which classes are stuff comes from the metadata of the first dataset in DATASETS.TRAIN, else TEST).
    detr.PANOPTIC_ON = False
    # Panoptic post-processing: queries whose best class is not "no object" with probability above this are kept.
    detr.PANOPTIC_OBJECT_THRESHOLD = 0.85
    # Panoptic post-processing: segments with fewer pixels (at output size) are dropped and their pixels
    # re-assigned (the original drops areas <= 4).
    detr.PANOPTIC_MIN_AREA = 5

    _add_deformable_detr_config(cfg)
    _add_dino_config(cfg)

    # ---- data ----
    # Check of the datasets when training starts (DATASETS.TRAIN as the train loader gets them, and DATASETS.TEST),
    # before the first iteration; problems stop the run with a list of the files and what is wrong with them.
    # "files": every image (and segmentation) file exists (one stat per file); "full": also every image decodes,
    # has its record's height and width, and has valid annotations (boxes finite and inside the image, category
    # ids below MODEL.DETR.NUM_CLASSES): what tools/check_dataset.py does, one full read of the images, decoded
    # in DATALOADER.NUM_WORKERS processes; "none": no check.
    cfg.DATASETS.CHECK_BEFORE_TRAINING = "files"
    # With INPUT.CROP.ENABLED: probability of the crop branch of DETR's augmentation (else plain resize).
    cfg.INPUT.CROP.PROB = 0.5
    # With INPUT.CROP.ENABLED: shortest-edge sizes (one picked at random) the image is resized to before
    # the random crop; after the crop it is resized again to one of INPUT.MIN_SIZE_TRAIN.
    cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP = (400, 500, 600)
    # Panoptic training data: drop segments marked iscrowd (True), as crowd annotations are dropped for detection:
    # the panoptic evaluation ignores crowd regions, and a crowd mask teaches a query to cover a group with one
    # segment. False trains on them as on any segment, as the original implementation does.
    cfg.INPUT.PANOPTIC_DROP_CROWD = True
    # Images per batch at inference (Detectron2 v0.6 always uses 1); AP does not depend on it with
    # MODEL.DETR.TEST_BACKBONE_PER_IMAGE (the default).
    cfg.TEST.IMS_PER_BATCH = 1
    # Evaluation and inference (--eval-only, tools/demo.py, tools/export_model.py) refuse MODEL.WEIGHTS unless
    # it holds every parameter and buffer of the model with its shape and nothing else, and refuse an empty
    # MODEL.WEIGHTS. False loads what matches and logs the rest, as Detectron2 does (e.g. to evaluate a model
    # whose head was re-initialised on purpose); an empty MODEL.WEIGHTS then runs the model as initialised.
    cfg.TEST.STRICT_WEIGHTS = True

    # ---- solver ----
    # "ADAMW" (the recipe) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Update all parameters in one fused kernel (PyTorch's fused=True) instead of the per-tensor loop: the same
    # update up to float rounding, in less time (figures: benchmarks/README.md).
    cfg.SOLVER.FUSED_OPTIMIZER = True
    # Learning-rate multiplier of the backbone's parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Further learning-rate multipliers by parameter name: a list of [pattern, multiplier] pairs; a parameter whose
    # name contains a match of the regular expression ``pattern`` (re.search) gets its LR times ``multiplier`` (the
    # first matching pair counts; combined with BACKBONE_MULTIPLIER for backbone parameters). Deformable DETR:
    # [["sampling_offsets", 0.1], ["reference_points", 0.1]].
    cfg.SOLVER.LR_MULTIPLIERS = []
    # Gradient clipping of the recipe: the whole model's L2 norm at 0.1. CLIP_TYPE "full_model" is added
    # here; Detectron2's "value" and "norm" (per parameter) still work.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    # Gradient accumulation: micro-batches per optimizer step. SOLVER.IMS_PER_BATCH stays the images of one
    # optimizer step (one iteration: one LR scheduler step, one gradient clipping) over all processes; each
    # process runs ACCUMULATE_STEPS forward/backward passes of IMS_PER_BATCH / (ACCUMULATE_STEPS x processes)
    # images, and DETR's loss is normalised over all of them, so the step equals one step on the whole batch.
    cfg.SOLVER.ACCUMULATE_STEPS = 1
    # With SOLVER.AMP.ENABLED: the autocast dtype. "float16" (with a gradient scaler), "bfloat16" (no scaler
    # needed), or "auto": float16 on CUDA, bfloat16 on CPU. Matching and losses always run in float32.
    cfg.SOLVER.AMP.DTYPE = "auto"

    # ---- process ----
    # tools/train_net.py on CPU (MODEL.DEVICE cpu) under glibc: keep freed memory in the process (glibc mallopt:
    # no mmap for large blocks, trim above 2 GB) so a step reuses its buffers instead of faulting them in again;
    # the process then holds its peak memory. Process-wide; no effect on GPU runs or off glibc. False: malloc as is.
    cfg.KEEP_FREED_MEMORY = True

def _add_deformable_detr_config(cfg: CN) -> None:
    """Keys of the models built on multi-scale deformable attention (``DeformableDetr``; DINO reads them too).

    These models also read the ``MODEL.DETR`` keys they share with DETR (NUM_CLASSES, HIDDEN_DIM, NHEADS,
    DROPOUT, DIM_FEEDFORWARD, ENC_LAYERS, DEC_LAYERS, NUM_OBJECT_QUERIES, the loss and cost weights, TEST_TOPK and
    the speed options), with the values of their own recipe set in configs/Base-DeformableDETR.yaml.
    """
    cfg.MODEL.DEFORMABLE_DETR = CN()
    deformable = cfg.MODEL.DEFORMABLE_DETR
    # Backbone outputs fed to the transformer, finest first (strides 8, 16, 32 for res3..res5).
    deformable.IN_FEATURES = ["res3", "res4", "res5"]
    # Feature levels of the transformer: the IN_FEATURES, then NUM_FEATURE_LEVELS - len(IN_FEATURES) extra
    # levels, each a 3x3 stride-2 conv (+ GroupNorm) of the previous one (the first of the last backbone output).
    # 4 in the paper; 1 with IN_FEATURES ["res5"] is its single-scale model.
    deformable.NUM_FEATURE_LEVELS = 4
    # Sampling points per attention head and feature level in the encoder's deformable self-attention.
    deformable.ENC_N_POINTS = 4
    # Sampling points per attention head and feature level in the decoder's deformable cross-attention.
    deformable.DEC_N_POINTS = 4
    # Iterative bounding box refinement: each decoder layer has its own heads and refines the previous layer's
    # boxes, which become its successor's reference boxes.
    deformable.WITH_BOX_REFINE = False
    # Two-stage: the encoder output proposes boxes (one per feature cell, scored by an extra head and supervised
    # class-agnostically: losses "*_enc"); the top NUM_OBJECT_QUERIES give the decoder's reference boxes and
    # queries.
    deformable.TWO_STAGE = False
    # Detections independent of the batch's padding (also for DINO): each level's padding mask follows the image's
    # own size (cell valid iff below ceil(size / stride)), padded cells are never selected as proposals (two-stage,
    # DINO's query selection), and DINO's positional queries embed boxes relative to the image's unpadded area.
    # False: the original code's behaviour (masks interpolated from the padded batch's pixel mask, padded cells
    # selectable, DINO's boxes scaled to the padded first level). For a batch of one image both are the same.
    deformable.PADDING_INVARIANT = True


class ConfigError(ValueError):
    """A config file or override that cannot be loaded; the message names the file, key or value."""


def _keys(node: CN, prefix: str = "") -> Iterator[str]:
    """Every full key of a config (``MODEL.DETR.NUM_CLASSES``, ...), sub-configs included."""
    for name, value in node.items():
        yield prefix + name
        if isinstance(value, CN):
            yield from _keys(value, prefix + name + ".")


def _unknown_key(cfg: CN, key: str, where: str) -> ConfigError:
    """The error for a key the config does not have, with the closest existing keys as suggestions."""
    close = difflib.get_close_matches(key, list(_keys(cfg)), n=3, cutoff=0.85)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{where}: unknown config key {key}.{hint} d2_detr's keys are listed in "
                       "docs/configuration.md; the others are Detectron2's (detectron2/config/defaults.py).")


def _has_key(cfg: CN, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return True


def load_config(config_file: Optional[str], opts: Sequence[str] = (), freeze: bool = True) -> CN:
    """Detectron2's default config with d2_detr's keys (:func:`add_detr_config`), then ``config_file`` (a YAML
    file, ``_BASE_`` files included; None: none), then ``opts``: ``KEY VALUE`` pairs as on the command line
    (``["SOLVER.BASE_LR", "0.0002", ...]``). Frozen unless ``freeze`` is False.

    Raises:
        ConfigError: the file does not exist or is not valid YAML, a key (in the file or in ``opts``) does not
            exist, a value has the wrong type, or ``opts`` is not a list of pairs; the message names which.
    """
    if config_file is not None and not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file!r} does not exist (relative paths start at "
                          f"{os.getcwd()}); pass the path of a YAML config, e.g. configs/detr_r50.yaml.")
    cfg = get_cfg()
    add_detr_config(cfg)
    try:
        if config_file is not None:
            cfg.merge_from_file(config_file)
    except KeyError as e:  # yacs: "Non-existent config key: A.B"
        message = str(e.args[0]) if e.args else str(e)
        unknown = re.fullmatch(r"Non-existent config key: (\S+)", message)
        if unknown:
            raise _unknown_key(cfg, unknown.group(1), config_file) from None
        raise ConfigError(f"{config_file}: {message}") from e
    except (OSError, ValueError, AssertionError, yaml.YAMLError) as e:  # missing _BASE_, type mismatch, syntax
        raise ConfigError(f"{config_file}: {type(e).__name__}: {e}") from e
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"config overrides {opts} are not KEY VALUE pairs (odd number of items); "
                          "write each key followed by its value, e.g. SOLVER.BASE_LR 0.0002.")
    for key, value in zip(opts[0::2], opts[1::2]):
        if not _has_key(cfg, key):
            raise _unknown_key(cfg, key, f"override {key} {value}")
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError) as e:  # yacs: type mismatch, renamed key, ...
            raise ConfigError(f"override {key} {value}: {e}") from e
    if freeze:
        cfg.freeze()
    return cfg
def _add_dino_config(cfg: CN) -> None:
    """Keys of ``Dino`` (d2_detr.modeling.dino), one switch per ingredient of the paper.

    DINO also reads the MODEL.DETR keys (sizes, NUM_CLASSES, NUM_OBJECT_QUERIES, loss and cost weights, TEST_TOPK)
    and MODEL.DEFORMABLE_DETR's IN_FEATURES, NUM_FEATURE_LEVELS, ENC_N_POINTS and DEC_N_POINTS, with its recipe's
    values in configs/Base-DINO.yaml.
    """
    cfg.MODEL.DINO = CN()
    dino = cfg.MODEL.DINO
    # Contrastive denoising: positive noised copies of the ground truth per image, about (as many negatives are
    # added); they form DN_NUMBER // (most boxes of an image in the batch) groups. 0 turns denoising off.
    dino.DN_NUMBER = 100
    # Denoising: a copy's label is replaced by a random one with probability DN_LABEL_NOISE_RATIO / 2.
    dino.DN_LABEL_NOISE_RATIO = 0.5
    # Denoising: lambda of the box noise; a positive copy's corners move by less than lambda times half the box's
    # size, a negative's by between lambda and 2 lambda times it.
    dino.DN_BOX_NOISE_SCALE = 0.4
    # Denoising: labels embedded as content queries (DN_LABELBOOK_SIZE + 1 rows) and drawn by the label noise;
    # must be >= MODEL.DETR.NUM_CLASSES (91 in the original COCO setting; keep 91 to load its checkpoints).
    dino.DN_LABELBOOK_SIZE = 91
    # How the decoder's queries are made: "mixed" (the paper's: reference boxes from the top encoder cells, learned
    # content queries), "pure" (both from the top encoder cells, as Deformable DETR's two-stage) or "static"
    # (learned reference boxes and content queries, no encoder selection and no encoder loss).
    dino.QUERY_SELECTION = "mixed"
    # Look forward twice: layer i's box loss also trains layer i-1 through its (undetached) refined box.
    dino.LOOK_FORWARD_TWICE = True
