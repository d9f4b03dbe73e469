"""d2_detr: DETR as Detectron2 components.

Importing the package registers ``Detr`` in Detectron2's META_ARCH_REGISTRY, DETR's parts in their own
registries (d2_detr.modeling.registry), ``build_detr_resnet_backbone`` in BACKBONE_REGISTRY, and the
built-in synthetic datasets in DatasetCatalog, and ``torchvision://`` weights paths (d2_detr.checkpoint) on
Detectron2's PathManager.
"""
from .env import check_torch_version

check_torch_version()  # before anything below uses a newer torch's API

from . import checkpoint, data, modeling  # noqa: E402, F401  (registers components, datasets and weights paths)
from .config import add_detr_config, load_config  # noqa: E402

__version__ = "0.1.0"

__all__ = ["add_detr_config", "load_config", "__version__"]
