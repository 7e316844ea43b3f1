"""`anomaly-agent train sft`: supervised fine-tuning of a policy on trajectories with TRL's SFTTrainer.

What a run does:
1. Loads the base model (default: the bundled SmolLM2-135M-Instruct, converted once into the cache
   folder the `local` policy reads) and its tokenizer, and sets the chat template chosen in the config
   (`training.chat_templates`). That template has ``{% generation %}`` markers, so TRL's
   ``assistant_only_loss`` trains on the policy's own turns (thought, ``<tool_call>`` and the closing
   ``<|im_end|>``) and never on the system prompt, the task or the tool results.
2. Reads the trajectories (a saved HF dataset from ``trajectories export`` or a JSONL) as
   ``messages`` + ``tools`` rows; TRL renders each with the template and the tools.
3. Optionally freezes all but the top N decoder layers: on a CPU the forward pass over every token is
   the floor of the cost, and backward then stops at the lowest trained layer.
4. Trains, then saves model + tokenizer (with the chat template) into ``output_dir``, a folder the
   `local` policy (``--model``) and ``serve-policy --model`` load as is, plus ``log_history.jsonl``,
   ``loss_curve.png`` and ``sft_summary.json`` (time, steps, tokens, load average).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from training.sft_config import SFTConfigError, SFTJobConfig

logger = logging.getLogger(__name__)

SUMMARY_FILE = "sft_summary.json"
LOG_FILE = "log_history.jsonl"
CURVE_FILE = "loss_curve.png"


def resolve_model(path: str | None) -> Path:
    """The base model folder: `path`, or the converted SmolLM2 cache folder when None."""
    if path is None:
        from graph.inference.smollm2 import ensure_smollm2

        return ensure_smollm2()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise SFTConfigError(f"no model at {folder}: give a local Hugging Face model folder (config.json, weights, tokenizer)")
    return folder


def load_training_dataset(source: str | Path, *, seed: int = 0, shuffle: bool = True, limit: int | None = None) -> Any:
    """``messages`` + ``tools`` rows from a saved dataset folder or a trajectories JSONL."""
    from datasets import load_from_disk

    from training.trajectories import load_jsonl, to_hf_dataset, training_rows

    path = Path(source)
    if path.is_dir():
        dataset = load_from_disk(str(path))
    elif path.is_file():
        dataset = to_hf_dataset(load_jsonl(path))
    else:
        raise FileNotFoundError(f"training data not found: {path} (export it with `anomaly-agent trajectories export`)")
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if "images" in dataset.column_names:
        logger.warning("the dataset has an images column; a text-only model ignores it")
        dataset = dataset.remove_columns("images")
    return training_rows(dataset)


def freeze_for_training(model: Any, trainable_layers: int | None, train_embeddings: bool) -> dict[str, int]:
    """Leave only the top `trainable_layers` decoder layers and the final norm trainable (None: all).

    Returns:
        Trainable and total parameter counts.
    """
    if trainable_layers is not None:
        layers = _decoder_layers(model)
        for parameter in model.parameters():
            parameter.requires_grad = False
        for layer in layers[-trainable_layers:]:
            for parameter in layer.parameters():
                parameter.requires_grad = True
        norm = getattr(model.get_decoder(), "norm", None)
        if norm is not None:
            for parameter in norm.parameters():
                parameter.requires_grad = True
    if trainable_layers is not None and train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for parameter in module.parameters():
                parameter.requires_grad = True
    elif trainable_layers is None and not train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for parameter in module.parameters():
                parameter.requires_grad = False
    return count_parameters(model)


def count_parameters(model: Any) -> dict[str, int]:
    """Trainable and total parameter counts (what the training summaries report)."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def _decoder_layers(model: Any) -> Any:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise SFTConfigError(f"cannot find the decoder layers of {type(model).__name__}; leave trainable_layers unset")
    return layers


def _set_template(tokenizer: Any, choice: str) -> None:
    from graph.inference.chat_template import template_supports_tools
    from training.chat_templates import TEMPLATES, has_generation_markers

    if choice in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[choice]
        return
    template = getattr(tokenizer, "chat_template", None)
    if not (template_supports_tools(template) and has_generation_markers(template)):
        raise SFTConfigError(
            "chat_template: model needs a template that renders tools and has {% generation %} markers; "
            "use compact or hermes"
        )


def lean_trainer_class() -> type:
    """TRL's SFTTrainer with the lean assistant-only loss (`training.sft_trainer.LeanLossSFTTrainer`)."""
    from training.sft_trainer import LeanLossSFTTrainer

    return LeanLossSFTTrainer


def train_sft(config: SFTJobConfig, progress: bool = False) -> dict[str, Any]:
    """Run SFT as configured; return the summary also written to ``output_dir/sft_summary.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from tools.imaging import write_json_atomic, write_text_atomic

    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SFTConfigError("device: cuda was asked for, but torch sees no CUDA device")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    base = resolve_model(config.model)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    _set_template(tokenizer, config.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=dtype)
    params = freeze_for_training(model, config.trainable_layers, config.train_embeddings)
    dataset = load_training_dataset(config.dataset, seed=config.seed, shuffle=config.shuffle, limit=config.max_train_samples)
    logger.info("SFT of %s on %d trajectories, %d of %d parameters trainable", base, len(dataset), params["trainable"], params["total"])

    args = config.to_trl(use_cpu=not use_cuda)
    if progress:
        args.disable_tqdm = False
    from training.sft_trainer import TimeLimitCallback

    limit = TimeLimitCallback(config.time_limit_s) if config.time_limit_s else None
    callbacks = [limit] if limit else []
    trainer_class = lean_trainer_class() if config.lean_loss else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trained_tokens = sum(sum(1 for v in labels if v != -100) for labels in trainer.train_dataset["labels"]) if "labels" in trainer.train_dataset.column_names else None
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()

    trainer.model.config.use_cache = True
    trainer.save_model(str(out))  # model weights + config
    tokenizer.save_pretrained(str(out))  # tokenizer with the chat template the model was trained with
    history = trainer.state.log_history
    write_text_atomic(out / LOG_FILE, "".join(json.dumps(row) + "\n" for row in history))
    plot_loss_curve(history, out / CURVE_FILE, title=f"SFT {base.name}: {len(dataset)} trajectories")
    losses = [row["loss"] for row in history if "loss" in row]
    summary = {
        "base_model": str(base),
        "checkpoint": str(out),
        "device": "cuda" if use_cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "chat_template": config.chat_template,
        "trajectories": len(dataset),
        "tokens": tokens,
        "assistant_tokens": trained_tokens,
        "parameters": params,
        "global_steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs_done": round(float(trainer.state.epoch or 0.0), 3),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
        "stopped_by_time_limit": bool(limit and limit.hit),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
    }
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "SFT") -> Path | None:
    """A PNG of training loss (and learning rate) per step; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in history if "loss" in row and "step" in row]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label="train loss (assistant tokens)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if any("learning_rate" in r for r in rows):
        twin = axis.twinx()
        twin.plot([r["step"] for r in rows], [r.get("learning_rate", 0.0) for r in rows], color="tab:gray", alpha=0.5,
                  label="learning rate")
        twin.set_ylabel("learning rate")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
