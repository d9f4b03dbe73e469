"""``torchvision://`` weights paths (d2_detr.checkpoint.torchvision_weights), without network access: torchvision's
files are stood in for by locally created ResNet state dicts in a temporary torch hub cache (TORCH_HOME)."""
import os
import urllib.error

import pytest
import torch
import torchvision
from detectron2.utils.file_io import PathManager

from d2_detr.checkpoint import convert_torchvision_resnet_state_dict, parse_torchvision_path
from d2_detr.engine.checkpointer import AtomicDetectionCheckpointer

from .conftest import REPO_DIR, TINY_CONFIG, load_config

R18_TINY = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.STEM_OUT_CHANNELS", 64,
            "MODEL.RESNETS.WIDTH_PER_GROUP", 64]


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and no downloads: a download attempt fails as it does without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts = []

    def no_network(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints", attempts


def _resnet18_in_cache(folder) -> dict:
    """A torchvision ResNet-18 state dict (random weights) saved under the name of torchvision's published file."""
    torch.manual_seed(0)
    state_dict = torchvision.models.resnet18(weights=None).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / "resnet18-f37072fd.pth")
    return state_dict


def test_paths_name_torchvisions_published_files():
    weights = parse_torchvision_path("torchvision://resnet101")
    assert (weights.model, weights.weights) == ("resnet101", "IMAGENET1K_V1")
    assert weights.url == torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url
    assert weights.file_name == "resnet101-63fe2227.pth"
    v2 = parse_torchvision_path("torchvision://resnet50/IMAGENET1K_V2")
    assert v2.url == torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    with pytest.raises(ValueError, match=r"torchvision's ResNets \(resnet18, .*resnet152\).*got 'vgg16'"):
        parse_torchvision_path("torchvision://vgg16")
    with pytest.raises(ValueError, match=r"no weights 'IMAGENET1K_V9' for resnet50; it has IMAGENET1K_V1, IMAGENET1K"):
        parse_torchvision_path("torchvision://resnet50/IMAGENET1K_V9")


def test_r101_configs_start_from_torchvisions_resnet101():
    for name in ("detr_r101.yaml", "detr_r101_dc5.yaml"):
        cfg = load_config(os.path.join(REPO_DIR, "configs", name))
        assert parse_torchvision_path(cfg.MODEL.WEIGHTS).url == torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url
        assert cfg.MODEL.RESNETS.DEPTH == 101


def test_cached_file_resolves_to_its_conversion(torch_home):
    folder, attempts = torch_home
    original = _resnet18_in_cache(folder)
    local = PathManager.get_local_path("torchvision://resnet18")
    assert local == str(folder / "d2_detr" / "resnet18-f37072fd.pth")
    converted = torch.load(local)["model"]
    expected = convert_torchvision_resnet_state_dict(original)
    assert converted.keys() == expected.keys() and "backbone.res5.1.conv2.norm.running_var" in converted
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    # Converted once: a second resolution reuses the file; a newer torchvision file is converted again.
    mtime = os.path.getmtime(local)
    assert PathManager.get_local_path("torchvision://resnet18") == local and os.path.getmtime(local) == mtime
    os.utime(folder / "resnet18-f37072fd.pth", (mtime + 10, mtime + 10))
    PathManager.get_local_path("torchvision://resnet18")
    assert os.path.getmtime(local) > mtime
    assert attempts == []


def test_training_checkpointer_loads_the_backbone(torch_home):
    """What DetrTrainer does with MODEL.WEIGHTS torchvision://resnet18: every backbone tensor comes from the file."""
    folder, _ = torch_home
    original = _resnet18_in_cache(folder)
    from detectron2.modeling import build_model

    model = build_model(load_config(TINY_CONFIG, *R18_TINY))
    AtomicDetectionCheckpointer(model).load("torchvision://resnet18")
    backbone = model.backbone.state_dict()
    assert torch.equal(backbone["stem.conv1.weight"], original["conv1.weight"])
    assert torch.equal(backbone["res5.1.conv2.norm.running_var"], original["layer4.1.bn2.running_var"])
    assert torch.equal(backbone["res3.0.shortcut.weight"], original["layer2.0.downsample.0.weight"])


def test_download_goes_to_torch_hubs_cache(torch_home, monkeypatch):
    folder, _ = torch_home
    local_file = folder.parent / "elsewhere.pth"
    folder.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), local_file)
    urls = []

    def download(url, dst, *args, **kwargs):
        urls.append(url)
        os.replace(local_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    local = PathManager.get_local_path("torchvision://resnet18")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert (folder / "resnet18-f37072fd.pth").is_file() and os.path.isfile(local)


def test_failed_download_says_where_to_put_the_file(torch_home):
    folder, attempts = torch_home
    with pytest.raises(OSError) as error:
        PathManager.get_local_path("torchvision://resnet101")
    message = str(error.value)
    assert attempts == [torchvision.models.ResNet101_Weights.IMAGENET1K_V1.url]
    assert "torchvision://resnet101" in message and "no network in tests" in message
    assert str(folder / "resnet101-63fe2227.pth") in message and "tools/convert_torchvision_resnet.py" in message
    assert not (folder / "d2_detr").exists()


def test_damaged_cached_file_is_named(torch_home):
    folder, _ = torch_home
    folder.mkdir(parents=True)
    (folder / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth is not torchvision's resnet18 state dict.*delete it"):
        PathManager.get_local_path("torchvision://resnet18")
