"""Keep the best policy of a GRPO run, judged on a validation set, instead of whatever the last step left.

Why: on the CPU a run's held-out change is small next to its noise, and a run that loses held-out
reward can go wrong late, on its own training tasks' second pass. Stopping by hand on the held-out set
would spend it; a third task set (its own sample seed, images disjoint from the training and held-out ones) scores
the starting policy and the policy every `validate_every` steps on the same tasks and run seeds, and the
run returns the best of them. The starting policy is a candidate too, so a run that only got worse
returns what it started from rather than something worse. Ties go to the earlier policy: a change has to
earn its place. What is kept is only the trained tensors (LoRA adapters: ~2 MB), in memory and in the
checkpoint folder for `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BEST_FILE = "best_trained.safetensors"


def trained_parameters(model: Any) -> dict[str, Any]:
    """The tensors the run trains (LoRA adapters or the unfrozen layers), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trained_state(model: Any) -> dict[str, Any]:
    """A detached CPU copy of `trained_parameters`."""
    return {name: p.detach().to("cpu", copy=True) for name, p in trained_parameters(model).items()}


def load_trained_state(model: Any, state: dict[str, Any]) -> None:
    """Write `state` (from `trained_state`) back into the model's trained tensors, in place."""
    import torch

    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"the kept policy has tensors the model lacks: {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


@dataclass
class CheckpointSelector:
    """The validation scores of a run's policies and the trained tensors of the best one so far."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_reward: float | None = None
    best_state: dict[str, Any] | None = None

    def offer(self, step: int, summary: dict[str, Any], model: Any, seconds: float = 0.0) -> bool:
        """Record the validation `summary` of the policy after `step` updates (it took `seconds`); keep the
        policy if strictly best."""
        reward = float(summary["reward_mean"])
        improved = self.best_reward is None or reward > self.best_reward + 1e-9
        if improved:
            self.best_step, self.best_reward, self.best_state = step, reward, trained_state(model)
        self.history.append({"step": step, "reward_mean": round(reward, 5), "reward_std": round(summary["reward_std"], 5),
                             "best_step": self.best_step, "seconds": round(seconds, 1)})
        return improved

    def last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def last_seconds(self) -> float:
        """How long the last validation took: the time a run reserves for the next one (0 before any)."""
        return self.history[-1].get("seconds", 0.0) if self.history else 0.0

    def restore_best(self, model: Any) -> int | None:
        """Put the best policy's tensors into `model`; returns its step (None when nothing was validated)."""
        if self.best_state is not None:
            load_trained_state(model, self.best_state)
        return self.best_step

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the best tensors into a checkpoint folder; returns the record for the trainer state."""
        from safetensors.torch import save_file

        if self.best_state is not None:
            save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(folder / BEST_FILE))
        return {"history": self.history, "best_step": self.best_step, "best_reward": self.best_reward}

    @classmethod
    def load(cls, folder: Path, record: dict[str, Any] | None) -> "CheckpointSelector":
        """The selector a checkpoint saved (an empty one for a checkpoint without validation)."""
        from safetensors.torch import load_file

        if not record:
            return cls()
        best = load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).is_file() else None
        return cls(history=list(record["history"]), best_step=record["best_step"], best_reward=record["best_reward"],
                   best_state=best)
