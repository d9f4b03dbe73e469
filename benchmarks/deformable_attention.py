"""Speed of the multi-scale deformable attention sampling at Deformable DETR R-50 scale, both implementations.

Times :func:`sample_by_grid` (one ``grid_sample`` per level, the layout of the original pure-PyTorch code) and
:func:`sample_by_bags` (one weighted ``embedding_bag``, what the layer uses on CPU) on the same inputs in the
same run, interleaved, forward alone and forward + backward (gradients for value, sampling locations and
attention weights); measures the memory they keep for the backward and checks that they agree. Default
sizes: an 800 x 1066 image, levels 100x134, 50x67, 25x34, 13x17 (S = 17,821 cells), 8 heads, 4 levels,
4 points, 32 channels per head; the encoder (Q = S) and the decoder (Q = 300), batch 1 and 2.

    python benchmarks/deformable_attention.py
    python benchmarks/deformable_attention.py --threads 1 --repeats 7 --batch 2 --queries encoder
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2_detr.engine.allocator import keep_freed_memory  # noqa: E402
from d2_detr.layers.deformable_attention import sample_by_bags, sample_by_grid  # noqa: E402

LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]
IMPLEMENTATIONS: Dict[str, Callable] = {"grid": sample_by_grid, "bags": sample_by_bags}


def make_inputs(batch: int, queries: int, heads: int, points: int, head_dim: int, seed: int = 0):
    """Random value, locations spread over (and a little beyond) every level, softmaxed weights."""
    g = torch.Generator().manual_seed(seed)
    total = sum(h * w for h, w in LEVELS)
    value = torch.randn(batch, total, heads, head_dim, generator=g)
    locations = torch.rand(batch, queries, heads, len(LEVELS), points, 2, generator=g) * 1.1 - 0.05
    weights = torch.randn(batch, queries, heads, len(LEVELS) * points, generator=g).softmax(-1)
    return value, locations, weights.view(batch, queries, heads, len(LEVELS), points)


def run_once(fn: Callable, inputs, backward: bool) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward, or forward + backward."""
    value, locations, weights = (t.detach().requires_grad_(backward) for t in inputs)
    wall, cpu = time.perf_counter(), time.process_time()
    if backward:
        out = fn(value, LEVELS, locations, weights)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(value, LEVELS, locations, weights)
    return time.perf_counter() - wall, time.process_time() - cpu


def saved_for_backward_mb(fn: Callable, inputs) -> float:
    """Megabytes of the tensors autograd keeps for the backward, each storage counted once (``value`` too when
    kept: in the layer it is the value projection's output, kept alive only by the sampling)."""
    value, locations, weights = (t.detach().requires_grad_(True) for t in inputs)
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(value, LEVELS, locations, weights)
    return sum(storages.values()) / 2**20


def agreement(inputs) -> Dict[str, float]:
    """Largest differences between the implementations' outputs and gradients (fp32). Location gradients jump
    where a point crosses a pixel centre, and the two round a coordinate differently: reported as the share of
    location-gradient elements that differ by more than 1e-3 relative to the largest."""
    results = []
    for fn in IMPLEMENTATIONS.values():
        value, locations, weights = (t.detach().requires_grad_(True) for t in inputs)
        out = fn(value, LEVELS, locations, weights)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), value.grad, locations.grad, weights.grad))
    (out_a, gv_a, gl_a, gw_a), (out_b, gv_b, gl_b, gw_b) = results
    scale = gl_a.abs().max()
    return {
        "output": (out_a - out_b).abs().max().item(),
        "grad value": (gv_a - gv_b).abs().max().item(),
        "grad weights": (gw_a - gw_b).abs().max().item(),
        "grad locations, share off": ((gl_a - gl_b).abs() > 1e-3 * scale).double().mean().item(),
    }


def fmt(times: List[float]) -> str:
    return f"{statistics.median(times) * 1000:7.0f} ({min(times) * 1000:.0f}-{max(times) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queries", nargs="+", default=["encoder", "300"],
                        help="query counts; 'encoder' is S (every cell of every level)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as training does (tools/train_net.py)
    total = sum(h * w for h, w in LEVELS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, levels {LEVELS} (S = {total}), "
          f"{args.heads} heads, {args.points} points, head dim {args.head_dim}, {args.repeats} repeats, freed memory "
          f"kept: {kept}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("times in ms: median (min-max); wall clock, and process CPU time (all threads)")
    header = f"{'batch':>5} {'queries':>7} {'pass':>8} {'impl':>5} {'wall ms':>20} {'cpu ms':>20} {'speed-up':>8}"
    print(header)
    for batch in args.batch:
        for q in args.queries:
            queries = total if q == "encoder" else int(q)
            inputs = make_inputs(batch, queries, args.heads, args.points, args.head_dim)
            for backward in (False, True):
                times: Dict[str, Tuple[List[float], List[float]]] = {name: ([], []) for name in IMPLEMENTATIONS}
                for name, fn in IMPLEMENTATIONS.items():
                    run_once(fn, inputs, backward)  # warm-up
                for _ in range(args.repeats):  # interleaved, so that both see the same machine load
                    for name, fn in IMPLEMENTATIONS.items():
                        wall, cpu = run_once(fn, inputs, backward)
                        times[name][0].append(wall)
                        times[name][1].append(cpu)
                reference = statistics.median(times["grid"][0])
                for name, (wall, cpu) in times.items():
                    speedup = reference / statistics.median(wall)
                    print(f"{batch:>5} {queries:>7} {'fwd+bwd' if backward else 'fwd':>8} {name:>5} {fmt(wall):>20} "
                          f"{fmt(cpu):>20} {speedup:>7.2f}x", flush=True)
            saved = ", ".join(f"{name} {saved_for_backward_mb(fn, inputs):.0f}" for name, fn in IMPLEMENTATIONS.items())
            print(f"      kept for backward (MB): {saved}")
            diffs = agreement(inputs)
            print("      agreement: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()), flush=True)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
