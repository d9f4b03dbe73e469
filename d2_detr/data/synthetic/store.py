"""Generated datasets on disk: a directory written once per set of parameters, never seen half-written.

A dataset directory is complete when its ``params.json`` holds the parameters it was generated with (and the
files a caller requires exist). Otherwise it is written into a temporary sibling directory, ``params.json``
last, which then replaces it, under an inter-process lock so that concurrent callers (training processes,
data-loader workers) generate it once. Temporary directories left by interrupted runs are removed.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no inter-process lock; the atomic rename still prevents partial datasets.
    fcntl = None

__all__ = ["PARAMS_FILE", "default_root", "generate_once", "write_canonical_json"]

logger = logging.getLogger(__name__)

PARAMS_FILE = "params.json"


def default_root() -> str:
    """Directory holding generated datasets: ``$DETECTRON2_DATASETS`` or ``datasets``."""
    return os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def write_canonical_json(path: str, obj: Any) -> None:
    """Write ``obj`` as canonical JSON (sorted keys, no whitespace), so equal objects give equal bytes."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def _is_complete(dataset_dir: str, params: Dict[str, Any], required: Sequence[str]) -> bool:
    """Whether ``dataset_dir`` holds a finished dataset generated with ``params``."""
    params_path = os.path.join(dataset_dir, PARAMS_FILE)
    if not (os.path.isfile(params_path) and all(os.path.exists(os.path.join(dataset_dir, r)) for r in required)):
        return False
    try:
        with open(params_path, encoding="utf-8") as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    """Hold an inter-process lock on ``lock_path`` (a no-op where ``fcntl`` is unavailable)."""
    with open(lock_path, "a", encoding="utf-8") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def generate_once(
    dataset_dir: str,
    params: Dict[str, Any],
    write: Callable[[str], str],
    required: Sequence[str] = (),
    description: str = "dataset",
) -> None:
    """Make sure ``dataset_dir`` holds the dataset generated with ``params`` (JSON-compatible).

    Does nothing if it already does: ``params.json`` equals ``params`` and the paths ``required`` (relative to
    the directory) exist. Otherwise, under the lock ``.<name>.lock`` next to it, ``write(tmp_dir)`` fills an
    empty temporary sibling directory and returns a summary for the log (e.g. "6 images with 12 objects"),
    ``params.json`` is written, and the temporary directory replaces ``dataset_dir``. If ``write`` raises
    (or the process is interrupted), ``dataset_dir`` is left as it was and no complete-looking directory appears.
    """
    dataset_dir = os.path.abspath(dataset_dir)
    if _is_complete(dataset_dir, params, required):
        return
    parent, base = os.path.split(dataset_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_prefix = f".{base}.tmp-"
    with _exclusive(os.path.join(parent, f".{base}.lock")):
        if _is_complete(dataset_dir, params, required):
            return
        for entry in os.listdir(parent):
            if entry.startswith(tmp_prefix):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        logger.info("Generating %s in %s", description, dataset_dir)
        start = time.perf_counter()
        tmp_dir = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
        try:
            summary = write(tmp_dir)
            write_canonical_json(os.path.join(tmp_dir, PARAMS_FILE), params)  # last: marks the dataset complete
            if os.path.lexists(dataset_dir):
                stale = tempfile.mkdtemp(prefix=tmp_prefix, dir=parent)
                os.replace(dataset_dir, os.path.join(stale, base))
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp_dir, dataset_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("Wrote %s to %s in %.1f s", summary, dataset_dir, time.perf_counter() - start)
