"""Checkpoints that are never half-written (each file is written to a temporary sibling, then renamed), and
``--resume`` that falls back to the previous complete checkpoint when the last one cannot be read."""
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional

import torch

from ..checkpoint.loading import CheckedCheckpointer, UnreadableCheckpointError
from ..utils.file_io import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["AtomicDetectionCheckpointer", "RESUME_SOURCE", "atomic_write", "checkpoint_files"]

# Temporary files of atomic_write: ".<final name>.<pid>.tmp" next to the final file. The name never ends in ".pth",
# so Checkpointer.get_all_checkpoint_files and last_checkpoint never take one for a checkpoint.
_TEMPORARY_NAME = re.compile(r"^\.(.+\.pth|last_checkpoint)\.\d+\.tmp$")
# Periodic checkpoints of Detectron2's PeriodicCheckpointer: "model_<iteration, 7 digits>.pth".
_PERIODIC_NAME = re.compile(r"^model_(\d+)\.pth$")
#: Where a checkpoint loaded by --resume comes from, in error messages.
RESUME_SOURCE = "--resume: the last checkpoint of OUTPUT_DIR"


def checkpoint_files(directory: str) -> List[str]:
    """Names of the files in ``directory`` that make ``--resume`` continue from it or that a run writing
    checkpoints there replaces: ``last_checkpoint`` and ``*.pth`` files, sorted. Empty if it does not exist."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name == "last_checkpoint" or (name.endswith(".pth") and not _TEMPORARY_NAME.match(name)))


class AtomicDetectionCheckpointer(CheckedCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint files and ``last_checkpoint`` tag are written atomically
    (:func:`atomic_write`; ``save_dir`` must be a local directory). Temporary files left by a killed run are
    removed when the checkpointer of the next run (the one that saves) is created.

    Loading raises ``UnreadableCheckpointError`` naming the file when it is missing or unreadable
    (``CheckedCheckpointer``); resuming falls back to the previous complete checkpoint then
    (:meth:`load_last_complete`).
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        if self.save_to_disk and save_dir and os.path.isdir(save_dir):
            for name in os.listdir(save_dir):
                if _TEMPORARY_NAME.match(name):
                    logger.info(f"Removing {name}, a checkpoint file left half-written by an interrupted run")
                    os.remove(os.path.join(save_dir, name))

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume`` and a ``last_checkpoint`` in ``save_dir``: :meth:`load_last_complete` (model and all
        checkpointables). Otherwise the model weights of ``path`` (MODEL.WEIGHTS; "" loads nothing)."""
        if resume and self.has_checkpoint():
            return self.load_last_complete()
        return self.load(path, checkpointables=[], source="MODEL.WEIGHTS")

    def load_last_complete(self, load: Optional[Callable[[str], Any]] = None) -> Any:
        """``load(file)`` (default: :meth:`load` with every checkpointable) for the checkpoint that
        ``last_checkpoint`` names; when that file is missing or unreadable (a copy cut short, a disk error),
        for the newest earlier periodic checkpoint ``model_<iteration>.pth`` that can be read, with a warning
        naming the bad file(s). Bad files are left where they are.

        Raises:
            UnreadableCheckpointError: no checkpoint of ``save_dir`` can be read; the message lists each file
                tried and says how to go on.
        """
        if load is None:
            def load(path: str) -> Any:
                return self.load(path, source=RESUME_SOURCE)
        failures = []
        for path in self._resume_candidates():
            try:
                result = load(path)
            except UnreadableCheckpointError as e:
                failures.append(str(e))
                continue
            if failures:
                logger.warning(f"Resumed from {path} instead of the last checkpoint, which cannot be used:\n  "
                               + "\n  ".join(failures))
            return result
        raise UnreadableCheckpointError(
            f"--resume: no checkpoint in {self.save_dir} can be read:\n  " + "\n  ".join(failures) + "\n"
            "Nothing was loaded. Restore a good copy of one of these files, or start a new run: without --resume, "
            "with another OUTPUT_DIR (MODEL.WEIGHTS may name a checkpoint to start from).")

    def _resume_candidates(self) -> List[str]:
        """The file ``last_checkpoint`` names, then the periodic checkpoints of earlier iterations, newest first."""
        last = self.get_checkpoint_file()  # "" if last_checkpoint vanished meanwhile
        match = _PERIODIC_NAME.match(os.path.basename(last))
        before = int(match.group(1)) if match else float("inf")
        periodic = sorted(((int(m.group(1)), name) for name in os.listdir(self.save_dir)
                           for m in [_PERIODIC_NAME.match(name)] if m and int(m.group(1)) < before), reverse=True)
        return ([last] if last else []) + [os.path.join(self.save_dir, name) for _, name in periodic]

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
