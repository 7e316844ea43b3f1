"""Configuration layers: defaults < YAML < environment < configurable, validated."""

import os

import pytest

from graph.configuration import (
    DEPLOYMENT_SETTINGS,
    FLAT_NAMES,
    Configuration,
    ConfigurationError,
    RunSettings,
    run_configuration,
)


def test_later_layers_override_earlier_ones(tmp_path, monkeypatch):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 7\nmax_image_gens: 2\nseed: 5\n")
    monkeypatch.setenv("ANOMALY_AGENT_MAX_IMAGE_GENS", "4")
    cfg = Configuration.from_runnable_config({"configurable": {"config_file": str(config_file), "seed": 9, "thread_id": "t"}})
    assert (cfg.budget.max_steps, cfg.budget.max_image_gens, cfg.seed) == (7, 4, 9)


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


def test_a_misspelled_setting_in_configurable_names_the_closest_one():
    with pytest.raises(ConfigurationError, match=r"unknown setting 'max_step' \(did you mean 'max_steps'\?\)"):
        run_configuration({"configurable": {"max_step": 2, "thread_id": "t", "checkpoint_ns": ""}})


def test_any_unknown_name_in_the_context_is_refused_with_the_closest_one():
    with pytest.raises(ConfigurationError, match=r"unknown setting 'temprature' \(did you mean 'temperature'\?\)"):
        run_configuration(None, {"temprature": 0.5})
    with pytest.raises(ValueError, match=r"unknown setting 'max_step' \(did you mean 'max_steps'\?\)"):
        RunSettings(max_step=2)


def test_context_wins_over_configurable_and_only_the_fields_a_caller_set_count(tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_MAX_IMAGE_GENS", "4")
    cfg = run_configuration({"configurable": {"max_steps": 5, "seed": 1}}, RunSettings(max_steps=7))
    assert (cfg.budget.max_steps, cfg.seed, cfg.budget.max_image_gens) == (7, 1, 4)  # the context's unset fields keep the env's value


def test_a_served_run_may_not_move_the_servers_folders_or_read_any_file(tmp_path):
    for name in DEPLOYMENT_SETTINGS:
        with pytest.raises(ConfigurationError, match=f"setting '{name}' belongs to the server's configuration"):
            run_configuration(None, {name: str(tmp_path)}, served=True)
    with pytest.raises(ConfigurationError, match="'config_file' must be one of the presets"):
        run_configuration(None, {"config_file": str(tmp_path / "x.yaml")}, served=True)
    assert run_configuration(None, {"run_root": str(tmp_path)}).storage.run_root == str(tmp_path)  # in-process: allowed


def test_the_layers_are_read_once_per_configuration_not_once_per_node(tmp_path, monkeypatch):
    import graph.configuration as configuration

    config_file = tmp_path / "run.yaml"
    config_file.write_text("max_steps: 6\n")
    reads = []
    real = configuration._read_yaml
    monkeypatch.setattr(configuration, "_read_yaml", lambda path: reads.append(path) or real(path))
    config = {"configurable": {"config_file": str(config_file), "seed": 11}}
    assert [run_configuration(config).budget.max_steps for _ in range(5)] == [6] * 5
    assert len(reads) == 1
    config_file.write_text("max_steps: 8\n")
    os.utime(config_file, ns=(1, 1))  # a new modification time: the file is read again
    assert run_configuration(config).budget.max_steps == 8 and len(reads) == 2


def test_every_setting_has_a_description():
    assert [name for name, field in RunSettings.model_fields.items() if not field.description] == []


def test_the_server_factory_refuses_a_misspelled_setting_before_the_server_drops_it():
    from langgraph_sdk.runtime import _ExecutionRuntime, _ReadRuntime

    from graph.graph import graph, served_graph

    def run(context):
        runtime = _ExecutionRuntime(access_context="threads.create_run", user=None, store=None, context=context)
        return served_graph(runtime)

    with pytest.raises(ConfigurationError, match=r"unknown setting 'max_step' \(did you mean 'max_steps'\?\)"):
        run({"max_step": 2})
    with pytest.raises(ConfigurationError, match="setting 'input_root' belongs to the server's configuration"):
        run({"input_root": "/"})
    assert run({"max_steps": 2, "thread_id": "t"}) is graph
    assert served_graph(_ReadRuntime(access_context="assistants.read", user=None, store=None)) is graph
def test_flat_names_and_sections_set_the_same_settings_and_a_flat_name_wins():
    flat = Configuration(max_steps=4, diffusion_steps=12, torch_device="cpu", policy="openai")
    nested = Configuration(budget={"max_steps": 4}, image={"steps": 12}, device="cpu", policy={"kind": "openai"})
    assert flat == nested and flat.flat()["diffusion_steps"] == 12
    assert Configuration(budget={"max_steps": 4, "max_image_gens": 2}, max_steps=6).budget.max_steps == 6
    assert Configuration(**Configuration().flat()) == Configuration()


def test_a_yaml_file_may_hold_sections_and_flat_keys(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("budget:\n  max_steps: 7\njudge_backend: vlm\njudge:\n  pass_quality: 4\n")
    cfg = Configuration.load(config_file=config_file)
    assert (cfg.budget.max_steps, cfg.judge.backend, cfg.judge.pass_quality) == (7, "vlm", 4)


def test_the_configuration_is_frozen_and_hashable(tmp_path):
    cfg = Configuration()
    with pytest.raises(ValueError, match="frozen"):
        cfg.budget.max_steps = 3  # type: ignore[misc]
    assert hash(Configuration(max_steps=3).budget) == hash(Configuration(max_steps=3).budget)


def test_errors_name_the_flat_setting_and_a_misspelled_section_key_its_closest_field():
    with pytest.raises(ConfigurationError, match="invalid configuration 'diffusion_strength'"):
        Configuration.load(overrides={"diffusion_strength": 2})
    with pytest.raises(ConfigurationError, match="invalid configuration 'torch_device'"):
        Configuration.load(overrides={"torch_device": 3})
    with pytest.raises(ValueError, match=r"unknown setting 'max_step' \(did you mean 'max_steps'\?\)"):
        Configuration(budget={"max_step": 2})


def test_a_configuration_as_the_runs_context_is_used_as_it_is():
    cfg = Configuration(max_steps=3, seed=2)
    assert run_configuration({"configurable": {"max_steps": 5}}, cfg) is cfg


def test_run_settings_has_one_field_per_flat_name_and_the_preset():
    assert list(RunSettings.model_fields) == [*FLAT_NAMES, "config_file"]
