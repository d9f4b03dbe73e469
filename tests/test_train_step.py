"""The training step: gradient accumulation equals one big batch; mixed precision trains without NaN."""
import numpy as np
import pytest
import torch
from detectron2.utils.events import EventStorage

from d2_detr.engine import DetrTrainer, amp_dtype, micro_batch_size
from d2_detr.modeling.criterion import SetCriterion

from .conftest import TINY_CONFIG, load_config
from .step_helpers import SGD_OPTS, ClipRecorder, assert_same_step, fixed_inputs, initial_params, one_step


@pytest.fixture(scope="module")
def inputs():
    return fixed_inputs(4)


@pytest.mark.parametrize("clip", ["off", "full_model"])
def test_accumulating_2x2_equals_one_step_on_4(inputs, clip):
    """DETR's normalisers (target boxes, class weights) count the whole step, and full-model clipping acts
    once on the accumulated gradient: clipping each micro-batch, or normalising per micro-batch, differs."""
    opts = list(SGD_OPTS)
    if clip == "full_model":  # the recipe's clipping, at a norm the gradient exceeds
        opts += ["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5,
                 "SOLVER.BASE_LR", 0.5]
    reference = one_step(opts, [inputs])
    accumulated = one_step(opts, [inputs[:2], inputs[2:]])
    assert_same_step(accumulated, reference, initial_params(opts))


def test_accumulation_without_normaliser_averages_micro_batches(inputs, monkeypatch):
    """A criterion without ``normalize_over``: each micro-batch's loss is divided by the number of them."""
    monkeypatch.delattr(SetCriterion, "normalize_over")
    opts = [*SGD_OPTS, "MODEL.DETR.DEEP_SUPERVISION", False]
    same_images = [inputs[:2], inputs[:2]]  # averaging two identical micro-batches = one of them
    assert_same_step(one_step(opts, same_images), one_step(opts, [inputs[:2]]), initial_params(opts))


@pytest.mark.parametrize("clip, fused, num_micro_batches", [
    ("full_model", True, 1), ("full_model", True, 2), ("full_model", False, 2),
    ("norm", True, 2), ("norm", False, 2), ("value", True, 2), ("value", False, 2)])
def test_float16_step_clips_true_gradients(inputs, monkeypatch, one_thread, clip, fused, num_micro_batches):
    """With float16 and its gradient scaler, clipping sees the gradients' true norms and the step equals that of
    the same model without loss scaling, fused optimizer or not, accumulating or not (with the fused optimizer,
    clipping used to see the gradients multiplied by the loss scale)."""
    opts = [*SGD_OPTS, "SOLVER.FUSED_OPTIMIZER", fused, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", clip, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01]
    micro_batches = [inputs] if num_micro_batches == 1 else [inputs[:2], inputs[2:]]
    recorder = ClipRecorder(monkeypatch)
    unscaled = one_step(opts, micro_batches, torch.float16, grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    true_norms = list(recorder.norms)
    recorder.norms.clear()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7)
    scaled = one_step(opts, micro_batches, torch.float16, grad_scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 7  # no overflow: the step was taken
    assert max(true_norms) > 1  # above CLIP_VALUE: clipping acted
    assert recorder.norms == pytest.approx(true_norms, rel=1e-2, abs=1e-6)  # float16 rounding differs
    initial = initial_params(opts)
    moved = max((unscaled[k] - initial[k]).abs().max().item() for k in unscaled)
    assert moved > 0
    for name in unscaled:  # a scaled gradient would have been clipped to 1/128 of the true step
        torch.testing.assert_close(scaled[name], unscaled[name], rtol=0, atol=0.1 * moved, msg=name)


def test_ims_per_batch_is_the_optimizer_step_batch():
    cfg = load_config(TINY_CONFIG, "SOLVER.IMS_PER_BATCH", 8, "SOLVER.ACCUMULATE_STEPS", 4)
    assert micro_batch_size(cfg) == 2
    cfg = load_config(TINY_CONFIG, "SOLVER.IMS_PER_BATCH", 6, "SOLVER.ACCUMULATE_STEPS", 4)
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH=6 must be a positive multiple of "
                                         r"SOLVER.ACCUMULATE_STEPS=4 x 1 processes = 4 .*e.g. 8"):
        micro_batch_size(cfg)


@pytest.mark.parametrize("steps", [0, -1])
def test_accumulate_steps_below_one_is_refused(steps, tmp_path):
    cfg = load_config(TINY_CONFIG, "SOLVER.ACCUMULATE_STEPS", steps, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=rf"SOLVER.ACCUMULATE_STEPS={steps} must be >= 1"):
        DetrTrainer(cfg)


@pytest.mark.parametrize("images", [0, -2])
def test_ims_per_batch_below_one_is_refused(images, tmp_path):
    cfg = load_config(TINY_CONFIG, "SOLVER.IMS_PER_BATCH", images, "OUTPUT_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=rf"SOLVER.IMS_PER_BATCH={images} must be a positive multiple of "
                                         r"SOLVER.ACCUMULATE_STEPS=1 x 1 processes = 1 .*e.g. 1"):
        DetrTrainer(cfg)


def test_amp_dtype_names():
    assert amp_dtype("auto", "cuda") == torch.float16 and amp_dtype("auto", "cpu") == torch.bfloat16
    assert amp_dtype("bfloat16", "cuda") == torch.bfloat16 and amp_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="SOLVER.AMP.DTYPE='fp8'"):
        amp_dtype("fp8", "cpu")


