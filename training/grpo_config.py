"""The configuration of `anomaly-agent train grpo`, read from YAML (a config dataclass beside the trainer, as TRL does).

Why our own dataclass around TRL's `GRPOConfig`: the rollouts are ours (G runs per task through the real
graph), so a run also names the graph's settings, the task sets, the rollout backend and the reward
weights. The optimisation fields keep TRL's names and meaning (`beta`, `epsilon`, `num_generations`,
`learning_rate`, `gradient_accumulation_steps`, `temperature`, `max_completion_length`, `max_grad_norm`,
`num_iterations`, `scale_rewards`), and `to_trl` builds the `trl.GRPOConfig` the trainer reads them from.
The rest comes in sections: ``tasks``, ``rewards``, ``credit``, ``guard``, ``lora`` and ``graph`` (the
run's `graph.configuration.Configuration` keys). A flat key of a section (``heldout_seed``,
``reward_task``, ``lora_r``...) is accepted too and goes into its section (`FLAT_KEYS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.grpo_rewards import RewardWeights


#: The linear layers of a Llama-style decoder layer (attention and MLP) that get LoRA adapters.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GRPOConfigError(ValueError):
    """The GRPO configuration file is missing, unreadable or has unknown or invalid keys."""


@dataclass(frozen=True)
class TaskSets:
    """The task sets of a run (`graph.tasks.make_tasks`), each drawn from its own sample seed.

    Attributes:
        tasks_per_step: Tasks per generation round; each gets `num_generations` rollouts.
        train_tasks / train_sample_seed: The training task pool, over sample images of that seed, checked
            disjoint (by image hash) from the held-out images.
        heldout_tasks / heldout_seed / eval_generations: The held-out set (the `eval policy` tasks of that
            seed) and the rollouts per held-out or validation task.
        validation_tasks / validation_seed / validate_every: With `validation_tasks` > 0, a third task set
            (its own seed, images checked disjoint from the other two) scores the starting policy, the
            policy every `validate_every` steps and the last one, and the run keeps the best of them for
            `final/` and the held-out "after" (`training.grpo_selection`).
        image_size: Side of the sample images in pixels.
    """

    tasks_per_step: int = 1
    train_tasks: int = 24
    train_sample_seed: int = 5
    heldout_tasks: int = 4
    heldout_seed: int = 0
    eval_generations: int = 4
    validation_tasks: int = 0
    validation_seed: int = 4
    validate_every: int = 10
    image_size: int = 128


@dataclass(frozen=True)
class Credit:
    """Which tokens of a run carry its advantage (`training.grpo_loss`); the defaults are DESIGN §6's run-level update.

    Attributes:
        rejected_turn_advantage: Turn-level credit c >= 0: the tokens of a turn the graph refused get the
            run's advantage minus c (with ``refusal_credit: first``: the run's first refused turn only,
            with min(A, 0) - c).
        rejected_token_max_prob: With c > 0, push down only the refused turn's tokens that were sampled with
            probability below this (1.0: all of them), so the call syntax the policy was sure of is not
            pushed towards garbage.
        refusal_credit: ``run``: every turn carries loss; ``first``: a run below its group's mean up to its
            first refused turn and a run above it on its accepted turns only, so the copies of a malformed
            call that follow a bad turn are context, not loss.
        negative_advantage_scale: Factor in [0, 1] on negative advantages: 1 is the symmetric update, 0
            trains only on the runs above their group's mean.
    """

    rejected_turn_advantage: float = 0.0
    rejected_token_max_prob: float = 1.0
    refusal_credit: str = "run"
    negative_advantage_scale: float = 1.0


@dataclass(frozen=True)
class GuardSettings:
    """The update guard (`training.grpo_guard`): probes per forced move (0: off), halvings before an update is undone."""

    probes_per_tool: int = 0
    backtracks: int = 2


@dataclass(frozen=True)
class LoraSettings:
    """With `r`, train rank-r LoRA adapters (peft) on `target_modules` of the top `trainable_layers` layers
    instead of their weights; `final/` is the merged model. Local backend only (the openai weight sync sends
    full tensors)."""

    r: int | None = None
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


#: Each section's type, by its key in the file.
SECTIONS: dict[str, type] = {"tasks": TaskSets, "rewards": RewardWeights, "credit": Credit, "guard": GuardSettings,
                             "lora": LoraSettings}

#: Flat keys accepted for a section's field: key -> (section, field).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{f.name: ("tasks", f.name) for f in dataclasses.fields(TaskSets)},
    **{f.name: ("credit", f.name) for f in dataclasses.fields(Credit)},
    "reward_task": ("rewards", "task"), "reward_reflection": ("rewards", "reflection"),
    "reward_behaviour": ("rewards", "behaviour"), "mask_iou_weight": ("rewards", "mask_iou_weight"),
    "over_budget_penalty": ("rewards", "over_budget_penalty"),
    "repeated_call_penalty": ("rewards", "repeated_call_penalty"),
    "guard_probes_per_tool": ("guard", "probes_per_tool"), "guard_backtracks": ("guard", "backtracks"),
    "lora_r": ("lora", "r"), "lora_alpha": ("lora", "alpha"), "lora_target_modules": ("lora", "target_modules"),
}


@dataclass
class GRPOJobConfig:
    """Everything one GRPO run needs.

    Attributes:
        output_dir: Checkpoints (``checkpoint/``: model, optimizer, trainer state), the final model
            (``final/``), ``rewards.jsonl`` (one row per step), ``rollouts.jsonl`` (one row per rollout,
            every reward component), ``reward_curve.png`` and ``grpo_summary.json``.
        model: The policy to start from (an SFT checkpoint folder); None: the bundled SmolLM2.
        rollout_backend: ``local`` (the model in this process, the graph's `local` policy) or ``openai``
            (rollouts go to `base_url`, an OpenAI-compatible server that returns token ids and logprobs:
            vLLM or `anomaly-agent serve-policy`; weights are synced to it after each update).
        weight_sync: For ``openai``: ``serve-policy`` (POST /v1/load_weights), ``vllm`` (POST
            /collective_rpc to `training.grpo_sync.ReloadWorkerExtension`), or ``none``.
        graph: `graph.configuration.Configuration` keys for every rollout (thresholds, budget).
        tasks / rewards / credit / guard / lora: The sections above (`TaskSets`, `RewardWeights`, `Credit`,
            `GuardSettings`, `LoraSettings`); a mapping is turned into its section.
        trainable_layers: Train only the top N decoder layers and the final norm (None: all).
        workers: Rollouts run at once (threads); the local backend serialises generation on one model.
        prefix_cache: Conversations whose attention cache the local backend keeps between turns (at
            least `workers`, or concurrent rollouts evict each other's).
        batch_generation: Local backend: decode the concurrent rollouts' replies as one batch (one
            forward pass per token for all of them) instead of one at a time.
        save_steps: Save a checkpoint every N optimizer steps (and at the end); `--resume` continues it.
        time_limit_s: Stop training (not the final evaluation; validations count as training) before a step
            that is expected to end past this many seconds of training plus one validation.
    """

    output_dir: str
    model: str | None = None
    rollout_backend: str = "local"
    base_url: str | None = None
    served_model: str | None = None
    weight_sync: str = "serve-policy"
    graph: dict[str, Any] = field(default_factory=dict)
    # TRL GRPOConfig fields (same names, same meaning)
    num_generations: int = 4
    max_steps: int = 8
    learning_rate: float = 1e-5
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    scale_rewards: str = "group"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    max_completion_length: int = 160
    seed: int = 0
    # Sections
    tasks: TaskSets = field(default_factory=TaskSets)
    rewards: RewardWeights = field(default_factory=RewardWeights)
    credit: Credit = field(default_factory=Credit)
    guard: GuardSettings = field(default_factory=GuardSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Runtime
    trainable_layers: int | None = 4
    workers: int = 4
    prefix_cache: int = 8
    batch_generation: bool = True
    save_steps: int = 2
    num_threads: int | None = None
    time_limit_s: float | None = None
    evaluate_before_after: bool = True

    def __post_init__(self) -> None:
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(section)}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise GRPOConfigError(f"{name} has unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
                setattr(self, name, section(**value))
        tasks, credit = self.tasks, self.credit
        if self.rollout_backend not in ("local", "openai"):
            raise GRPOConfigError(f"rollout_backend must be local or openai, not {self.rollout_backend!r}")
        if self.rollout_backend == "openai" and not self.base_url:
            raise GRPOConfigError("rollout_backend openai needs base_url (http://HOST:PORT/v1 of vLLM or serve-policy)")
        if self.weight_sync not in ("serve-policy", "vllm", "none"):
            raise GRPOConfigError(f"weight_sync must be serve-policy, vllm or none, not {self.weight_sync!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise GRPOConfigError(f"scale_rewards must be group, batch or none, not {self.scale_rewards!r}")
        if credit.rejected_turn_advantage < 0:
            raise GRPOConfigError(f"credit.rejected_turn_advantage must be >= 0 (a push down on refused turns), "
                                  f"not {credit.rejected_turn_advantage}")
        if not 0.0 < credit.rejected_token_max_prob <= 1.0:
            raise GRPOConfigError(f"credit.rejected_token_max_prob must be in (0, 1], not {credit.rejected_token_max_prob}")
        if credit.refusal_credit not in ("run", "first"):
            raise GRPOConfigError(f"credit.refusal_credit must be run or first, not {credit.refusal_credit!r}")
        if not 0.0 <= credit.negative_advantage_scale <= 1.0:
            raise GRPOConfigError(f"credit.negative_advantage_scale must be in [0, 1], not {credit.negative_advantage_scale}")
        if self.lora.r is not None and self.lora.r < 1:
            raise GRPOConfigError(f"lora.r must be a positive rank or unset, not {self.lora.r}")
        if self.lora.r and self.rollout_backend == "openai":
            raise GRPOConfigError("lora.r needs rollout_backend local: the openai weight sync sends full tensors, not adapters")
        if self.guard.probes_per_tool < 0 or self.guard.backtracks < 0:
            raise GRPOConfigError("guard.probes_per_tool and guard.backtracks must be >= 0")
        if tasks.validation_tasks < 0 or tasks.validate_every < 1:
            raise GRPOConfigError("tasks.validation_tasks must be >= 0 and tasks.validate_every >= 1")
        if tasks.validation_tasks and tasks.validation_seed in (tasks.heldout_seed, tasks.train_sample_seed):
            raise GRPOConfigError("tasks.validation_seed must differ from heldout_seed and train_sample_seed (its images "
                                  "would be the held-out or training ones)")
        if self.num_generations < 2:
            raise GRPOConfigError("num_generations must be at least 2: advantages are relative to the group")
        from graph.configuration import FLAT_NAMES

        unknown = sorted(set(self.graph) - set(FLAT_NAMES))
        if unknown:
            raise GRPOConfigError(f"graph has unknown configuration keys: {', '.join(unknown)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the GRPO config") -> "GRPOJobConfig":
        """The config of a mapping of top-level keys, sections and flat section keys (`FLAT_KEYS`, which win).

        Raises:
            GRPOConfigError: a key is unknown or a value invalid.
        """
        fields: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in top and k not in FLAT_KEYS)
        if unknown:
            raise GRPOConfigError(f"{source} has unknown keys: {', '.join(unknown)} "
                                  f"(known: {', '.join(sorted(top | set(FLAT_KEYS)))})")
        for key, value in data.items():
            if key in SECTIONS:
                sections.setdefault(key, {}).update(_as_mapping(value))
            elif key not in FLAT_KEYS:
                fields[key] = value
        for key, value in data.items():  # a flat key wins over its section's value (it is the override)
            if key in FLAT_KEYS:
                section, name = FLAT_KEYS[key]
                sections.setdefault(section, {})[name] = value
        return cls(**fields, **sections)

    def to_dict(self) -> dict[str, Any]:
        """The config as the sectioned mapping `from_dict` and the YAML file take."""
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "GRPOJobConfig":
        """Read a YAML mapping of the fields above (None overrides are skipped; flat section keys allowed).

        Raises:
            GRPOConfigError: the file is missing or not a mapping, or a key is unknown.
        """
        from training.job_config import read_job_yaml

        data = read_job_yaml(path, overrides, required=("output_dir",), error=GRPOConfigError, what="GRPO")
        return cls.from_dict(data, source=str(path))

    def graph_overrides(self) -> dict[str, Any]:
        """The `configurable` of every rollout: the graph settings plus the policy backend, sampling at `temperature`."""
        overrides = {**self.graph, "temperature": self.temperature, "max_tokens": self.max_completion_length,
                     "record_token_ids": True}
        if self.rollout_backend == "openai":
            overrides.update(policy="openai", base_url=self.base_url, model=self.served_model)
        else:
            overrides.update(policy="local", model=str(self.model) if self.model else None)
        return overrides

    def to_trl(self) -> Any:
        """The TRL `GRPOConfig` holding the optimisation fields (loss ``dapo``: token-level normalisation)."""
        from trl import GRPOConfig

        return GRPOConfig(
            output_dir=self.output_dir, beta=self.beta, epsilon=self.epsilon, num_generations=self.num_generations,
            per_device_train_batch_size=self.num_generations, learning_rate=self.learning_rate,
            gradient_accumulation_steps=self.gradient_accumulation_steps, temperature=self.temperature,
            max_completion_length=self.max_completion_length, max_steps=self.max_steps, max_grad_norm=self.max_grad_norm,
            num_iterations=self.num_iterations, seed=self.seed, loss_type="dapo", scale_rewards=self.scale_rewards,
            use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
        )


def _as_mapping(value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise GRPOConfigError(f"a section must be a mapping of keys to values, not {value!r}")
    return dict(value)
