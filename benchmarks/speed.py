"""Speed of DETR: inference, training step, matcher share, peak memory and FLOPs, optionally against a commit.

Every measured version runs in its own worker process (this file with ``--worker``, with ``PYTHONPATH`` set to
that version's source tree); the parent sends one command at a time and alternates between the versions
(the order flips every round), so both see the same machine load. The reference commit's tree is exported
with ``git archive`` into a temporary folder: the repository and its working tree are not touched.

Both versions run with the same weights (the current version's random initialisation, its frozen BatchNorms
calibrated on a random image so that activations have a trained network's scale and folding them is exercised;
saved, then loaded into the reference) and the same inputs; the script reports how far their outputs differ.
Each worker applies its version's process set-up as ``tools/train_net.py`` does (glibc malloc keeping freed
memory, ``d2_detr.engine.allocator``, where the version has it; the override ``KEEP_FREED_MEMORY False`` measures
without it).

Examples::

    python benchmarks/speed.py --ref-commit HEAD                      # R-50 at 800x1066 on CPU, vs HEAD
    python benchmarks/speed.py --ref-commit abc1234 --json speed.json --device cuda
    python benchmarks/speed.py --config-file tests/configs/tiny.yaml --size 96 128   # a quick smoke run
    python benchmarks/speed.py --ref-commit HEAD MODEL.DETR.CHANNELS_LAST False      # KEY VALUE overrides

See benchmarks/README.md for the columns.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Published GFLOPs of one image by meta-architecture: DETR R-50 (the paper's Table 1, averaged over COCO val
# images), Deformable DETR R-50 (its paper's Table 1) and DINO-4scale R-50 (its paper's Table 1).
PUBLISHED_GFLOPS = {"Detr": ("DETR R-50", 86.0), "DeformableDetr": ("Deformable DETR R-50", 173.0),
                    "Dino": ("DINO-4scale R-50", 279.0)}
# Profiler label of the deformable attention's sampling (forward), and the autograd nodes of its backward.
SAMPLING_LABEL = "deformable_sampling"
SAMPLING_BACKWARD = ("GridSampler2DBackward0", "_BilinearBagSumBackward")


# ----------------------------------------------------------------------------------------------- worker side


def _peak_memory_reset(device: str) -> None:
    """Start a new peak-memory window: CUDA's max allocated, or the process's peak RSS (Linux clear_refs)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size


