"""Checkpoints that are never half-written: each file is written to a temporary sibling, then renamed."""
import logging
import os
import re
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.file_io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["AtomicDetectionCheckpointer", "atomic_write"]

# Temporary files of atomic_write: ".<final name>.<pid>.tmp" next to the final file. The name never ends in ".pth",
# so Checkpointer.get_all_checkpoint_files and last_checkpoint never take one for a checkpoint.
_TEMPORARY_NAME = re.compile(r"^\.(.+\.pth|last_checkpoint)\.\d+\.tmp$")


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint files and ``last_checkpoint`` tag are written atomically
    (:func:`atomic_write`; ``save_dir`` must be a local directory). Temporary files left by a killed run are
    removed when the checkpointer of the next run (the one that saves) is created."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        if self.save_to_disk and save_dir and os.path.isdir(save_dir):
            for name in os.listdir(save_dir):
                if _TEMPORARY_NAME.match(name):
                    logger.info(f"Removing {name}, a checkpoint file left half-written by an interrupted run")
                    os.remove(os.path.join(save_dir, name))

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``Checkpointer.save`` (model, checkpointables, ``kwargs``), written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                     lambda f: f.write(last_filename_basename.encode()))