def test_criterion_is_float32_under_autocast(inputs):
    """Matching and losses run in float32 inside the autocast region: same matches and losses as outside."""
    cfg = load_config(TINY_CONFIG, "MODEL.DETR.DROPOUT", 0.0)
    torch.manual_seed(0)
    model = DetrTrainer.build_model(cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        images = model.preprocess_image(inputs)
        outputs = model.predict(images)
    assert outputs["pred_logits"].dtype == torch.bfloat16
    targets = model.prepare_targets(inputs, images.image_sizes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = model.criterion(outputs, targets)
    reference, _ = model.criterion(outputs, targets)
    for name, value in reference.items():
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name], value, rtol=0, atol=0)


def _amp_steps(device: str, output_dir, num_steps: int = 3):
    """Losses of ``num_steps`` DetrTrainer iterations with SOLVER.AMP.ENABLED on ``device``, and the dtype of
    the transformer's input (autocast at work)."""
    cfg = load_config(TINY_CONFIG, "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", str(output_dir),
                      "SOLVER.IMS_PER_BATCH", 4, "SOLVER.ACCUMULATE_STEPS", 2)
    trainer = DetrTrainer(cfg)
    dtypes = []
    trainer.model.input_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with EventStorage(0) as storage:
        for trainer.iter in range(num_steps):
            trainer.run_step()
            storage.step()
    losses = [value for value, _ in storage.history("total_loss").values()]
    return trainer, losses, set(dtypes)


def test_amp_float16_with_fused_sgd_trains_on_cpu(tmp_path, one_thread):
    """float16 with the gradient scaler and the fused optimizer (the default): the first steps overflow and
    are skipped while the scale settles, then training proceeds, with finite parameters. Fused SGD's first
    skipped step used to leave uninitialised momentum buffers, and its clipping saw scaled gradients."""
    cfg = load_config(TINY_CONFIG, "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.DTYPE", "float16",
                      "SOLVER.OPTIMIZER", "SGD", "SOLVER.FUSED_OPTIMIZER", True, "OUTPUT_DIR", str(tmp_path))
    torch.manual_seed(0)
    np.random.seed(0)  # the sampler's seed and the augmentations
    trainer = DetrTrainer(cfg)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    scaler = trainer._trainer.grad_scaler
    with EventStorage(0) as storage:
        for trainer.iter in range(10):
            trainer.run_step()
            storage.step()
    assert scaler is not None and scaler.get_scale() < 2.0 ** 16  # some steps were skipped
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial))  # others were taken


def test_amp_bfloat16_trains_on_cpu(tmp_path):
    trainer, losses, dtypes = _amp_steps("cpu", tmp_path)
    assert dtypes == {torch.bfloat16} and trainer._trainer.grad_scaler is None
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_float16_trains_on_cuda(tmp_path):
    trainer, losses, dtypes = _amp_steps("cuda", tmp_path)
    assert dtypes == {torch.float16} and trainer._trainer.grad_scaler is not None
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())
