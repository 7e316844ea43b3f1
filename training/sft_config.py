"""The configuration of `anomaly-agent train sft`, read from YAML (TRL-style: a config dataclass beside the trainer).

Why our own dataclass and not TRL's `SFTConfig` directly: a run also chooses the base model (default:
the bundled SmolLM2), the chat template saved with the checkpoint, which layers train, and the device;
the TRL arguments that matter here are fields too, and `to_trl` fills the rest with CPU-safe values
(no bf16, no gradient checkpointing, no checkpoints mid-run, no reporting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SFTConfigError(ValueError):
    """The SFT configuration file is missing, unreadable or has unknown or invalid keys."""


@dataclass
class SFTJobConfig:
    """Everything one SFT run needs.

    Attributes:
        dataset: A folder written by ``trajectories export --hf-dataset`` or a trajectories JSONL.
        output_dir: Where the checkpoint (model, tokenizer, chat template), the log history, the loss
            curve and the run summary are written.
        model: A local Hugging Face model folder; None means the bundled SmolLM2-135M-Instruct (the
            converted cache folder the `local` policy uses).
        chat_template: ``compact`` (tool schemas as one line each; see `training.chat_templates`),
            ``hermes`` (the local policy's default layout), or ``model`` (keep the model's own template,
            which must render tools and carry ``{% generation %}`` markers).
        trainable_layers: Train only the top N decoder layers and the final norm (None: every weight).
            The forward pass still runs every layer, but backward stops at the lowest trained one.
        train_embeddings: Also train the input embeddings / LM head (tied in SmolLM2).
        max_train_samples: Use only the first N trajectories (after shuffling with `seed`).
        lean_loss: Use `training.sft.lean_trainer_class`'s loss (labelled positions only, no entropy
            metric; about twice as fast on a CPU) instead of TRL's fused-head loss. Same value, same gradients.
        time_limit_s: Stop after this many seconds of training and save what was learnt (the summary
            says the run was cut short).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        num_threads: torch CPU threads (None: torch's default).
    """

    dataset: str
    output_dir: str
    model: str | None = None
    chat_template: str = "compact"
    max_length: int | None = 4096
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable_layers: int | None = None
    train_embeddings: bool = False
    max_train_samples: int | None = None
    shuffle: bool = True
    logging_steps: int = 1
    seed: int = 0
    time_limit_s: float | None = None
    lean_loss: bool = True
    device: str = "auto"
    num_threads: int | None = None
    extra_trl_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chat_template not in ("compact", "hermes", "model"):
            raise SFTConfigError(f"chat_template must be compact, hermes or model, not {self.chat_template!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SFTConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise SFTConfigError("trainable_layers must be at least 1 (or left out to train every layer)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "SFTJobConfig":
        """Read a YAML mapping of the fields above; relative paths are taken from the current folder.

        Raises:
            SFTConfigError: the file is missing or not a mapping, a key is unknown, a required one missing.
        """
        from training.job_config import load_job_yaml

        return load_job_yaml(cls, path, overrides, required=("dataset", "output_dir"), error=SFTConfigError, what="SFT")

    def to_trl(self, use_cpu: bool) -> Any:
        """The TRL `SFTConfig` for this run: assistant-only loss, and CPU-safe defaults."""
        from trl import SFTConfig

        return SFTConfig(
            output_dir=self.output_dir,
            assistant_only_loss=True,
            max_length=self.max_length,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            logging_steps=self.logging_steps,
            seed=self.seed,
            data_seed=self.seed,
            use_cpu=use_cpu,
            bf16=not use_cpu,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            disable_tqdm=True,
            **self.extra_trl_args,
        )