def _peak_memory_gb(device: str) -> float:
    """Peak memory since the last reset: CUDA max allocated, else the peak RSS (VmHWM), in GB."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Worker:
    """One version of d2_detr (whatever ``import d2_detr`` finds) answering the parent's commands."""

    def __init__(self) -> None:
        self.model = None
        self.optimizer = None
        self.device = "cpu"
        self.matcher_seconds = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    # -- set-up ----------------------------------------------------------------------------------------------

    def setup(self, config: str, opts: List[str], device: str, threads: int, weights_in: Optional[str],
              weights_out: Optional[str]) -> Dict[str, Any]:
        import torch
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        import d2_detr
        from d2_detr import add_detr_config

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = device
        cfg = get_cfg()
        add_detr_config(cfg)
        cfg.merge_from_file(config)
        applied, ignored = [], []
        for key, value in zip(opts[0::2], opts[1::2]):
            *parents, leaf = key.split(".")
            node = cfg
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or leaf not in node:
                ignored.append(key)  # a key this version does not have
                continue
            cfg.merge_from_list([key, value])
            applied.append(key)
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = device
        freed_memory_kept = self._process_setup(cfg)
        torch.manual_seed(0)
        model = build_model(cfg)
        if weights_in:
            model.load_state_dict(torch.load(weights_in, map_location=device))
        else:
            model.load_state_dict(self._calibrated_state(cfg))
        if weights_out:
            torch.save(model.state_dict(), weights_out)
        self.model = model
        self.cfg = cfg
        self.optimizer = self._build_optimizer(cfg, model)
        self._wrap_matcher(model)
        self._label_sampling()
        return {
            "d2_detr": os.path.dirname(os.path.abspath(d2_detr.__file__)),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "applied_opts": applied,
            "ignored_opts": ignored,
            "freed_memory_kept": freed_memory_kept,
            "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        }

    @staticmethod
    def _process_setup(cfg) -> bool:
        """The process set-up tools/train_net.py applies (glibc malloc keeping freed memory), as this version
        does it; returns whether freed memory is kept."""
        try:
            from d2_detr.engine.allocator import setup_malloc
        except ImportError:  # older versions: unconditional, or absent
            try:
                from d2_detr.engine.allocator import keep_freed_memory
            except ImportError:
                return False
            return keep_freed_memory()
        return setup_malloc(cfg)

    @staticmethod
    def _calibrated_state(cfg) -> Dict[str, Any]:
        """Random weights whose frozen BatchNorms hold the statistics of their inputs (on a random image) and a
        random affine map, so that activations stay of order 1 as in a trained network: a fresh frozen BN is the
        identity, which leaves a random ResNet's features so large that attention saturates and gradients
        become ill-conditioned (not comparable between implementations)."""
        import torch
        from detectron2.layers import FrozenBatchNorm2d
        from detectron2.modeling import build_model

        cfg = cfg.clone()
        if "FOLD_FROZEN_BN" in cfg.MODEL.DETR:
            cfg.MODEL.DETR.FOLD_FROZEN_BN = False  # the norms must run as modules to see their inputs
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        g = torch.Generator().manual_seed(0)

        def calibrate(module, inputs):
            x = inputs[0]  # (B, C, H, W)
            n = x.shape[1]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)))
            module.weight.copy_(torch.rand(n, generator=g).to(x) * 0.5 + 0.5)
            module.bias.copy_(torch.randn(n, generator=g).to(x) * 0.1)

        hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        with torch.no_grad():
            images = model.preprocess_image(Worker._images(1, (256, 320), seed=0))
            model.backbone(images.tensor)
        for hook in hooks:
            hook.remove()
        return model.state_dict()

    @staticmethod
    def _build_optimizer(cfg, model):
        """The project's optimizer (AdamW, backbone LR multiplier, full-model gradient clipping) if it has one."""
        import torch

        try:
            from d2_detr.engine.optimizer import build_detr_optimizer
        except ImportError:
            params = [p for p in model.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return build_detr_optimizer(cfg, model)

    def _wrap_matcher(self, model) -> None:
        """Accumulate the wall time spent in the matcher (``match_layers`` and ``forward``) of the criterion."""
        matcher = model.criterion.matcher
        for name in ("match_layers", "forward"):
            method = getattr(matcher, name, None)
            if method is not None:
                setattr(matcher, name, self._timed(method))

    @staticmethod
    def _label_sampling() -> None:
        """Run the deformable attention's sampling under a profiler label, where this version has it."""
        import torch

        try:
            from d2_detr.layers import deformable_attention
        except ImportError:
            return
        sample = deformable_attention.multi_scale_deformable_attention

        def labelled(*args, **kwargs):
            with torch.profiler.record_function(SAMPLING_LABEL):
                return sample(*args, **kwargs)

        deformable_attention.multi_scale_deformable_attention = labelled

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.matcher_seconds += time.perf_counter() - start

        return timed

    # -- inputs ----------------------------------------------------------------------------------------------

    @staticmethod
    def _images(batch: int, size: Tuple[int, int], seed: int) -> List[Dict[str, Any]]:
        import torch

        g = torch.Generator().manual_seed(seed)
        return [{"image": torch.rand(3, *size, generator=g) * 255} for _ in range(batch)]

    @staticmethod
    def _training_batch(batch: int, size: Tuple[int, int], num_classes: int, seed: int) -> List[Dict[str, Any]]:
        import torch
        from detectron2.structures import Boxes, Instances

        g = torch.Generator().manual_seed(seed)
        h, w = size
        inputs = []
        for _ in range(batch):
            n = int(torch.randint(3, 12, (), generator=g))
            xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
            wh = (torch.rand(n, 2, generator=g) * 0.3 + 0.02) * torch.tensor([w, h])
            instances = Instances(size)
            instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            instances.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
            inputs.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": instances})
        return inputs

    # -- measurements ----------------------------------------------------------------------------------------

    def infer(self, batch: int, size: Tuple[int, int]) -> Dict[str, float]:
        """One timed inference call of ``batch`` images (the model's eval-mode forward, as an evaluator calls it)."""
        import torch

        model = self.model.eval()
        inputs = self._images(batch, size, seed=1)
        _peak_memory_reset(self.device)
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            model(inputs)
        self._sync()
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
                "peak_gb": _peak_memory_gb(self.device)}

    def train(self, batch: int, size: Tuple[int, int]) -> Dict[str, float]:
        """One timed training step: forward (with matching and losses), backward, optimizer step; the forward under
        autocast when the config's SOLVER.AMP.ENABLED says so, as in tools/train_net.py."""
        import torch
        from detectron2.utils.events import EventStorage

        from d2_detr.engine.train_loop import amp_dtype

        device_type = torch.device(self.device).type
        amp = self.cfg.SOLVER.AMP
        autocast = torch.autocast(device_type, dtype=amp_dtype(amp.DTYPE, device_type), enabled=amp.ENABLED)
        model = self.model.train()
        inputs = self._training_batch(batch, size, self.cfg.MODEL.DETR.NUM_CLASSES, seed=2)
        self.optimizer.zero_grad(set_to_none=True)
        self.matcher_seconds = 0.0
        _peak_memory_reset(self.device)
        with EventStorage():
            self._sync()
            t0, cpu_start = time.perf_counter(), time.process_time()
            with autocast:
                losses = model(inputs)
            total = sum(losses.values())
            self._sync()
            t1 = time.perf_counter()
            total.backward()
            self._sync()
            t2 = time.perf_counter()
            self.optimizer.step()
            self._sync()
            t3 = time.perf_counter()
        return {"seconds": t3 - t0, "cpu_seconds": time.process_time() - cpu_start, "forward": t1 - t0,
                "matcher": self.matcher_seconds, "backward": t2 - t1, "optimizer": t3 - t2,
                "peak_gb": _peak_memory_gb(self.device)}

    def outputs(self, size: Tuple[int, int], path: str) -> Dict[str, Any]:
        """Save what the comparison looks at: raw eval outputs and detections of one image, and the losses and
        gradient norm of one training step (seeded dropout) from the loaded weights, before any update."""
        import torch
        from detectron2.utils.events import EventStorage

        model = self.model
        inputs = self._images(1, size, seed=3)
        model.eval()
        with torch.no_grad():
            raw = model.predict(model.preprocess_image(inputs))
            instances = model(inputs)[0]["instances"].to("cpu")
        result = {"pred_logits": raw["pred_logits"].cpu(), "pred_boxes": raw["pred_boxes"].cpu(),
                  "scores": instances.scores, "boxes": instances.pred_boxes.tensor}
        model.train()
        model.zero_grad(set_to_none=True)
        batch = self._training_batch(2, size, self.cfg.MODEL.DETR.NUM_CLASSES, seed=4)
        torch.manual_seed(5)
        with EventStorage():
            losses = model(batch)
        sum(losses.values()).backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        result["losses"] = {k: float(v.detach()) for k, v in losses.items()}
        result["grad_norm"] = float(torch.cat(grads).norm())
        model.zero_grad(set_to_none=True)
        torch.save(result, path)
        return {"saved": path}

    def flops(self, size: Tuple[int, int]) -> Dict[str, float]:
        """fvcore's count of one image's inference (one multiply-add = one flop, as in the DETR paper), in
        GFLOPs: the total and its share per top-level module. Attention through ``scaled_dot_product_attention``
        is counted as its two matrix products."""
        import torch
        from fvcore.nn import FlopCountAnalysis

        model = self.model.eval()
        images = model.preprocess_image(self._images(1, size, seed=1))

        class Predict(torch.nn.Module):
            def __init__(self, detr):
                super().__init__()
                self.detr = detr

            def forward(self, pixels):
                from detectron2.structures import ImageList

                out = self.detr.predict(ImageList(pixels, images.image_sizes))
                return out["pred_logits"], out["pred_boxes"]

        def sdpa_flops(inputs, outputs):
            q, k = (i.type().sizes() for i in inputs[:2])  # (B, h, L, hd), (B, h, S, hd)
            batch_heads = q[0] * q[1]
            return batch_heads * q[2] * k[2] * q[3] * 2  # QK^T and (attention)V

        with torch.no_grad():
            analysis = FlopCountAnalysis(Predict(model), (images.tensor,))
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = analysis.by_module()
            total = analysis.total()
        parts = {name.split(".", 1)[1]: count / 1e9 for name, count in by_module.items()
                 if name.count(".") == 1 and count}
        return {"total": total / 1e9, "by_module": parts}

    def _profiled(self, kind: str, batch: int, size: Tuple[int, int]):
        """torch.profiler's record (CPU, and CUDA on a GPU) of one ``infer`` or ``train`` call."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
        run = self.infer if kind == "infer" else self.train
        with profile(activities=activities) as prof:
            run(batch, size)
        return prof

    def profile(self, kind: str, batch: int, size: Tuple[int, int], rows: int) -> Dict[str, str]:
        """torch.profiler's operator table (self time) of one inference or training step."""
        sort = "self_cuda_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        return {"table": self._profiled(kind, batch, size).key_averages().table(sort_by=sort, row_limit=rows)}

    def sampling_share(self, kind: str, batch: int, size: Tuple[int, int]) -> Dict[str, float]:
        """Share (%) of one profiled inference or training call's CPU time spent in the deformable attention's
        sampling: its forward (the labelled calls) and, in training, its backward nodes; 0 for a model without it."""
        events = self._profiled(kind, batch, size).key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        sampling = sum(e.cpu_time_total for e in events if e.key == SAMPLING_LABEL or e.key in SAMPLING_BACKWARD)
        return {"percent": 100.0 * sampling / total if total else 0.0}


