"""d2_detr.utils.file_io: atomic writes."""
import os

import pytest

from d2_detr.utils.file_io import atomic_write


def test_atomic_write_creates_and_replaces(tmp_path):
    path = str(tmp_path / "file.bin")
    atomic_write(path, lambda f: f.write(b"first"))
    atomic_write(path, lambda f: f.write(b"second"))
    assert (tmp_path / "file.bin").read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["file.bin"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    path = str(tmp_path / "file.bin")
    atomic_write(path, lambda f: f.write(b"complete"))
    seen = []

    def fail_half_way(f):
        f.write(b"half")
        f.flush()
        seen.extend(os.listdir(tmp_path))
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, fail_half_way)
    assert sorted(seen) == sorted(["file.bin", f".file.bin.{os.getpid()}.tmp"])  # written beside, not over it
    assert (tmp_path / "file.bin").read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["file.bin"]
