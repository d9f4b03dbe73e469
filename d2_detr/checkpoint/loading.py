"""Loading checkpoints with errors that name the file and say what to do.

* :class:`CheckedCheckpointer`: Detectron2's ``DetectionCheckpointer`` whose ``load`` raises
  :class:`UnreadableCheckpointError` for a missing, truncated or foreign file instead of an ``AssertionError``
  or torch's text. The file is read completely before anything is loaded, so the model is untouched then.
* :func:`load_checkpoint_strict`: every model parameter and buffer must be found with its shape and nothing
  else may be left over; a mismatch raises :class:`CheckpointError` naming the config keys that likely differ.
* :func:`load_inference_weights`: ``MODEL.WEIGHTS`` for evaluation and inference (``--eval-only``,
  ``tools/demo.py``, ``tools/export_model.py``), strictly unless ``TEST.STRICT_WEIGHTS`` is False.

Training keeps Detectron2's partial loading of ``MODEL.WEIGHTS`` (an ImageNet backbone starts a DETR).
"""
import logging
import os
import pickle
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from fvcore.common.checkpoint import Checkpointer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "CheckedCheckpointer",
    "CheckpointError",
    "UnreadableCheckpointError",
    "load_checkpoint_strict",
    "load_inference_weights",
]

logger = logging.getLogger(__name__)

# Config keys that decide the presence or shape of the parameters under each state-dict prefix (first match wins).
_CONFIG_KEYS_BY_PREFIX: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("class_embed.", ("MODEL.DETR.NUM_CLASSES", "MODEL.DETR.HIDDEN_DIM")),
    ("criterion.", ("MODEL.DETR.NUM_CLASSES",)),
    ("query_embed.", ("MODEL.DETR.NUM_OBJECT_QUERIES", "MODEL.DETR.HIDDEN_DIM")),
    ("bbox_embed.", ("MODEL.DETR.HIDDEN_DIM",)),
    ("input_proj.", ("MODEL.DETR.HIDDEN_DIM", "MODEL.DETR.IN_FEATURE", "MODEL.RESNETS.DEPTH",
                     "MODEL.RESNETS.RES2_OUT_CHANNELS")),
    ("transformer.encoder.", ("MODEL.DETR.ENC_LAYERS", "MODEL.DETR.HIDDEN_DIM", "MODEL.DETR.DIM_FEEDFORWARD",
                              "MODEL.DETR.PRE_NORM")),
    ("transformer.decoder.", ("MODEL.DETR.DEC_LAYERS", "MODEL.DETR.HIDDEN_DIM", "MODEL.DETR.DIM_FEEDFORWARD")),
    ("transformer.", ("MODEL.DETR.TRANSFORMER_NAME", "MODEL.DETR.HIDDEN_DIM")),
    ("position_encoding.", ("MODEL.DETR.POSITION_EMBEDDING", "MODEL.DETR.HIDDEN_DIM")),
    ("mask_head.", ("MODEL.MASK_ON", "MODEL.DETR.MASK_HEAD_NAME", "MODEL.DETR.MASK_IN_FEATURES",
                    "MODEL.DETR.HIDDEN_DIM", "MODEL.DETR.NHEADS")),
    ("backbone.", ("MODEL.BACKBONE.NAME", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.STEM_OUT_CHANNELS",
                   "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.RESNETS.WIDTH_PER_GROUP", "MODEL.RESNETS.NORM",
                   "MODEL.RESNETS.OUT_FEATURES")),
)
_MAX_LISTED_KEYS = 5
_PARTIAL_SWITCH = "TEST.STRICT_WEIGHTS False"


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, unreadable, or not matching the model); the message names the file
    and says what to do."""


class UnreadableCheckpointError(CheckpointError):
    """The checkpoint file does not exist or cannot be read as a checkpoint (truncated, not a PyTorch file)."""


def _named(path: str, source: str) -> str:
    return f"checkpoint {path!r}" + (f" ({source})" if source else "")


def _read_failure(error: BaseException) -> str:
    """Why a checkpoint file could not be read, in a user's terms."""
    message = str(error)
    text = (message.strip().splitlines() or [""])[0]
    if isinstance(error, EOFError) or "central directory" in text or "zip archive" in text:
        return "the file is truncated or corrupted (an interrupted copy, download or save)"
    if isinstance(error, TypeError):  # raised by CheckedCheckpointer._load_file
        return text
    if "Weights only load failed" in text and "Unsupported global" in message:
        return ("the file holds Python objects that torch.load(weights_only=True) refuses to unpickle; save the "
                "model's state dict alone: torch.save({'model': model.state_dict()}, path)")
    if isinstance(error, (KeyError, pickle.UnpicklingError, UnicodeDecodeError)):
        return "it is not a PyTorch or Detectron2 checkpoint file"
    return f"{type(error).__name__}: {text[:200]}"


class CheckedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``load`` raises :class:`UnreadableCheckpointError`, naming the file, when
    the file does not exist or cannot be read; nothing is loaded into the model or the checkpointables then."""

    def load(self, path: str, checkpointables: Optional[List[str]] = None, *, source: str = "") -> Dict[str, Any]:
        """``DetectionCheckpointer.load``; ``source`` (e.g. "MODEL.WEIGHTS") says where the path came from in
        error messages."""
        # Under DDP, Detectron2 compares the file's presence across processes itself (a collective call).
        if path and "://" not in path and not isinstance(self.model, DistributedDataParallel) \
                and not os.path.isfile(path):
            raise UnreadableCheckpointError(f"{_named(path, source)} does not exist; check the path.")
        try:
            return super().load(path, checkpointables)
        except _ReadError as e:
            raise UnreadableCheckpointError(f"cannot read {_named(path, source)}: {_read_failure(e.__cause__)}. "
                                            "Pass a complete checkpoint file (.pth or .pkl).") from e.__cause__
        except OSError as e:  # the file is missing on the main process under DDP, or a download failed
            raise UnreadableCheckpointError(f"cannot read {_named(path, source)}: {e}") from e

    def _load_file(self, filename: str) -> Dict[str, Any]:
        """``DetectionCheckpointer._load_file``: Detectron2's .pkl and pycls .pyth files, else ``torch.load``
        (a dict without "model" is taken for the model's state dict)."""
        try:
            if filename.endswith((".pkl", ".pyth")):
                checkpoint = super()._load_file(filename)
            else:
                checkpoint = Checkpointer._load_file(self, filename)
                if isinstance(checkpoint, Mapping) and "model" not in checkpoint:
                    checkpoint = {"model": checkpoint}
        except Exception as e:
            raise _ReadError() from e
        if not isinstance(checkpoint, Mapping):
            raise _ReadError() from TypeError(f"it holds a {type(checkpoint).__name__}, not a state dict")
        if not isinstance(checkpoint["model"], Mapping):
            found = type(checkpoint["model"]).__name__
            raise _ReadError() from TypeError(f"its 'model' is a {found}, not a state dict")
        return checkpoint


class _ReadError(Exception):
    """Raised from ``_load_file`` (the original error as its ``__cause__``); ``load`` turns it into a message."""


class _InspectingCheckpointer(CheckedCheckpointer):
    """A checkpointer that keeps what it compared, so a mismatch can be raised, not only logged.

    After ``load``: ``checkpoint_shapes`` maps every model-state key of the file to its shape and
    ``incompatible`` holds missing keys, unexpected keys and incorrect shapes.
    """

    checkpoint_shapes: Dict[str, Tuple[int, ...]]
    incompatible = None

    def _load_model(self, checkpoint):
        state = checkpoint.get("model", {})
        keys = list(state)
        strip = bool(keys) and all(k.startswith("module.") for k in keys)
        self.checkpoint_shapes = {(k[len("module."):] if strip else k): tuple(getattr(v, "shape", ()))
                                  for k, v in state.items()}
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def _log_incompatible_keys(self, incompatible) -> None:
        """Log nothing: :func:`load_checkpoint_strict` raises with these keys instead."""


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def _config_keys_for(param_keys: Iterable[str]) -> List[str]:
    """Config keys that decide the given parameters, most specific first, each once."""
    keys: List[str] = []
    for param in param_keys:
        for prefix, config_keys in _CONFIG_KEYS_BY_PREFIX:
            if param.startswith(prefix):
                keys.extend(k for k in config_keys if k not in keys)
                break
    return keys


def _checkpoint_config_values(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """DETR config values that the checkpoint's parameter shapes reveal."""
    values: Dict[str, int] = {}
    if len(shapes.get("class_embed.weight", ())) == 2:
        values["MODEL.DETR.NUM_CLASSES"] = shapes["class_embed.weight"][0] - 1
        values["MODEL.DETR.HIDDEN_DIM"] = shapes["class_embed.weight"][1]
    if len(shapes.get("query_embed.weight", ())) == 2:
        values["MODEL.DETR.NUM_OBJECT_QUERIES"] = shapes["query_embed.weight"][0]
    for part, config_key in (("encoder", "MODEL.DETR.ENC_LAYERS"), ("decoder", "MODEL.DETR.DEC_LAYERS")):
        layer_re = re.compile(rf"transformer\.{part}\.layers\.(\d+)\.")
        indices = [int(m.group(1)) for m in map(layer_re.match, shapes) if m]
        if indices:
            values[config_key] = max(indices) + 1
        linear1 = shapes.get(f"transformer.{part}.layers.0.linear1.weight", ())
        if len(linear1) == 2 and "MODEL.DETR.DIM_FEEDFORWARD" not in values:
            values["MODEL.DETR.DIM_FEEDFORWARD"] = linear1[0]
    return values


def _cfg_value(cfg: CfgNode, dotted_key: str):
    node = cfg
    for part in dotted_key.split("."):
        node = node[part]
    return node


def _mismatch_message(path: str, cfg: Optional[CfgNode], model_keys: Sequence[str], shapes: Dict[str, Tuple[int, ...]],
                      incompatible) -> str:
    wrong_shapes = list(incompatible.incorrect_shapes)
    reshaped = {k for k, _, _ in wrong_shapes}
    missing = [k for k in incompatible.missing_keys if k not in reshaped]  # fvcore drops reshaped ones too
    unexpected = list(incompatible.unexpected_keys)
    loaded = len([k for k in model_keys if k not in reshaped and k not in incompatible.missing_keys])
    lines = [f"checkpoint {path!r} does not match the model built from the config "
             f"({loaded} of its {len(model_keys)} tensors found with their shape):"]
    if wrong_shapes:
        lines.append(f"  {len(wrong_shapes)} parameter(s) with another shape: " + _listed(
            [f"{k} (checkpoint {tuple(ck)}, model {tuple(mk)})" for k, ck, mk in wrong_shapes]))
    if missing:
        lines.append(f"  {len(missing)} parameter(s) missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected parameter(s) in the checkpoint: {_listed(unexpected)}")
    head_keys = [k for k in model_keys if not k.startswith("backbone.")]
    if head_keys and not set(head_keys) & set(shapes):
        lines.append("The checkpoint holds none of DETR's transformer and head weights: it is not a trained DETR "
                     "(backbone-only weights, e.g. ImageNet, only serve to start training). "
                     "Pass MODEL.WEIGHTS of a trained model, e.g. OUTPUT_DIR/model_final.pth of tools/train_net.py.")
        return "\n".join(lines)
    differing = []
    if cfg is not None:
        for key, value in _checkpoint_config_values(shapes).items():
            if _cfg_value(cfg, key) != value:
                differing.append((key, value, _cfg_value(cfg, key)))
    if differing:
        lines.append("The checkpoint was trained with " + ", ".join(
            f"{key} {value} (the config has {current})" for key, value, current in differing) + ".")
    config_keys = [key for key, _, _ in differing]
    config_keys += [k for k in _config_keys_for([k for k, _, _ in wrong_shapes] + missing + unexpected)
                    if k not in config_keys]
    if config_keys:
        lines.append("Config keys likely wrong: " + ", ".join(config_keys) + ".")
    config_yaml = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    advice = "Use the config the checkpoint was trained with"
    if os.path.isfile(config_yaml):
        advice += f" ({config_yaml} was saved next to it)"
    if differing:
        advice += " or override, e.g. " + " ".join(f"{key} {value}" for key, value, _ in differing)
    lines.append(advice + f". To evaluate the partly loaded model anyway, add {_PARTIAL_SWITCH}.")
    return "\n".join(lines)


def _empty_message(source: str) -> str:
    return (f"{source} is empty: evaluation and inference need a trained checkpoint. Train one with "
            "tools/train_net.py (it writes OUTPUT_DIR/model_final.pth) and pass "
            f"{source} /path/to/model_final.pth (or add {_PARTIAL_SWITCH} to run the model as initialised).")


def load_checkpoint_strict(model: nn.Module, path: str, cfg: Optional[CfgNode] = None, *,
                           source: str = "MODEL.WEIGHTS") -> None:
    """Load the checkpoint ``path`` into ``model`` with ``DetectionCheckpointer``, requiring every model
    parameter and buffer to be found with its shape and nothing else to be left over.

    Raises :class:`UnreadableCheckpointError` when the file is missing or cannot be read, and
    :class:`CheckpointError` when it does not match; with ``cfg`` (the config the model was built from) the
    message names the config keys that likely differ from the checkpoint's. ``source`` says where ``path``
    came from in messages.
    """
    if not path:
        raise CheckpointError(_empty_message(source))
    checkpointer = _InspectingCheckpointer(model)
    checkpointer.load(path, checkpointables=[], source=source)
    incompatible = checkpointer.incompatible
    if incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes:
        raise CheckpointError(_mismatch_message(path, cfg, list(model.state_dict()), checkpointer.checkpoint_shapes,
                                                incompatible))


def load_inference_weights(model: nn.Module, cfg: CfgNode, path: Optional[str] = None, *,
                           source: str = "MODEL.WEIGHTS") -> None:
    """Load the weights to evaluate or run ``model`` (built from ``cfg``): ``path``, by default
    ``cfg.MODEL.WEIGHTS``, with :func:`load_checkpoint_strict`.

    With ``cfg.TEST.STRICT_WEIGHTS`` False, what matches is loaded and the rest is logged (Detectron2's
    behaviour), and an empty path leaves the model as initialised, with a warning.

    Raises:
        CheckpointError: an empty path, a file that cannot be read, or (strict) weights that do not match.
    """
    path = cfg.MODEL.WEIGHTS if path is None else path
    strict = cfg.TEST.STRICT_WEIGHTS
    if not path:
        if strict:
            raise CheckpointError(_empty_message(source))
        logger.warning(f"{source} is empty and TEST.STRICT_WEIGHTS is False: the model runs with the weights it "
                       "was initialised with")
        return
    if strict:
        load_checkpoint_strict(model, path, cfg, source=source)
    else:
        logger.warning(f"TEST.STRICT_WEIGHTS is False: loading what matches the model from {path}; parameters "
                       "missing from it or of another shape keep their initial values")
        CheckedCheckpointer(model).load(path, checkpointables=[], source=source)
    logger.info(f"Loaded {path}")
