"""Detectron2's analysis tools on Detr: detectron2.utils.analysis.FlopCountAnalysis, d2_detr.utils.analysis (with
the attention counted) and tools/analyze_model.py."""
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis as Detectron2FlopCountAnalysis

from d2_detr.utils.analysis import FlopCountAnalysis

from .conftest import REPO_DIR, TINY_CONFIG, load_config

TOOL = os.path.join(REPO_DIR, "tools", "analyze_model.py")


@pytest.fixture(scope="module")
def tiny_model(one_thread):
    torch.manual_seed(0)
    return build_model(load_config()).eval()


def _inputs(height, width):
    return [{"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8)}]


def _module_flops(analysis, name):
    return analysis.by_module()["model." + name]  # Detectron2's TracingAdapter holds the model as "model"


def test_detectron2_flop_count_analysis_counts_detr(tiny_model):
    """Detectron2's own counter traces Detr: the backbone's convolutions scale with the image area (exactly 4x for
    twice the side, sizes being multiples of the stride), the transformer's linear layers are counted."""
    small = Detectron2FlopCountAnalysis(tiny_model, _inputs(96, 128))
    large = Detectron2FlopCountAnalysis(tiny_model, _inputs(192, 256))
    for analysis in (small, large):
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert small.total() > 0
    assert _module_flops(large, "backbone") == 4 * _module_flops(small, "backbone")
    assert _module_flops(small, "transformer") > 0
    assert large.total() > 4 * _module_flops(small, "backbone") + _module_flops(small, "transformer")


def test_attention_counted_as_its_two_matrix_products(tiny_model):
    """d2_detr's counter adds scaled_dot_product_attention, (E + Ev) multiply-adds per query-key pair and head-batch,
    to Detectron2's count and changes nothing else. Tiny config: 96x128 -> 3x4 = 12 tokens, 10 queries, width 32,
    2 encoder and 2 decoder layers."""
    inputs = _inputs(96, 128)
    ours = FlopCountAnalysis(tiny_model, inputs)
    theirs = Detectron2FlopCountAnalysis(tiny_model, inputs)
    for analysis in (ours, theirs):
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    cfg = load_config()
    width, tokens, queries = cfg.MODEL.DETR.HIDDEN_DIM, 12, cfg.MODEL.DETR.NUM_OBJECT_QUERIES
    expected = 2 * width * (cfg.MODEL.DETR.ENC_LAYERS * tokens * tokens
                            + cfg.MODEL.DETR.DEC_LAYERS * (queries * queries + queries * tokens))
    assert ours.by_operator()["scaled_dot_product_attention"] == expected
    assert "scaled_dot_product_attention" not in theirs.by_operator()
    assert ours.total() == theirs.total() + expected
    assert _module_flops(ours, "transformer") == _module_flops(theirs, "transformer") + expected


def test_deformable_sampling_counted_as_four_multiply_adds_per_bilinear_value(one_thread):
    """Deformable DETR (traced: one grid_sample per level): fvcore's rule counts every sampled value as 4
    multiply-adds, for the encoder's S tokens and the decoder's Q queries at every level, head channel and point."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO_DIR, "tests", "configs", "tiny_deformable.yaml"))
    model = build_model(cfg).eval()
    inputs = _inputs(96, 128)
    analysis = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    tokens = sum(-(-96 // stride) * -(-128 // stride) for stride in model.level_strides)
    detr, deformable = cfg.MODEL.DETR, cfg.MODEL.DEFORMABLE_DETR
    samples = (detr.ENC_LAYERS * tokens * deformable.ENC_N_POINTS
               + detr.DEC_LAYERS * detr.NUM_OBJECT_QUERIES * deformable.DEC_N_POINTS)
    assert analysis.by_operator()["grid_sampler"] == 4 * detr.HIDDEN_DIM * deformable.NUM_FEATURE_LEVELS * samples


def _run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, TOOL, "--config-file", TINY_CONFIG, *map(str, args)], cwd=REPO_DIR,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _total_gflops(output):
    match = re.search(r"Total GFlops: ([0-9.e+-]+)±\S+ over (\d+) input\(s\) of size (\S+)", output)
    assert match, output
    return float(match[1]), int(match[2]), match[3]


def test_tool_on_synthetic_inputs_reports_every_task(tiny_model):
    output = _run_tool("--tasks", "flop", "parameter", "activation", "structure", "-n", 2, "--input-size", 96, 128)
    gflops, count, size = _total_gflops(output)
    expected = FlopCountAnalysis(tiny_model, _inputs(96, 128)).uncalled_modules_warnings(False).total() / 1e9
    assert (count, size) == (2, "96x128")
    assert gflops == pytest.approx(expected, rel=1e-3)
    assert "scaled_dot_product_attention" in output
    parameters = sum(p.numel() for p in tiny_model.parameters())
    assert re.search(r"\| model\s+\| %.1fM" % (parameters / 1e6), output), output  # Parameter Count's first row
    assert "transformer.encoder.layers.0" in output
    assert "Total (Million) Activations" in output
    assert "Model Structure:" in output and "(transformer): DetrTransformer(" in output


def test_tool_counts_on_the_test_dataset(tiny_model):
    """Without --input-size: DATASETS.TEST[0]'s images, resized as at evaluation (shorter side INPUT.MIN_SIZE_TEST)."""
    gflops, count, size = _total_gflops(_run_tool("--tasks", "flop", "-n", 1))
    height, width = map(int, size.split("x"))
    assert count == 1 and min(height, width) == load_config().INPUT.MIN_SIZE_TEST
    expected = FlopCountAnalysis(tiny_model, _inputs(height, width)).uncalled_modules_warnings(False).total() / 1e9
    assert gflops == pytest.approx(expected, rel=1e-3)
