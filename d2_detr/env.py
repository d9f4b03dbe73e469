"""The environment d2_detr runs in: the torch version it needs, its optional extras, and a report
(``python -m d2_detr.env``: the versions of the stack, whether detectron2's compiled ops are present, and the
device, followed by Detectron2's own report).
"""
import importlib
import importlib.util
import logging
import platform
import re
from types import ModuleType
from typing import Dict, List, Optional, Tuple

__all__ = [
    "EXTRAS",
    "MIN_TORCH",
    "MissingExtraError",
    "check_torch_version",
    "collect_report",
    "detectron2_has_compiled_ops",
    "import_optional",
    "require_extra",
]

logger = logging.getLogger(__name__)

#: The oldest torch d2_detr runs on (setup.py's install_requires says the same): fused AdamW/SGD kernels on the
#: CPU (``SOLVER.FUSED_OPTIMIZER``, default on) and ``torch.is_autocast_enabled(device_type)`` came with torch 2.4,
#: the ``dynamo`` argument of ``torch.onnx.export`` (d2_detr.export) with 2.5.
MIN_TORCH: Tuple[int, int] = (2, 5)
_MIN_TORCHVISION = "0.20"  # the torchvision release of torch 2.5

#: Optional features: extra name -> {module: the pip requirement that provides it} (setup.py's extras_require).
EXTRAS: Dict[str, Dict[str, str]] = {
    "export": {"onnx": "onnx>=1.13", "onnxruntime": "onnxruntime>=1.14"},
    "panoptic": {"panopticapi": "panopticapi-lite==0.2.0"},
}


def check_torch_version(version: Optional[str] = None) -> None:
    """Raise an ImportError saying what to install when torch (``torch.__version__``, or ``version``) is older
    than :data:`MIN_TORCH`."""
    if version is None:
        import torch

        version = torch.__version__
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match and (int(match[1]), int(match[2])) >= MIN_TORCH:
        return
    minimum = ".".join(map(str, MIN_TORCH))
    raise ImportError(
        f"d2_detr needs torch >= {minimum}, found torch {version}: it uses fused AdamW/SGD kernels on the CPU "
        f"and torch.onnx.export(dynamo=False), which older torch lacks. Upgrade torch and torchvision together, "
        f"e.g. pip install -U 'torch>={minimum}' 'torchvision>={_MIN_TORCHVISION}' (see pytorch.org for the build "
        "matching your CUDA)."
    )


class MissingExtraError(ImportError):
    """A feature needs a package of one of d2_detr's optional extras that is not installed."""


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or a :class:`MissingExtraError` naming the ``extra`` that installs it.

    Args:
        module: a module of :data:`EXTRAS` [``extra``].
        extra: the extra's name, e.g. "export".
        feature: what needs it, for the message, e.g. "ONNX export".
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        requirement = EXTRAS[extra][module]
        raise MissingExtraError(
            f"{feature} needs the module {module!r} ({requirement}), which is not installed here ({e}). Install "
            f"d2-detr's '{extra}' extra: pip install 'd2-detr[{extra}]', or in a clone of the repository "
            f"pip install -e '.[{extra}]'."
        ) from e


def require_extra(extra: str, feature: str) -> None:
    """:func:`import_optional` for every module of the ``extra``: fail before ``feature`` starts, not halfway."""
    for module in EXTRAS[extra]:
        import_optional(module, extra, feature)


def detectron2_has_compiled_ops() -> bool:
    """True when ``detectron2._C`` is a compiled extension (an official build), False when it is missing
    or is the stand-in written by ``tools/install_detectron2.py``."""
    if importlib.util.find_spec("detectron2._C") is None:
        return False
    from detectron2 import _C

    return getattr(_C, "COMPILED", True)


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"cuda ({torch.cuda.device_count()}: {names})"
    return f"cpu ({torch.get_num_threads()} threads)"


def collect_report() -> List[Tuple[str, str]]:
    """(name, value) rows of the report."""
    import detectron2
    import torch
    import torchvision

    import d2_detr

    return [
        ("python", platform.python_version()),
        ("d2_detr", f"{d2_detr.__version__} @ {d2_detr.__path__[0]}"),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("detectron2", f"{detectron2.__version__} @ {detectron2.__path__[0]}"),
        ("detectron2 compiled ops", "yes" if detectron2_has_compiled_ops() else
         "no (deformable conv, rotated ops and the C++ COCOeval unavailable; DETR needs none of them)"),
        ("device", _device_line()),
    ]


def main() -> None:
    from detectron2.utils.collect_env import collect_env_info
    from tabulate import tabulate

    print(tabulate(collect_report(), tablefmt="plain"))
    print()
    print(collect_env_info())


if __name__ == "__main__":
    main()
