"""The callbacks of `training.grpo.GRPOTrainer`, in the shape of TRL's `TrainerCallback`.

Why callbacks: the loop itself is rollouts -> update -> log; the update guard, the time limit, the
validation that selects the kept policy and the weight sync each hook into it at a named point, so each
can be read, tested and switched off on its own. Every hook receives the trainer; the step hooks also get
its `control` (TRL's `TrainerControl`: flags that tell the loop to validate, save or stop).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from training.grpo_guard import UpdateGuard

#: The `training.grpo.GRPOTrainer` a hook is called with (not imported: the trainer imports this module).
GRPOTrainer = Any

logger = logging.getLogger(__name__)


def expected_step_seconds(history: list[dict[str, Any]], recent: int = 3) -> float:
    """The forecast of the next step's wall time: the larger of the mean of all steps and of the last `recent`.

    Why not the plain mean: steps grow when the policy's runs get longer (a looping policy makes more
    turns per rollout), and the mean of all steps then starts a step that ends past the limit. Taking the
    recent mean when it is larger keeps a growing run inside its limit; a run whose steps do not grow loses
    at most the step that a few long steps in a row make look too long.
    """
    if not history:
        return 0.0
    seconds = [row["seconds"] for row in history]
    return max(sum(seconds) / len(seconds), sum(seconds[-recent:]) / len(seconds[-recent:]))


def next_step_fits(train_seconds: float, history: list[dict[str, Any]], limit_s: float | None) -> bool:
    """Whether one more step is expected to end within `limit_s` seconds of training.

    Why predict instead of stopping once the limit is crossed: a CPU step takes minutes, so stopping after
    the crossing overruns the limit by up to a whole step. `expected_step_seconds` is the forecast; a long
    step still overruns by its excess over the forecast, not by a whole step.
    """
    return limit_s is None or train_seconds + expected_step_seconds(history) <= limit_s


@dataclass
class TrainerControl:
    """What the loop does after a step (TRL's `TrainerControl`); reset at the start of every step."""

    should_validate: bool = False
    should_save: bool = False
    should_training_stop: bool = False
    stopped_by_time_limit: bool = False


class GRPOCallback:
    """Hooks into `GRPOTrainer`'s loop; every hook does nothing unless overridden."""

    def on_train_begin(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        """After setup, a resumed checkpoint and the held-out "before" evaluation, before the first step."""

    def on_rollouts_end(self, trainer: GRPOTrainer, groups: list[list[Any]]) -> None:
        """After a step's rollouts are scored, before its update."""

    def on_update_begin(self, trainer: GRPOTrainer, steps_optimizer: bool) -> None:
        """Just before the update; `steps_optimizer` says whether it will change the weights."""

    def on_update_end(self, trainer: GRPOTrainer, update: dict[str, Any]) -> None:
        """After the update; fields added to `update` are logged in the step's row."""

    def on_step_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        """After the step is logged; set `control` flags here."""

    def on_train_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        """After the last step, before the kept policy is chosen and evaluated."""


class GuardCallback(GRPOCallback):
    """Line-search each update against probes of the protocol's forced moves (`training.grpo_guard`)."""

    def __init__(self, guard: UpdateGuard) -> None:
        self.guard = guard
        self._probes_added = 0
        self._before: Any = None
        self._seconds = 0.0

    def on_rollouts_end(self, trainer: GRPOTrainer, groups: list[list[Any]]) -> None:
        started = time.perf_counter()
        self._probes_added = self.guard.add_probes(groups)
        self._seconds = time.perf_counter() - started

    def on_update_begin(self, trainer: GRPOTrainer, steps_optimizer: bool) -> None:
        started = time.perf_counter()
        self._before = self.guard.snapshot(trainer.optimizer) if steps_optimizer else None
        self._seconds += time.perf_counter() - started

    def on_update_end(self, trainer: GRPOTrainer, update: dict[str, Any]) -> None:
        if not self.guard.enabled:
            return
        started = time.perf_counter()
        update.update(self.guard.check(trainer.optimizer, self._before), probes_added=self._probes_added)
        update["guard_seconds"] = round(self._seconds + time.perf_counter() - started, 2)


class WeightSyncCallback(GRPOCallback):
    """Keep the rollout engine on the trained weights: flush the local engine's prefix cache after an update
    (its keys were computed by the old weights), or send the weights to the openai backend's server."""

    def on_update_end(self, trainer: GRPOTrainer, update: dict[str, Any]) -> None:
        if trainer.local is not None and "grad_norm" in update:
            trainer.flush_rollout_cache()

    def on_step_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        if trainer.config.rollout_backend == "openai" and trainer.config.weight_sync != "none":
            trainer.sync_weights()


class TimeLimitCallback(GRPOCallback):
    """Stop before a step that is expected to end past `time_limit_s` of training plus one validation."""

    def on_step_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        # the last validation's time is reserved, so the one after the last step still fits the limit
        if not next_step_fits(trainer.train_seconds() + trainer.selector.last_seconds(), trainer.state["history"],
                              trainer.config.time_limit_s):
            control.should_training_stop = control.stopped_by_time_limit = True


class SelectionCallback(GRPOCallback):
    """Score the policy on the validation tasks at the start, every `validate_every` steps and at the end,
    and keep the best one (`training.grpo_selection`)."""

    def on_train_begin(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        if trainer.validation and trainer.selector.last_step() is None:
            trainer.validate(0)

    def on_step_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        step = trainer.state["step"]
        if trainer.validation and (step % trainer.config.tasks.validate_every == 0 or step == trainer.trl_args.max_steps
                                   or control.should_training_stop):
            control.should_validate = True

    def on_train_end(self, trainer: GRPOTrainer, control: TrainerControl) -> None:
        if trainer.validation and trainer.selector.last_step() != trainer.state["step"]:
            trainer.validate(trainer.state["step"])  # stopped early: the last policy is a candidate too
        selected = trainer.selector.restore_best(trainer.model)
        if selected is not None:
            logger.info("selected the policy after step %s of %d (validation reward %.3f)", selected,
                        trainer.state["step"], trainer.selector.best_reward)
            if trainer.local is not None:
                trainer.flush_rollout_cache()
