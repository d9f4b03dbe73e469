"""Multi-head attention alone: MODEL.DETR.ATTENTION_KERNEL "sdpa" against "matmul", in float32 and under autocast.

Times the forward and backward of one :class:`d2_detr.layers.attention.FusedMultiheadAttention` (projections
included) with each kernel, alternating between the kernels every round so that both see the same machine load.
Default shapes are the attentions of the CPU quickstarts (width 128, 8 heads of 16 channels, batch 16): DETR's
encoder self-attention (64 tokens) and decoder cross-attention (12 queries, 64 keys), Deformable DETR's decoder
self-attention (30 queries) and DINO's (30 queries and 40 denoising queries, with the denoising attention mask).

Examples::

    python benchmarks/attention_kernels.py                      # the quickstarts' shapes, bfloat16 autocast on CPU
    python benchmarks/attention_kernels.py --dtype float32 --shape 900 900 --batch 2 --width 256
    python benchmarks/attention_kernels.py --repeats 3            # a smoke run in a few seconds

See benchmarks/README.md for results.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from d2_detr.layers.attention import ATTENTION_KERNELS, FusedMultiheadAttention
from d2_detr.modeling.denoising import denoising_attention_mask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quickstart_curve import cpu_name  # noqa: E402  (benchmarks/quickstart_curve.py)

# Queries of a denoising group: a positive and a negative copy of each of up to 5 objects (DINO's quickstart).
DENOISING_GROUP_SIZE = 10
# (label, queries, keys, denoising groups prepended to the queries, with their mask)
QUICKSTART_SHAPES = (
    ("DETR encoder self-attention", 64, 64, 0),
    ("DETR decoder cross-attention", 12, 64, 0),
    ("Deformable DETR decoder self-attention", 30, 30, 0),
    ("DINO decoder self-attention", 30, 30, 4),
)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_call(attn: FusedMultiheadAttention, inputs: Tuple[torch.Tensor, ...], attn_mask: Optional[torch.Tensor],
              autocast_dtype: Optional[torch.dtype]) -> float:
    """Seconds of one forward and backward of ``attn`` on ``inputs`` (query, key, value)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = attn(*inputs, attn_mask=attn_mask)
    out.float().square().sum().backward()
    return time.perf_counter() - start


def measure(queries: int, keys: int, groups: int, args: argparse.Namespace) -> Dict[str, List[float]]:
    """Per-kernel seconds of ``args.repeats`` forward-backward calls (after ``args.warmup``)."""
    torch.manual_seed(0)
    attn = FusedMultiheadAttention(args.width, args.heads)
    query = torch.randn(groups * DENOISING_GROUP_SIZE + queries, args.batch, args.width, requires_grad=True)
    if keys == queries:
        inputs = (query, query, query)
        attn_mask = denoising_attention_mask(groups, DENOISING_GROUP_SIZE, queries) if groups else None
    else:
        memory = torch.randn(keys, args.batch, args.width, requires_grad=True)
        inputs, attn_mask = (query, memory, memory), None
    samples: Dict[str, List[float]] = {kernel: [] for kernel in ATTENTION_KERNELS}
    for round_id in range(args.warmup + args.repeats):
        order = ATTENTION_KERNELS if round_id % 2 == 0 else ATTENTION_KERNELS[::-1]
        for kernel in order:
            attn.kernel = kernel
            seconds = time_call(attn, inputs, attn_mask, DTYPES[args.dtype])
            if round_id >= args.warmup:
                samples[kernel].append(seconds)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="autocast dtype on CPU, or float32 for no autocast (default: bfloat16)")
    parser.add_argument("--shape", type=int, nargs=2, metavar=("QUERIES", "KEYS"),
                        help="one shape instead of the quickstarts' (KEYS == QUERIES: self-attention)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [("--shape", *args.shape, 0)] if args.shape else QUICKSTART_SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}"
          f", {args.dtype}, batch {args.batch}, width {args.width}, {args.heads} heads, forward + backward, "
          f"median of {args.repeats} [min-max] in ms; load average {os.getloadavg()[0]:.2f}")
    print(f"{'attention':42s} {'queries':>7s} {'keys':>5s} " + " ".join(f"{k:>22s}" for k in ATTENTION_KERNELS)
          + "  matmul vs sdpa")
    for label, queries, keys, groups in shapes:
        samples = measure(queries, keys, groups, args)
        num_dn = groups * DENOISING_GROUP_SIZE
        medians = {k: statistics.median(v) for k, v in samples.items()}
        cells = " ".join(f"{medians[k] * 1e3:8.2f} [{min(v) * 1e3:5.2f}-{max(v) * 1e3:6.2f}]"
                         for k, v in samples.items())
        print(f"{label:42s} {queries + num_dn:7d} {keys + num_dn if keys == queries else keys:5d} "
              f"{cells}  {medians['sdpa'] / medians['matmul']:.2f}x")


if __name__ == "__main__":
    main()
