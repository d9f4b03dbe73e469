"""d2_detr: DETR as Detectron2 components.

Importing the package registers ``Detr`` in Detectron2's META_ARCH_REGISTRY, DETR's parts in their own
registries (d2_detr.modeling.registry), ``build_detr_resnet_backbone`` in BACKBONE_REGISTRY, and the
built-in synthetic datasets in DatasetCatalog.
"""
from . import data, modeling  # noqa: F401  (registers components and datasets)
from .config import add_detr_config, load_config

__version__ = "0.1.0"

__all__ = ["add_detr_config", "load_config", "__version__"]
