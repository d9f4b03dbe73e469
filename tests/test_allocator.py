"""d2_detr.engine.allocator: the glibc malloc settings are made exactly where the switch and the device say."""
import os
import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from d2_detr.engine import allocator, train_net
from tests.conftest import TINY_CONFIG, load_config


class FakeLibc:
    """A C library that records ``mallopt`` calls; ``glibc`` False models musl (no ``gnu_get_libc_version``)."""

    def __init__(self, glibc: bool = True, accepts: bool = True) -> None:
        self.calls = []

        def mallopt(param, value):
            self.calls.append((param, value))
            return int(accepts)

        self.mallopt = _Function(mallopt)
        if glibc:
            self.gnu_get_libc_version = _Function(lambda: b"2.99")


class _Function:
    """A ctypes-function stand-in: callable, with settable argtypes/restype."""

    def __init__(self, fn) -> None:
        self.fn, self.argtypes, self.restype = fn, None, None

    def __call__(self, *args):
        return self.fn(*args)


@pytest.fixture
def fake_libc(monkeypatch):
    """A function that makes a FakeLibc what ``ctypes.CDLL`` loads, on "linux", and returns it."""

    def install(**kwargs) -> FakeLibc:
        lib = FakeLibc(**kwargs)
        monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: lib)
        monkeypatch.setattr(allocator.sys, "platform", "linux")
        return lib

    return install


EXPECTED_CALLS = [(allocator.M_MMAP_MAX, 0), (allocator.M_TRIM_THRESHOLD, 2**31 - 1)]


def test_keep_freed_memory_calls_mallopt_under_glibc(fake_libc):
    lib = fake_libc()
    assert allocator.keep_freed_memory()
    assert lib.calls == EXPECTED_CALLS


def test_keep_freed_memory_is_a_no_op_off_glibc(fake_libc, monkeypatch):
    musl = fake_libc(glibc=False)
    assert not allocator.keep_freed_memory()
    assert musl.calls == []  # musl has mallopt, but it must not be called
    refused = fake_libc(accepts=False)
    assert not allocator.keep_freed_memory()  # glibc refused the first setting: reported, second not tried
    assert refused.calls == EXPECTED_CALLS[:1]
    linux = fake_libc()
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert not allocator.keep_freed_memory()
    assert linux.calls == []

    def no_libc(name):
        raise OSError("no C library")

    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert not allocator.keep_freed_memory()


@pytest.mark.parametrize("switch, device, applied", [
    (True, "cpu", True), (False, "cpu", False), (True, "cuda", False), (True, "cuda:1", False)])
def test_setup_malloc_follows_the_switch_and_device(fake_libc, switch, device, applied):
    lib = fake_libc()
    cfg = load_config(TINY_CONFIG, "KEEP_FREED_MEMORY", switch, "MODEL.DEVICE", device)
    assert allocator.setup_malloc(cfg) is applied
    assert lib.calls == (EXPECTED_CALLS if applied else [])


def test_default_is_on_for_cpu(fake_libc):
    lib = fake_libc()
    assert allocator.setup_malloc(load_config(TINY_CONFIG))
    assert lib.calls == EXPECTED_CALLS


def test_train_net_main_applies_the_setting_of_its_config(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def trainer(cfg):
        raise Stop

    cfg = load_config(TINY_CONFIG, "KEEP_FREED_MEMORY", False)
    monkeypatch.setattr(train_net, "setup", lambda args: cfg)
    monkeypatch.setattr(train_net, "setup_malloc", lambda c: seen.append(c))
    monkeypatch.setattr(train_net, "DetrTrainer", trainer)
    with pytest.raises(Stop):
        train_net.main(SimpleNamespace(eval_only=False, resume=False))
    assert seen == [cfg]  # before anything is built


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_real_glibc_accepts_both_settings():
    """In a fresh process (the setting is process-wide), the real mallopt takes both values."""
    program = "from d2_detr.engine.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"