def worker_main() -> None:
    """Serve JSON-line commands from stdin; all other output of the process goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("command")
        if command == "quit":
            break
        try:
            reply = {"ok": getattr(worker, command)(**request)}
        except Exception as e:  # reported to the parent, which stops
            import traceback

            reply = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


# ----------------------------------------------------------------------------------------------- parent side


class Version:
    """A worker process running the d2_detr found under ``root``."""

    def __init__(self, name: str, root: str, label: str) -> None:
        self.name, self.root, self.label = name, root, label
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"], cwd=root, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def call(self, command: str, **kwargs) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps({"command": command, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (see its output above)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}\n{reply['traceback']}")
        return reply["ok"]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.write(json.dumps({"command": "quit"}) + "\n")
            self.process.stdin.close()
        self.process.wait(timeout=60)


@contextlib.contextmanager
def exported_commit(commit: str) -> Iterator[Tuple[str, str]]:
    """``(tree, sha)``: the files of ``commit`` exported into a temporary folder, removed afterwards."""
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix=f"d2_detr_{sha[:8]}_")
    try:
        archive = subprocess.Popen(["git", "-C", REPO, "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tmp], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")
        yield tmp, sha
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def config_for(root: str, config: str) -> str:
    """A version's own copy of a config that lies inside this repository, else the given file."""
    path = os.path.abspath(config)
    if path.startswith(REPO + os.sep):
        own = os.path.join(root, os.path.relpath(path, REPO))
        if os.path.exists(own):
            return own
    return path


