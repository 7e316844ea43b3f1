"""Shipped configuration presets (graph/presets): they load, validate and pick the intended backends."""

from __future__ import annotations

import pytest

from graph.configuration import Configuration, ConfigurationError, PRESET_DIR, presets
from graph.toolbox import get_toolbox


def test_cpu_and_gpu_open_presets_are_shipped():
    assert {"cpu", "gpu-open"} <= set(presets())


@pytest.mark.parametrize("name", presets())
def test_every_preset_validates_by_name_and_by_path(name):
    assert Configuration.load(config_file=name) == Configuration.load(config_file=PRESET_DIR / f"{name}.yaml")


def test_cpu_preset_is_the_embedded_default():
    cfg = Configuration.load(config_file="cpu")
    assert (cfg.policy.kind, cfg.image.backend, cfg.mask.backend, cfg.judge.backend) == ("scripted", "procedural", "change", "metric")


def test_gpu_open_preset_selects_open_model_backends():
    cfg = Configuration.load(config_file="gpu-open")
    assert (cfg.policy.kind, cfg.judge.backend, cfg.image.backend, cfg.mask.backend) == ("openai", "vlm", "diffusers", "sam")
    assert cfg.policy.base_url and cfg.judge.base_url and cfg.image.model_path and cfg.mask.checkpoint


def test_gpu_open_without_the_model_files_fails_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_DIFFUSION_MODEL_PATH", str(tmp_path / "absent"))
    with pytest.raises(ConfigurationError, match="diffusion_model_path"):
        get_toolbox(Configuration.load(config_file="gpu-open"))


def test_preset_names_do_not_hide_real_files(tmp_path, monkeypatch):
    (tmp_path / "cpu").write_text("max_steps: 4\n")
    monkeypatch.chdir(tmp_path)
    assert Configuration.load(config_file="cpu").budget.max_steps == 4
