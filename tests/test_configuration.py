"""Configuration layers: defaults < YAML < environment < configurable, validated."""

import pytest

from graph.configuration import Configuration, ConfigurationError


def test_later_layers_override_earlier_ones(tmp_path, monkeypatch):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 7\nmax_image_gens: 2\nseed: 5\n")
    monkeypatch.setenv("ANOMALY_AGENT_MAX_IMAGE_GENS", "4")
    cfg = Configuration.from_runnable_config({"configurable": {"config_file": str(config_file), "seed": 9, "thread_id": "t"}})
    assert (cfg.max_steps, cfg.max_image_gens, cfg.seed) == (7, 4, 9)


def test_unknown_yaml_key_names_the_key(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_stpes: 7\n")
    with pytest.raises(ConfigurationError, match="max_stpes"):
        Configuration.load(config_file=config_file)


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigurationError, match="max_steps"):
        Configuration.load(overrides={"max_steps": 0})


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="not found"):
        Configuration.load(config_file=tmp_path / "nope.yaml")