def interleaved(versions: Sequence[Version], warmup: int, repeats: int, command: str,
                **kwargs) -> Dict[str, List[Dict[str, float]]]:
    """``warmup`` untimed then ``repeats`` timed calls per version, alternating versions, order flipped every
    round so that neither always runs first."""
    samples: Dict[str, List[Dict[str, float]]] = {v.name: [] for v in versions}
    for round_id in range(warmup + repeats):
        order = versions if round_id % 2 == 0 else list(reversed(versions))
        for version in order:
            result = version.call(command, **kwargs)
            if round_id >= warmup:
                samples[version.name].append(result)
            print(f"  {command} {kwargs.get('batch', '')} {version.name}: {result['seconds']:.3f} s"
                  + (" (warm-up)" if round_id < warmup else ""), file=sys.stderr, flush=True)
    return samples


def _median(samples: List[Dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def _min(samples: List[Dict[str, float]], key: str) -> float:
    return min(s[key] for s in samples)


def summarize(results: Dict[str, Any], names: List[str]) -> List[Tuple[str, List[str], str]]:
    """Table rows ``(metric, one cell per version, speed-up of the last version over the first)``."""
    rows = []

    def add(metric: str, values: List[float], fmt: str, higher_is_better: bool = False, ratio: bool = True):
        cells = [fmt.format(v) for v in values]
        speedup = ""
        if ratio and len(values) > 1 and values[0] > 0 and values[-1] > 0:
            speedup = f"{(values[-1] / values[0] if higher_is_better else values[0] / values[-1]):.2f}x"
        rows.append((metric, cells, speedup))

    for key, samples in results.get("infer", {}).items():
        batch = int(key)
        med = [_median(samples[n], "seconds") for n in names]
        add(f"inference b{batch}: latency median (s)", med, "{:.3f}")
        add(f"inference b{batch}: latency min (s)", [_min(samples[n], "seconds") for n in names], "{:.3f}")
        add(f"inference b{batch}: images/s (median)", [batch / m for m in med], "{:.3f}", higher_is_better=True)
        add(f"inference b{batch}: CPU time median (s)", [_median(samples[n], "cpu_seconds") for n in names],
            "{:.2f}")
        add(f"inference b{batch}: peak memory (GB)", [max(s["peak_gb"] for s in samples[n]) for n in names],
            "{:.2f}", ratio=False)
    train = results.get("train")
    if train:
        add("train step: median (s)", [_median(train[n], "seconds") for n in names], "{:.2f}")
        add("train step: min (s)", [_min(train[n], "seconds") for n in names], "{:.2f}")
        for phase in ("forward", "matcher", "backward", "optimizer"):
            label = "forward+matching+loss" if phase == "forward" else phase
            add(f"  {label} median (s)", [_median(train[n], phase) for n in names], "{:.3f}")
        add("  matcher share of step (median, %)",
            [100 * statistics.median(s["matcher"] / s["seconds"] for s in train[n]) for n in names], "{:.2f}",
            ratio=False)
        add("train step: CPU time median (s)", [_median(train[n], "cpu_seconds") for n in names], "{:.2f}")
        add("train step: peak memory (GB)", [max(s["peak_gb"] for s in train[n]) for n in names], "{:.2f}",
            ratio=False)
    for kind, shares in results.get("sampling_share", {}).items():
        add(f"deformable sampling share of one {'inference' if kind == 'infer' else 'train step'} (profiled, %)",
            [shares[n] for n in names], "{:.1f}", ratio=False)
    flops = results.get("flops")
    if flops:
        add("GFLOPs per image (fvcore)", [flops[n]["total"] for n in names], "{:.2f}", ratio=False)
        modules = sorted({m for n in names for m in flops[n]["by_module"]})
        for module in modules:
            add(f"  {module}", [flops[n]["by_module"].get(module, 0.0) for n in names], "{:.2f}", ratio=False)
    return rows


def print_table(rows: List[Tuple[str, List[str], str]], headers: List[str]) -> None:
    widths = [max(len(r[0]) for r in rows + [("metric", [], "")])]
    widths += [max([len(h)] + [len(r[1][i]) for r in rows]) for i, h in enumerate(headers)]
    show_speedup = len(headers) > 1
    line = "metric".ljust(widths[0]) + "".join("  " + h.rjust(w) for h, w in zip(headers, widths[1:]))
    print(line + ("  speed-up" if show_speedup else ""))
    for metric, cells, speedup in rows:
        out = metric.ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(cells, widths[1:]))
        print(out + (f"  {speedup:>8}" if show_speedup else ""))


def compare_outputs(paths: Dict[str, str], names: List[str]) -> Dict[str, float]:
    """Largest absolute differences between the first version's outputs and the last one's."""
    import torch

    first, last = (torch.load(paths[n]) for n in (names[0], names[-1]))
    diffs = {k: float((first[k] - last[k]).abs().max()) for k in ("pred_logits", "pred_boxes", "scores", "boxes")}
    common = sorted(set(first["losses"]) & set(last["losses"]))
    diffs["losses"] = max(abs(first["losses"][k] - last["losses"][k]) for k in common) if common else float("nan")
    diffs["grad_norm_relative"] = abs(first["grad_norm"] - last["grad_norm"]) / max(first["grad_norm"], 1e-12)
    return diffs


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs", "detr_r50.yaml"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one device)")
    parser.add_argument("--ref-commit", default="", help="also measure this commit, interleaved with the working tree")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1066), metavar=("H", "W"))
    parser.add_argument("--infer-batches", type=int, nargs="*", default=(1, 4))
    parser.add_argument("--train-batch", type=int, default=2, help="training images per step (0: no training)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--no-flops", action="store_true", help="skip fvcore's FLOP count")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print torch.profiler's top ROWS operators of the working tree's inference "
                             "(first batch size) and training step")
    parser.add_argument("--json", default="", help="also write every sample and the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return
    size = tuple(args.size)
    with contextlib.ExitStack() as stack:
        trees = []
        if args.ref_commit:
            tree, sha = stack.enter_context(exported_commit(args.ref_commit))
            trees.append(("ref", tree, f"ref {sha[:8]}"))
        trees.append(("current", REPO, "working tree"))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="d2_detr_speed_"))
        versions = [Version(name, root, label) for name, root, label in trees]
        stack.callback(lambda: [v.close() for v in versions])
        names = [v.name for v in versions]
        current = versions[-1]
        weights = os.path.join(tmp, "weights.pth")
        load_before = os.getloadavg()
        info = {}
        for version in [current] + versions[:-1]:  # the current version initialises the shared weights
            info[version.name] = version.call(
                "setup", config=config_for(version.root, args.config_file), opts=list(args.opts),
                device=args.device, threads=args.threads,
                weights_in=None if version is current else weights,
                weights_out=weights if version is current else None,
            )
            print(f"{version.label}: d2_detr from {info[version.name]['d2_detr']}, "
                  f"{info[version.name]['threads']} threads, ignored overrides: "
                  f"{info[version.name]['ignored_opts'] or 'none'}, glibc malloc keeps freed memory "
                  f"(d2_detr.engine.allocator): {info[version.name]['freed_memory_kept']}", file=sys.stderr, flush=True)
        results: Dict[str, Any] = {"infer": {}}
        diffs = None
        if len(versions) > 1:
            paths = {v.name: os.path.join(tmp, f"outputs_{v.name}.pt") for v in versions}
            for v in versions:
                v.call("outputs", size=size, path=paths[v.name])
            diffs = compare_outputs(paths, names)
        for batch in args.infer_batches:
            results["infer"][str(batch)] = interleaved(versions, args.warmup, args.repeats, "infer",
                                                       batch=batch, size=size)
        if args.train_batch > 0:
            results["train"] = interleaved(versions, args.warmup, args.repeats, "train",
                                           batch=args.train_batch, size=size)
        if not args.no_flops:
            results["flops"] = {v.name: v.call("flops", size=size) for v in versions}
        if info[current.name]["meta_architecture"] != "Detr":
            results["sampling_share"] = {
                kind: {v.name: v.call("sampling_share", kind=kind, batch=batch, size=size)["percent"] for v in versions}
                for kind, batch in (("infer", (args.infer_batches or [1])[0]), ("train", args.train_batch)) if batch}
        profiles = {}
        if args.profile:
            if args.infer_batches:
                profiles["infer"] = current.call("profile", kind="infer", batch=args.infer_batches[0], size=size,
                                                 rows=args.profile)["table"]
            if args.train_batch > 0:
                profiles["train"] = current.call("profile", kind="train", batch=args.train_batch, size=size,
                                                 rows=args.profile)["table"]
        load_after = os.getloadavg()

    headers = [v.label for v in versions]
    rows = summarize(results, names)
    print(f"\nconfig {os.path.relpath(os.path.abspath(args.config_file), REPO)}, device {args.device}, "
          f"images {size[0]}x{size[1]}, warm-up {args.warmup}, repeats {args.repeats}, "
          f"torch {info[names[-1]]['torch']}, {info[names[-1]]['threads']} threads, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after")
    print_table(rows, headers)
    if diffs is not None:
        print("outputs, max |ref - current|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    published = PUBLISHED_GFLOPS.get(info[names[-1]].get("meta_architecture", "Detr"))
    if results.get("flops") and published:
        print(f"published {published[0]}: {published[1]:.0f} GFLOPs")
    for kind, table in profiles.items():
        print(f"\nprofile of one {kind} call (working tree):\n{table}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": {v.name: {"label": v.label, **info[v.name]} for v in versions},
                       "load_average": {"before": load_before, "after": load_after}, "results": results,
                       "output_diffs": diffs, "table": [[m, *c, s] for m, c, s in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
