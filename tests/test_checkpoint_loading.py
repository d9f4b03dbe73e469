"""d2_detr.checkpoint.loading: clear errors for missing, unreadable and mismatching checkpoints; strict loading
for evaluation and inference, and its TEST.STRICT_WEIGHTS opt-out."""
import logging
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2_detr.checkpoint import (
    CheckedCheckpointer,
    CheckpointError,
    UnreadableCheckpointError,
    load_checkpoint_strict,
    load_inference_weights,
)

from .conftest import TINY_CONFIG, load_config


def _cfg(*opts):
    return load_config(TINY_CONFIG, *opts)


def _model(*opts, seed=0):
    """A freshly initialised tiny DETR (config + ``opts``)."""
    torch.manual_seed(seed)
    return build_model(_cfg(*opts))


def _save(model, folder, name="model"):
    DetectionCheckpointer(model, save_dir=str(folder)).save(name)
    return os.path.join(str(folder), f"{name}.pth")


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _save(_model(seed=1), tmp_path_factory.mktemp("weights"))


def test_strict_loading_loads_every_tensor(weights):
    model = _model()
    load_checkpoint_strict(model, weights)
    assert _same_weights(model, _model(seed=1))


def test_missing_file_names_file_and_source(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(UnreadableCheckpointError, match=rf"checkpoint '{missing}' \(MODEL.WEIGHTS\) does not exist"):
        CheckedCheckpointer(_model()).load(missing, source="MODEL.WEIGHTS")


@pytest.mark.parametrize("content, reason", [
    ("truncated", "the file is truncated or corrupted"),
    ("empty", "the file is truncated or corrupted"),
    ("text", "not a PyTorch or Detectron2 checkpoint"),
    ("module", "holds Python objects that torch.load\\(weights_only=True\\) refuses"),
    ("tensor", "holds a Tensor, not a state dict"),
])
def test_unreadable_file_is_named_and_model_untouched(tmp_path, weights, content, reason):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        data = open(weights, "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "text":
        path.write_text("model weights will be here")
    elif content == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        torch.save(torch.zeros(3), path)
    model = _model()
    expected = rf"cannot read checkpoint '{path}' \(MODEL.WEIGHTS\): .*{reason}"
    with pytest.raises(UnreadableCheckpointError, match=expected):
        load_checkpoint_strict(model, str(path))
    assert _same_weights(model, _model())


def test_checkpoint_of_other_config_names_config_keys(tmp_path):
    other = _save(_model("MODEL.DETR.NUM_CLASSES", 7, "MODEL.DETR.NUM_OBJECT_QUERIES", 12), tmp_path)
    cfg = _cfg()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_strict(build_model(cfg), other, cfg)
    message = str(info.value)
    assert f"checkpoint '{other}' does not match the model built from the config" in message
    assert "tensors found with their shape" in message
    assert "MODEL.DETR.NUM_CLASSES 7 (the config has 5)" in message
    assert "MODEL.DETR.NUM_OBJECT_QUERIES 12 (the config has 10)" in message
    assert "TEST.STRICT_WEIGHTS False" in message


def test_unrelated_state_dict_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, path)
    with pytest.raises(CheckpointError, match="holds none of DETR's transformer and head weights"):
        load_checkpoint_strict(_model(), str(path), _cfg())


def test_inference_weights_strict_by_default(tmp_path, weights):
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS is empty: evaluation and inference need a trained"):
        load_inference_weights(_model(), _cfg())
    other = _save(_model("MODEL.DETR.NUM_CLASSES", 7), tmp_path)
    with pytest.raises(CheckpointError, match="does not match"):
        load_inference_weights(_model(), _cfg("MODEL.WEIGHTS", other))
    model = _model()
    load_inference_weights(model, _cfg("MODEL.WEIGHTS", weights))
    assert _same_weights(model, _model(seed=1))


def test_strict_weights_false_loads_what_matches(tmp_path, caplog):
    other_model = _model("MODEL.DETR.NUM_CLASSES", 7, seed=1)
    other = _save(other_model, tmp_path)
    cfg = _cfg("MODEL.WEIGHTS", other, "TEST.STRICT_WEIGHTS", False)
    model = _model()
    with caplog.at_level(logging.WARNING):
        load_inference_weights(model, cfg)
    assert "TEST.STRICT_WEIGHTS is False" in caplog.text
    assert "class_embed.weight" in caplog.text  # fvcore's report of what was skipped
    loaded, initial = model.state_dict(), _model().state_dict()
    for key, value in other_model.state_dict().items():
        expected = initial[key] if key.startswith("class_embed.") else value
        assert torch.equal(loaded[key], expected), key
    empty = _cfg("TEST.STRICT_WEIGHTS", False)
    with caplog.at_level(logging.WARNING):
        load_inference_weights(model, empty)  # no weights: the model stays as it is
    assert "MODEL.WEIGHTS is empty and TEST.STRICT_WEIGHTS is False" in caplog.text
    with pytest.raises(UnreadableCheckpointError, match="does not exist"):  # a missing file stays an error
        load_inference_weights(model, _cfg("MODEL.WEIGHTS", str(tmp_path / "gone.pth"), "TEST.STRICT_WEIGHTS", False))
