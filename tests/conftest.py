"""Shared test set-up: datasets go to a per-session temporary root, never into the repository."""
import os
import signal
import tempfile

os.environ.setdefault("DETECTRON2_DATASETS", tempfile.mkdtemp(prefix="d2_detr_test_datasets_"))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, Backbone  # noqa: E402
from torch import nn  # noqa: E402

from d2_detr import add_detr_config  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
TINY_CONFIG = os.path.join(TESTS_DIR, "configs", "tiny.yaml")


def sigint_default() -> None:
    """A ``preexec_fn`` for a child the test interrupts: SIGINT back to its default action before the exec, so that
    the child handles it as it would from a terminal even when the tests run where SIGINT is ignored (a
    background job of a non-interactive shell), which the child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def load_config(path: str = TINY_CONFIG, *opts):
    """A DETR config from ``path`` with ``KEY VALUE`` overrides."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and avoids OpenMP oversubscription on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_cfg():
    return load_config()


class PatchBackbone(Backbone):
    """Non-overlapping 32x32 patches -> one feature cell each (the input is zero-padded to a multiple of 32).
    A cell's feature depends on its own pixels only, so any difference between an image alone and in a
    padded batch comes from the DETR model's masking, not from convolutions crossing the image border."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, kernel_size=32, stride=32)

    def forward(self, x):
        h, w = x.shape[-2:]
        return {"patches": self.proj(F.pad(x, (0, -w % 32, 0, -h % 32)))}

    def output_shape(self):
        return {"patches": ShapeSpec(channels=16, stride=32)}


if "PatchBackbone" not in BACKBONE_REGISTRY:
    BACKBONE_REGISTRY.register(PatchBackbone)

# Config overrides that put PatchBackbone under the tiny config's DETR.
PATCH_BACKBONE_OPTS = ["MODEL.BACKBONE.NAME", "PatchBackbone", "MODEL.DETR.IN_FEATURE", "patches"]
