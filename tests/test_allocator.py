"""keep_freed_memory (d2_detr.engine.allocator): freed large buffers are reused instead of faulted in again."""
import json
import os
import subprocess
import sys

import pytest

from d2_detr.engine.allocator import ENV_SWITCH

# Allocate, touch and free a 256 MB buffer 6 times; report the page faults of the last 4 rounds (the heap
# grows during the first two).
_PROGRAM = """
import json, resource, sys
import torch
from d2_detr.engine.allocator import keep_freed_memory
applied = keep_freed_memory()
torch.ones(64 * 2**20)
torch.ones(64 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(64 * 2**20)  # 256 MB, written then freed
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(switch: str) -> dict:
    env = dict(os.environ, **{ENV_SWITCH: switch}, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc malloc setting")
def test_freed_buffers_are_reused_without_page_faults():
    default, kept = _run("0"), _run("1")
    assert not default["applied"] and kept["applied"]
    pages = 4 * 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > pages // 2  # glibc unmapped each buffer: its pages were faulted in again
    assert kept["faults"] < pages // 20  # the heap kept the buffer: almost no new faults
