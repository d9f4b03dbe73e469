"""d2_detr.config.load_config: the one way the tools read a config, and its errors."""
import pytest

from d2_detr.config import ConfigError, load_config

from .conftest import TINY_CONFIG


def test_file_then_overrides_frozen():
    cfg = load_config(TINY_CONFIG, ["SOLVER.BASE_LR", "0.5", "MODEL.DETR.NUM_OBJECT_QUERIES", "7"])
    assert cfg.SOLVER.BASE_LR == 0.5 and cfg.MODEL.DETR.NUM_OBJECT_QUERIES == 7
    assert cfg.MODEL.META_ARCHITECTURE == "Detr"  # from the file
    assert cfg.MODEL.DETR.HIDDEN_DIM == 32  # tiny.yaml overrides d2_detr's default 256
    assert cfg.is_frozen()
    assert not load_config(TINY_CONFIG, freeze=False).is_frozen()


def test_no_file_defaults_then_overrides():
    cfg = load_config(None, ["MODEL.DETR.NUM_CLASSES", "3"])
    assert cfg.MODEL.DETR.NUM_CLASSES == 3 and cfg.MODEL.DETR.HIDDEN_DIM == 256  # d2_detr's default
    with pytest.raises(ConfigError, match="unknown config key MODEL.DETR.NUM_CLASES"):
        load_config(None, ["MODEL.DETR.NUM_CLASES", "3"])


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file '{missing}' does not exist"):
        load_config(missing)


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"_BASE_: {TINY_CONFIG}\nMODEL:\n  DETR:\n    NUM_CLASES: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: unknown config key MODEL.DETR.NUM_CLASES.")
    assert "Did you mean MODEL.DETR.NUM_CLASSES?" in message


def test_unknown_override_names_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"override SOLVER.BASE_R 0.1: unknown config key SOLVER.BASE_R\. "
                                          r"Did you mean SOLVER.BASE_LR\?"):
        load_config(TINY_CONFIG, ["SOLVER.BASE_R", "0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key MODEL.DETR.NO_SUCH_THING\. d2_detr's keys"):
        load_config(TINY_CONFIG, ["MODEL.DETR.NO_SUCH_THING", "1"])


@pytest.mark.parametrize("opts, expected", [
    (["SOLVER.BASE_LR"], r"not KEY VALUE pairs \(odd number of items\)"),
    (["SOLVER.BASE_LR", "fast"], r"override SOLVER.BASE_LR fast: Type mismatch"),
])
def test_bad_overrides(opts, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY_CONFIG, opts)


@pytest.mark.parametrize("text, expected", [
    ("SOLVER:\n  BASE_LR: fast\n", "ValueError: Type mismatch"),
    ("MODEL: [\n", "ParserError"),
    ("_BASE_: missing_base.yaml\n", "missing_base.yaml"),
])
def test_bad_file_content_names_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"{path}: ")
