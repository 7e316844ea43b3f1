"""SFT end to end on a tiny model: export -> dataset -> TRL steps -> a checkpoint that serve-policy serves to a graph run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from served_policy import Served
from tiny_llm import build_tiny_llm

from graph.batch import list_images, plan, run_batch
from anomaly_agent_cli import main
from graph.configuration import Configuration
from graph.graph import build_graph, recursion_limit
from graph.inference.chat_template import template_supports_tools
from graph.inference import load_local_model
from graph.tool_calls import tool_schemas
from training.chat_templates import COMPACT_CHATML_TEMPLATE, has_generation_markers
from training.sft_config import SFTConfigError, SFTJobConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]



@pytest.fixture(scope="module")
def checkpoint(sample_dir, tmp_path_factory) -> Path:
    """Two scripted runs exported to a dataset, and 3 SFT steps of a tiny Llama on it through the CLI."""
    work = tmp_path_factory.mktemp("sft")
    root = work / "batch"
    run_batch(plan(list_images(sample_dir / "capsule")[:1], "capsule", ["crack", "poke"], 1, root, seed=1), root,
              overrides={"policy": "scripted"}, progress=False)
    assert main(["trajectories", "export", "--input", str(root), "--out", str(work / "t.jsonl"),
                 "--hf-dataset", str(work / "ds")]) == 0
    config = {"dataset": str(work / "ds"), "output_dir": str(work / "ckpt"), "model": str(build_tiny_llm(work / "base")),
              "chat_template": "compact", "max_steps": 3, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "trainable_layers": 1}
    (work / "sft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "sft", "--config", str(work / "sft.yaml")]) == 0
    return work / "ckpt"


def test_sft_writes_a_loadable_checkpoint_with_its_template_log_and_loss_curve(checkpoint):
    summary = json.loads((checkpoint / "sft_summary.json").read_text())
    assert summary["global_steps"] == 3 and summary["trajectories"] == 2
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"]
    assert 0 < summary["assistant_tokens"] < summary["tokens"]
    history = [json.loads(line) for line in (checkpoint / "log_history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "loss" in row] == [1, 2, 3]
    assert (checkpoint / "loss_curve.png").stat().st_size > 1000
    model = load_local_model(checkpoint)
    template = model.tokenizer.chat_template
    assert template == COMPACT_CHATML_TEMPLATE and has_generation_markers(template) and template_supports_tools(template)
    reply = model.generate([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], tools=tool_schemas(),
                           max_new_tokens=4)
    assert len(reply.token_ids) <= 4


def test_the_sft_checkpoint_drives_a_graph_run_through_serve_policy(checkpoint, sample_dir, tmp_path):
    served = Served(checkpoint)
    try:
        overrides = {"policy": "openai", "base_url": served.base_url, "max_steps": 3, "max_tokens": 12}
        out = build_graph().invoke(
            {"image": str(sample_dir / "capsule" / "000.png"), "category": "capsule", "anomaly_type": "crack",
             "run_dir": str(tmp_path / "run")},
            {"configurable": overrides, "recursion_limit": recursion_limit(Configuration.load(overrides=overrides))},
        )
    finally:
        served.stop()
    assert out["result"]["steps"] <= 3
    assert all(m.response_metadata.get("model_name") == checkpoint.name for m in out["messages"] if m.type == "ai")
    assert out["status"] in {"failed", "incomplete", "budget_exhausted", "success"}
    assert [m for m in out["messages"] if m.type == "ai"], "the served checkpoint answered no turn"


def test_sft_config_rejects_unknown_keys_and_missing_paths(tmp_path):
    (tmp_path / "bad.yaml").write_text("dataset: d\noutput_dir: o\nlearning_rat: 1\n")
    with pytest.raises(SFTConfigError, match="learning_rat"):
        SFTJobConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "short.yaml").write_text("dataset: d\n")
    with pytest.raises(SFTConfigError, match="output_dir"):
        SFTJobConfig.from_yaml(tmp_path / "short.yaml")
    assert main(["train", "sft", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    for path in sorted(root.glob("sft_*.yaml")):
        assert SFTJobConfig.from_yaml(path).output_dir


def test_lean_loss_equals_trls_loss_on_the_same_batch(checkpoint):
    """The faster loss is the same objective: TRL's assistant-only NLL, to float precision."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from training.sft import lean_trainer_class
    from training.trajectories import training_rows

    work = checkpoint.parent
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dataset = training_rows(load_from_disk(str(work / "ds")))
    losses = []
    for trainer_class in (SFTTrainer, lean_trainer_class()):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        args = SFTConfig(output_dir=str(work / "cmp"), assistant_only_loss=True, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, report_to="none", per_device_train_batch_size=2)
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(model, dict(batch))))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
