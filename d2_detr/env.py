"""Environment report: ``python -m d2_detr.env``.

Prints the versions of the stack d2_detr runs on, whether detectron2's compiled ops are present, and the
device, followed by Detectron2's own report.
"""
import importlib.util
import logging
import platform
from typing import List, Tuple

__all__ = ["detectron2_has_compiled_ops", "collect_report"]

logger = logging.getLogger(__name__)


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
