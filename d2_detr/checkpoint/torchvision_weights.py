"""``torchvision://`` weights paths: torchvision's published ImageNet ResNets as initial weights of Detr's backbone.

    MODEL.WEIGHTS torchvision://resnet101                # ResNet101_Weights.IMAGENET1K_V1, as the original DETR
    MODEL.WEIGHTS torchvision://resnet50/IMAGENET1K_V2   # any other of torchvision's weights of that model

A path resolves to torchvision's published file in torch hub's cache (``$TORCH_HOME/hub/checkpoints``, where
``torchvision.models.resnet101(weights=...)`` keeps it), downloaded there by ``torch.hub`` (with its hash check)
when it is not there yet, and converted once to Detectron2's ResNet names
(:func:`~d2_detr.checkpoint.convert.convert_torchvision_resnet_state_dict`) into
``$TORCH_HOME/hub/checkpoints/d2_detr/<file name>``: the path is that converted file. :class:`TorchvisionHandler`
is registered on Detectron2's ``PathManager`` when d2_detr is imported, so every ``DetectionCheckpointer`` (training,
evaluation, tools) loads such a path as a local checkpoint by exact names. Without network access, put torchvision's
file in the cache folder (the error says where), or convert it with tools/convert_torchvision_resnet.py.
"""
import logging
import os
from typing import Any, Tuple
from urllib.parse import urlparse

import torch
from iopath.common.file_io import PathHandler

from .convert import convert_torchvision_resnet_state_dict, load_state_dict_file, save_converted_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["TorchvisionHandler", "TorchvisionWeights", "parse_torchvision_path", "resolve_torchvision_weights"]

PREFIX = "torchvision://"
#: torchvision's ImageNet ResNets (the converter's layout: conv1/bn1, layer1..4 of basic or bottleneck blocks).
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: What a path without weights name loads: the weights torchvision's ``pretrained=True`` gave, which DETR started from.
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
#: Folder of the converted files, under torch hub's checkpoints folder.
CONVERTED_SUBDIR = "d2_detr"


class TorchvisionWeights:
    """What a ``torchvision://`` path names: the model, the weights' name and torchvision's URL of the file."""

    def __init__(self, path: str, model: str, weights: str, url: str):
        self.path, self.model, self.weights, self.url = path, model, weights, url

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    def cache_paths(self) -> Tuple[str, str]:
        """(torchvision's file, the converted file) in torch hub's cache folder (``TORCH_HOME`` moves it)."""
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        return os.path.join(folder, self.file_name), os.path.join(folder, CONVERTED_SUBDIR, self.file_name)


def parse_torchvision_path(path: str) -> TorchvisionWeights:
    """``torchvision://MODEL[/WEIGHTS]`` -> :class:`TorchvisionWeights`.

    Raises:
        ValueError: for a model other than torchvision's ResNets, or weights torchvision does not have for it.
    """
    from torchvision.models import get_model_weights

    if not path.startswith(PREFIX):
        raise ValueError(f"{path!r} is not a {PREFIX} path")
    model, _, weights = path[len(PREFIX):].partition("/")
    if model not in MODELS:
        raise ValueError(f"{path!r}: {PREFIX} paths name one of torchvision's ResNets ({', '.join(MODELS)}), "
                         f"e.g. {PREFIX}resnet101, got {model!r}")
    enum = get_model_weights(model)
    weights = weights or DEFAULT_WEIGHTS
    if weights not in enum.__members__:
        raise ValueError(f"{path!r}: torchvision has no weights {weights!r} for {model}; it has "
                         f"{', '.join(enum.__members__)} (e.g. {PREFIX}{model}/{next(iter(enum.__members__))})")
    return TorchvisionWeights(path, model, weights, enum[weights].url)


def _download(weights: TorchvisionWeights, source: str) -> None:
    """torchvision's file to ``source`` (torch hub's download, checking the hash in its name); a clear OSError."""
    try:
        torch.hub.load_state_dict_from_url(weights.url, model_dir=os.path.dirname(source), map_location="cpu",
                                           check_hash=True, file_name=weights.file_name, weights_only=True)
    except Exception as e:  # URLError, HTTPError, hash mismatch (RuntimeError), disk errors ...
        raise OSError(
            f"MODEL.WEIGHTS {weights.path}: could not download torchvision's {weights.model} weights "
            f"({weights.weights}) from {weights.url}: {type(e).__name__}: {e}. Where this machine cannot reach it, "
            f"download the file elsewhere and put it at {source} (torch hub's cache; TORCH_HOME moves it), or "
            f"convert it with `python tools/convert_torchvision_resnet.py --input {weights.file_name} --output "
            f"{weights.model}.pth` and pass MODEL.WEIGHTS {weights.model}.pth."
        ) from e


def resolve_torchvision_weights(path: str) -> str:
    """The local checkpoint a ``torchvision://`` path names: torchvision's file (downloaded when not in torch hub's
    cache) converted to Detectron2's names; converted once and reused while it is newer than torchvision's file.

    Raises:
        ValueError: a path naming no torchvision ResNet weights, or a cached file that is not a ResNet state dict.
        OSError: the file is not cached and cannot be downloaded.
    """
    weights = parse_torchvision_path(path)
    source, converted = weights.cache_paths()
    if os.path.isfile(converted) and (not os.path.isfile(source)
                                      or os.path.getmtime(converted) >= os.path.getmtime(source)):
        return converted
    if not os.path.isfile(source):
        logger.info("Downloading torchvision's %s weights (%s) to %s", weights.model, weights.weights, source)
        _download(weights, source)
    try:
        state_dict = convert_torchvision_resnet_state_dict(load_state_dict_file(source))
    except Exception as e:  # unpickling errors of a damaged file, ValueError of the converter
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"MODEL.WEIGHTS {path}: {source} is not torchvision's {weights.model} state dict "
                         f"({type(e).__name__}: {reason}); delete it to download it again.") from e
    save_converted_checkpoint(state_dict, converted)
    logger.info("%s: torchvision's %s converted to Detectron2's names in %s", path, source, converted)
    return converted


class TorchvisionHandler(PathHandler):
    """iopath handler of ``torchvision://`` paths (:func:`resolve_torchvision_weights`), for Detectron2's
    ``PathManager`` as its own ``detectron2://`` handler is."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        return resolve_torchvision_weights(path)

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        if "w" in mode or "a" in mode or "+" in mode:
            raise ValueError(f"{path}: {PREFIX} paths are read-only")
        return open(self._get_local_path(path), mode)
