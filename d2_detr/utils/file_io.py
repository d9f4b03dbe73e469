"""Files that are never half-written. Imports nothing of d2_detr, so every package may use it."""
import os
from typing import IO, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace the local file ``path`` with what ``write(f)`` writes to a binary file.

    The bytes go to the temporary sibling ``.<name>.<pid>.tmp`` (hidden, and never ending in the final name's
    extension, so a listing of, say, ``*.pth`` files never takes it for a finished one), are flushed to disk,
    and the file is renamed over ``path`` (atomic on POSIX and Windows). A reader, or a run killed at any
    moment, sees the old file or the complete new one; if ``write`` raises, the temporary file is removed and
    the old file is left as it was.
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
