"""DETR's optimizer (d2_detr.engine.optimizer): parameter groups, full-model clipping, fused steps, loss scaling."""
import pytest
import torch
from torch import nn

from d2_detr.engine.optimizer import build_detr_optimizer
from tests.conftest import load_config
from tests.step_helpers import ClipRecorder


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).relu())


def _cfg(**solver):
    cfg = load_config("tests/configs/tiny.yaml")
    cfg.SOLVER.BASE_LR = 1e-2
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _step(cfg, scale: float = 1.0):
    model = _Model()
    optimizer = build_detr_optimizer(cfg, model)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    (scale * model(x).square().sum()).backward()
    optimizer.step()
    return model, optimizer


def test_backbone_parameters_get_the_multiplier():
    _, optimizer = _step(_cfg())
    rest, backbone = optimizer.param_groups
    assert rest["lr"] == pytest.approx(1e-2) and backbone["lr"] == pytest.approx(1e-3)
    assert len(rest["params"]) == 2 and len(backbone["params"]) == 2


def test_full_model_clipping_clips_the_norm_of_all_gradients_together():
    model, _ = _step(_cfg(), scale=1e3)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(0.1, rel=1e-4)  # CLIP_VALUE of the recipe


def test_fused_step_equals_per_tensor_step():
    fused, opt_fused = _step(_cfg(FUSED_OPTIMIZER=True))
    loop, opt_loop = _step(_cfg(FUSED_OPTIMIZER=False))
    assert opt_fused.defaults["fused"] and not opt_loop.defaults["fused"]
    for a, b in zip(fused.parameters(), loop.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fused.head.weight, _Model().head.weight)  # the step changed the parameters


def test_sgd_and_unknown_optimizer():
    _, optimizer = _step(_cfg(OPTIMIZER="SGD", MOMENTUM=0.9))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="use 'ADAMW' or 'SGD'"):
        build_detr_optimizer(_cfg(OPTIMIZER="LAMB"), _Model())


def _amp_cfg(optimizer: str, clip: str, fused: bool):
    cfg = _cfg(OPTIMIZER=optimizer, MOMENTUM=0.9, FUSED_OPTIMIZER=fused)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1  # below the gradients' norms and largest values: clipping acts
    return cfg


def _amp_step(cfg, scaler: torch.amp.GradScaler):
    """One float16-autocast step of ``_Model`` as Detectron2's AMPTrainer takes it: ``scaler.step`` without an
    explicit ``unscale_``."""
    model = _Model()
    optimizer = build_detr_optimizer(cfg, model)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().square().sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return model, optimizer


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("clip", ["full_model", "norm", "value"])
@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_clipping_under_grad_scaler_sees_true_gradients(monkeypatch, optimizer, clip, fused):
    """With a GradScaler, clipping inside ``step`` sees the unscaled gradients, fused optimizer or not, and the
    step equals that of the same float16 model without scaling (with a fused optimizer, clipping used to see
    the gradients multiplied by the loss scale)."""
    cfg = _amp_cfg(optimizer, clip, fused)
    recorder = ClipRecorder(monkeypatch)
    reference, _ = _amp_step(cfg, torch.amp.GradScaler("cpu", enabled=False))
    true_norms = list(recorder.norms)
    recorder.norms.clear()
    scaled, _ = _amp_step(cfg, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert true_norms and max(true_norms) > 0.1  # clipping acted
    assert recorder.norms == pytest.approx(true_norms, rel=1e-3)
    for a, b in zip(scaled.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert not torch.equal(scaled.head.weight, _Model().head.weight)  # the step changed the parameters


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_grad_scaler_skips_inf_step_without_touching_parameters_or_state(monkeypatch, optimizer, fused):
    """A step whose scaled gradients overflow float16 changes nothing and clips nothing. Fused SGD would
    otherwise have kept uninitialised momentum buffers, used at the next step."""
    recorder = ClipRecorder(monkeypatch)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    model, optimizer = _amp_step(_amp_cfg(optimizer, "full_model", fused), scaler)
    assert scaler.get_scale() == 2.0 ** 39  # the step was found to overflow
    assert not recorder.norms and not optimizer.state
    for a, b in zip(model.parameters(), _Model().parameters()):
        assert torch.equal(a, b)


def test_lr_multipliers_by_name_pattern():
    """First matching pattern counts; it combines with the backbone multiplier."""
    cfg = _cfg(LR_MULTIPLIERS=[["head\\.weight", 0.5], ["weight", 0.2]])
    _, optimizer = _step(cfg)
    lrs = {group["name"]: (group["lr"], len(group["params"])) for group in optimizer.param_groups}
    assert lrs == {"other": (pytest.approx(1e-2), 1), "backbone": (pytest.approx(1e-3), 1),
                   "'head\\.weight'": (pytest.approx(5e-3), 1), "backbone and 'weight'": (pytest.approx(2e-4), 1)}


@pytest.mark.parametrize("entry", [["weight"], ["weight", "0.1"], [3, 0.1], ["(", 0.1]])
def test_malformed_lr_multipliers_are_clear_errors(entry):
    with pytest.raises(ValueError, match="SOLVER.LR_MULTIPLIERS"):
        build_detr_optimizer(_cfg(LR_MULTIPLIERS=[entry]), _Model())


def test_deformable_recipe_groups():
    """Base-DeformableDETR.yaml: sampling offsets and reference points at 0.1x the base LR, the backbone at 0.1x."""
    cfg = load_config("tests/configs/tiny_deformable.yaml")
    from detectron2.modeling import build_model

    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in build_detr_optimizer(cfg, model).param_groups}
    assert groups["'sampling_offsets'"]["lr"] == pytest.approx(2e-5)
    assert groups["'reference_points'"]["lr"] == pytest.approx(2e-5)
    assert groups["backbone"]["lr"] == pytest.approx(2e-5) and groups["other"]["lr"] == pytest.approx(2e-4)
    assert {names[id(p)] for p in groups["'reference_points'"]["params"]} == {
        "transformer.reference_points.weight", "transformer.reference_points.bias"}
    assert all("sampling_offsets" in names[id(p)] for p in groups["'sampling_offsets'"]["params"])
