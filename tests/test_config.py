"""The config schema: config.yaml documents every default; bad keys/values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moleflow.config import (Config, ConfigError, describe, documented_yaml, load_config,
                         parse_config)

ROOT = Path(__file__).resolve().parents[1]


def test_config_yaml_is_the_documented_default():
    assert load_config(ROOT / "config.yaml") == Config()
    text = (ROOT / "config.yaml").read_text()
    raw = yaml.safe_load(text)
    for key, _, help_ in describe():
        section, option = key.split(".")
        assert option in raw[section], f"config.yaml does not document {key}"
        assert help_ and help_.split(";")[0][:30] in text, f"{key} has no description"
    assert text == documented_yaml(), "regenerate: moleflow config --documented > config.yaml"


@pytest.mark.parametrize("raw, message", [
    ({"model": {"lora_rnak": 4}}, "model.lora_rnak: unknown option"),
    ({"modle": {}}, "modle: unknown option"),
    ({"model": {"lora_rank": 0}}, "model.lora_rank: must be >= 1"),
    ({"model": {"lora_rank": "big"}}, "model.lora_rank: must be an integer"),
    ({"model": {"lora_rank": 2.5}}, "model.lora_rank: must be an integer"),
    ({"model": {"preset": "wo_everything"}}, "model.preset: must be one of"),
    ({"model": {"use_dia": "yes"}}, "model.use_dia: must be true or false"),
    ({"train": {"lr": "fast"}}, "train.lr: must be a number"),
    ({"train": {"tail_weight": 1.5}}, "train.tail_weight: must be <= 1.0"),
    ({"train": 3}, "train: must be a mapping"),
    ({"backbone": {"out_indices": []}}, "backbone.out_indices: must be a non-empty list"),
    ({"data": {"image_size": None}}, "data.image_size: a value is required"),
    ({"eval": {"image_score": "zscore"}}, "eval.image_score: must be one of"),
])
def test_bad_values_are_named_by_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config(raw)


def test_yaml_exponent_strings_are_numbers():
    assert parse_config({"train": {"lr": "1e-4"}}).train.lr == pytest.approx(1e-4)


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nmodel:\n  preset: wo_dia\n")
    cfg = load_config(path, {"train.epochs": 3})
    assert cfg.train.epochs == 3 and cfg.model.preset == "wo_dia"
    assert cfg.resolved_model().use_dia is False and cfg.model.use_dia is True


def test_broken_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


@pytest.mark.parametrize("value, message", [
    ("jpeg:101", "calibration.codec: condition 'jpeg:101'"),
    ("shift:4", "calibration.codec: must be 'lossless' or 'jpeg:Q'"),
    ("png", "calibration.codec: condition 'png' is not one of")])
def test_calibration_codec_is_checked(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"calibration.codec": value})
    assert load_config(None, {"calibration.codec": "lossless"}).calibration.codec == "lossless"
    assert load_config(None, {}).calibration.codec == "jpeg:90"
