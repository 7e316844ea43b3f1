"""The configuration of `anomaly-agent train grpo`, read from YAML (a config dataclass beside the trainer, as TRL does).

Why our own dataclass around TRL's `GRPOConfig`: the rollouts are ours (G runs per task through the real
graph), so a run also names the graph's settings, the task sets, the rollout backend and the reward
weights. The optimisation fields keep TRL's names and meaning (`beta`, `epsilon`, `num_generations`,
`learning_rate`, `gradient_accumulation_steps`, `temperature`, `max_completion_length`, `max_grad_norm`,
`num_iterations`, `scale_rewards`), and `to_trl` builds the `trl.GRPOConfig` the trainer reads them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from training.grpo_rewards import RewardWeights


#: The linear layers of a Llama-style decoder layer (attention and MLP) that get LoRA adapters.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GRPOConfigError(ValueError):
    """The GRPO configuration file is missing, unreadable or has unknown or invalid keys."""


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
            /collective_rpc to `training.grpo_vllm.ReloadWorkerExtension`), or ``none``.
        graph: `graph.configuration.Configuration` fields for every rollout (thresholds, budget).
        tasks_per_step: Tasks per generation round; each gets `num_generations` rollouts.
        train_tasks / train_sample_seed: The training task pool: `graph.tasks.make_tasks` over
            sample images of that seed, checked disjoint (by image hash) from the held-out images.
        heldout_tasks / heldout_seed / eval_generations: The held-out set (the `eval policy` tasks of that
            seed) and the rollouts per held-out task for the before/after reward.
        validation_tasks / validation_seed / validate_every: With `validation_tasks` > 0, a third task set
            (its own seed, images checked disjoint from the other two) scores the starting policy, the
            policy every `validate_every` steps and the last one (`eval_generations` rollouts a task), and
            the run keeps the best of them for `final/` and the held-out "after" (`training.grpo_selection`).
        rejected_turn_advantage: Turn-level credit c >= 0 (ours, not TRL's): the tokens of a turn the graph
            refused get the run's advantage minus c (with ``refusal_credit: first``: the run's first refused
            turn only, with min(A, 0) - c; `training.grpo_loss`); 0 is DESIGN §6's run-level update.
        rejected_token_max_prob: With c > 0, push down only the refused turn's tokens that were sampled
            with probability below this (ours; 1.0: all of them), so the call syntax the policy was sure
            of is not pushed towards garbage (`training.grpo_loss.pushed_down_positions`).
        refusal_credit: Which turns of a run carry loss (ours): ``run`` every turn (DESIGN §6), ``first`` a
            run below its group's mean up to its first refused turn and a run above it on its accepted
            turns only, so the copies of a malformed call that follow a bad turn are context, not loss
            (`training.grpo_loss`).
        negative_advantage_scale: Factor in [0, 1] on negative advantages (ours): 1 is DESIGN §6's update,
            0 trains only on the runs above their group's mean (`training.grpo_loss`).
        trainable_layers: Train only the top N decoder layers and the final norm (None: all).
        lora_r / lora_alpha / lora_target_modules: With `lora_r`, train rank-r LoRA adapters (peft) on
            those linear layers of the top `trainable_layers` layers instead of their weights; `final/`
            is the merged model. Local backend only (the openai backend's sync sends full tensors).
        workers: Rollouts run at once (threads); the local backend serialises generation on one model.
        prefix_cache: Conversations whose attention cache the local backend keeps between turns (at
            least `workers`, or concurrent rollouts evict each other's).
        batch_generation: Local backend: decode the concurrent rollouts' replies as one batch (one
            forward pass per token for all of them) instead of one at a time.
        save_steps: Save a checkpoint every N optimizer steps (and at the end); `--resume` continues it.
        time_limit_s: Stop training (not the final evaluation; validations count as training) before a step
            that is expected to end past this many seconds of training plus one validation (the step
            forecast: the larger of the mean step and the mean of the last three).
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
    rejected_turn_advantage: float = 0.0
    rejected_token_max_prob: float = 1.0
    refusal_credit: str = "run"
    negative_advantage_scale: float = 1.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    max_completion_length: int = 160
    seed: int = 0
    # Tasks
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
    # Rewards
    reward_task: float = 1.0
    reward_reflection: float = 1.0
    reward_behaviour: float = 0.5
    mask_iou_weight: float = 0.0
    over_budget_penalty: float = 0.1
    repeated_call_penalty: float = 0.1
    # Update guard (training.grpo_guard): probes per forced call (0: off), halvings before an update is undone
    guard_probes_per_tool: int = 0
    guard_backtracks: int = 2
    # Runtime
    trainable_layers: int | None = 4
    lora_r: int | None = None
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    workers: int = 4
    prefix_cache: int = 8
    batch_generation: bool = True
    save_steps: int = 2
    time_limit_s: float | None = None
    num_threads: int | None = None
    evaluate_before_after: bool = True

    def __post_init__(self) -> None:
        if self.rollout_backend not in ("local", "openai"):
            raise GRPOConfigError(f"rollout_backend must be local or openai, not {self.rollout_backend!r}")
        if self.rollout_backend == "openai" and not self.base_url:
            raise GRPOConfigError("rollout_backend openai needs base_url (http://HOST:PORT/v1 of vLLM or serve-policy)")
        if self.weight_sync not in ("serve-policy", "vllm", "none"):
            raise GRPOConfigError(f"weight_sync must be serve-policy, vllm or none, not {self.weight_sync!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise GRPOConfigError(f"scale_rewards must be group, batch or none, not {self.scale_rewards!r}")
        if self.rejected_turn_advantage < 0:
            raise GRPOConfigError(f"rejected_turn_advantage must be >= 0 (a push down on refused turns), not {self.rejected_turn_advantage}")
        if not 0.0 < self.rejected_token_max_prob <= 1.0:
            raise GRPOConfigError(f"rejected_token_max_prob must be in (0, 1], not {self.rejected_token_max_prob}")
        if self.refusal_credit not in ("run", "first"):
            raise GRPOConfigError(f"refusal_credit must be run or first, not {self.refusal_credit!r}")
        if not 0.0 <= self.negative_advantage_scale <= 1.0:
            raise GRPOConfigError(f"negative_advantage_scale must be in [0, 1], not {self.negative_advantage_scale}")
        if self.lora_r is not None and self.lora_r < 1:
            raise GRPOConfigError(f"lora_r must be a positive rank or unset, not {self.lora_r}")
        if self.lora_r and self.rollout_backend == "openai":
            raise GRPOConfigError("lora_r needs rollout_backend local: the openai weight sync sends full tensors, not adapters")
        if self.guard_probes_per_tool < 0 or self.guard_backtracks < 0:
            raise GRPOConfigError("guard_probes_per_tool and guard_backtracks must be >= 0")
        if self.validation_tasks < 0 or self.validate_every < 1:
            raise GRPOConfigError("validation_tasks must be >= 0 and validate_every >= 1")
        if self.validation_tasks and self.validation_seed in (self.heldout_seed, self.train_sample_seed):
            raise GRPOConfigError("validation_seed must differ from heldout_seed and train_sample_seed (its images "
                                  "would be the held-out or training ones)")
        if self.num_generations < 2:
            raise GRPOConfigError("num_generations must be at least 2: advantages are relative to the group")
        from graph.configuration import Configuration

        unknown = sorted(set(self.graph) - set(Configuration.model_fields))
        if unknown:
            raise GRPOConfigError(f"graph has unknown configuration keys: {', '.join(unknown)}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "GRPOJobConfig":
        """Read a YAML mapping of the fields above (None overrides are skipped).

        Raises:
            GRPOConfigError: the file is missing or not a mapping, or a key is unknown.
        """
        from training.job_config import load_job_yaml

        return load_job_yaml(cls, path, overrides, required=("output_dir",), error=GRPOConfigError, what="GRPO")

    @property
    def weights(self) -> RewardWeights:
        return RewardWeights(task=self.reward_task, reflection=self.reward_reflection, behaviour=self.reward_behaviour,
                             mask_iou_weight=self.mask_iou_weight, over_budget_penalty=self.over_budget_penalty,
                             repeated_call_penalty=self.repeated_call_penalty)

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
