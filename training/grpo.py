"""`anomaly-agent train grpo`: GRPO of a policy from groups of its own rollouts through the real graph (DESIGN §6).

`GRPOTrainer` runs the steps in TRL's trainer shape; one step:
1. `rollout`: `tasks.tasks_per_step` training tasks x `num_generations` runs through
   `graph.graph.build_graph` at `temperature` (`training.grpo_rollouts`), each scored by the named reward
   functions (`training.grpo_rewards.reward_functions`);
2. `update`: group-relative advantages, zero-spread groups dropped, the clipped surrogate + beta * KL to a
   frozen copy of the starting policy on the policy's tokens only (`training.grpo_loss`), gradients
   accumulated over `gradient_accumulation_steps` rounds, clipped to `max_grad_norm`, AdamW;
3. log a row to ``rewards.jsonl`` (reward mean/std, each component, loss, KL, clip fraction, seconds) and
   redraw ``reward_curve.png``; every `save_steps` `save` ``checkpoint/`` (trained tensors, optimizer,
   state), which ``--resume`` continues from.
The callbacks (`training.grpo_callbacks`) hook into it: the update guard line-searches an update against
probes of the protocol's forced moves, the weight sync keeps the rollout engine on the trained weights,
the time limit stops before a step that would end past it, and the selection validates and keeps the
best policy.

Before the first and after the last step the mean reward on the held-out tasks (the `eval policy` tasks
of `heldout_seed`, never trained on: training images are checked disjoint by content hash) is measured
with `eval_generations` rollouts each, and the last line the CLI prints is
``grpo reward_before <a> reward_after <b>``.

The local backend trains the very model object the graph's `local` policy generates with (models are
cached per path), so rollouts after an update use the updated weights with no copy or reload.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tools.imaging import write_text_atomic
from training.grpo_callbacks import (GRPOCallback, GuardCallback, SelectionCallback, TimeLimitCallback, TrainerControl,
                                     WeightSyncCallback, expected_step_seconds, next_step_fits)
from training.grpo_config import GRPOConfigError, GRPOJobConfig
from training.grpo_guard import UpdateGuard
from training.grpo_loss import accumulate_gradients, rollout_sequences
from training.grpo_rollouts import paired_difference, reward_summary, run_groups
from training.grpo_selection import CheckpointSelector, trained_parameters

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TRAINED_FILE = "trained.safetensors"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
STEPS_FILE = "rewards.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CURVE_FILE = "reward_curve.png"
SUMMARY_FILE = "grpo_summary.json"
VALIDATION_FILE = "validation.jsonl"
FINAL = "final"


def make_task_sets(config: GRPOJobConfig, folder: Path) -> tuple[list[Any], list[Any]]:
    """(training tasks, held-out tasks); raises if a training image is a held-out image."""
    from graph.tasks import make_tasks
    from training.data import check_disjoint, eval_image_hashes

    if config.tasks.train_sample_seed == config.tasks.heldout_seed:
        raise GRPOConfigError("train_sample_seed must differ from heldout_seed (the held-out images come from it)")
    heldout = make_tasks(folder / "heldout", config.tasks.heldout_tasks, seed=config.tasks.heldout_seed, size=config.tasks.image_size)
    train = make_tasks(folder / "train", config.tasks.train_tasks, seed=config.tasks.train_sample_seed, size=config.tasks.image_size)
    kept_out = (config.tasks.heldout_seed, config.tasks.validation_seed) if config.tasks.validation_tasks else (config.tasks.heldout_seed,)
    check_disjoint(sorted({Path(t.image) for t in train}), eval_image_hashes(config.tasks.image_size, kept_out))
    return train, heldout


def make_validation_tasks(config: GRPOJobConfig, folder: Path) -> list[Any]:
    """The validation tasks (none when `validation_tasks` is 0); raises if an image is a held-out one."""
    from graph.tasks import make_tasks
    from training.data import check_disjoint, eval_image_hashes

    if not config.tasks.validation_tasks:
        return []
    tasks = make_tasks(folder / "validation", config.tasks.validation_tasks, seed=config.tasks.validation_seed,
                       size=config.tasks.image_size)
    check_disjoint(sorted({Path(t.image) for t in tasks}), eval_image_hashes(config.tasks.image_size, (config.tasks.heldout_seed,)))
    return tasks


def load_policy(config: GRPOJobConfig) -> tuple[Any, Any]:
    """(the model to train, the LocalModel the rollouts use or None for the openai backend)."""
    from graph.inference import load_local_model

    local = load_local_model(config.model)
    if config.rollout_backend == "local":
        local.enable_prefix_cache(config.prefix_cache)
        local.enable_batching(config.batch_generation)
        return local.model, local
    return copy.deepcopy(local.model), None  # the server generates; this copy only trains


def save_checkpoint(folder: Path, model: Any, optimizer: Any, state: dict[str, Any],
                    selector: CheckpointSelector | None = None) -> Path:
    """Write the trained tensors, the optimizer, the trainer state and the validation's best policy so far;
    the folder is replaced atomically."""
    import torch
    from safetensors.torch import save_file

    work = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in trained_parameters(model).items()}, str(work / TRAINED_FILE))
    torch.save(optimizer.state_dict(), work / OPTIMIZER_FILE)
    selection = selector.save(work) if selector is not None and selector.history else None
    (work / STATE_FILE).write_text(json.dumps({**state, "selection": selection}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return folder


def load_checkpoint(folder: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote; returns the trainer state (next step, history, before)."""
    import torch
    from safetensors.torch import load_file

    if not (folder / STATE_FILE).is_file():
        raise GRPOConfigError(f"--resume: no checkpoint in {folder}")
    model.load_state_dict(load_file(str(folder / TRAINED_FILE)), strict=False)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=False))
    return json.loads((folder / STATE_FILE).read_text())


def evaluate(config: GRPOJobConfig, tasks: list[Any], out: Path, label: str, progress: bool) -> dict[str, Any]:
    """The held-out reward: `eval_generations` rollouts per task, summarised with their spread.

    The same tasks and run seeds before and after training, so the two means are paired samples.
    """
    groups = run_groups(tasks, config.tasks.eval_generations, config.graph_overrides(), out / "runs" / label, config.rewards,
                        workers=config.workers, progress=progress, desc=f"held-out {label}")
    summary = reward_summary(groups)
    _append_jsonl(out / f"heldout_{label}.jsonl", [r.log_row() for g in groups for r in g])
    logger.info("held-out %s: reward %.3f (std %.3f, within-group std %.3f)", label, summary["reward_mean"],
                summary["reward_std"], summary["group_std_mean"])
    return summary


def validate(config: GRPOJobConfig, tasks: list[Any], out: Path, step: int, local: Any | None,
             selector: CheckpointSelector, model: Any, progress: bool) -> None:
    """Score the policy after `step` updates on the validation tasks and offer it to the selector.

    The rows go to ``validation.jsonl`` with their step; the same tasks and run seeds every time, so the
    policies are compared on paired rollouts.
    """
    t0 = time.perf_counter()
    groups = run_groups(tasks, config.tasks.eval_generations, config.graph_overrides(), out / "runs" / "validation",
                        config.rewards, workers=config.workers, progress=progress, desc=f"validation after step {step}")
    shutil.rmtree(out / "runs" / "validation", ignore_errors=True)
    if local is not None:  # its caches would be reused across policies otherwise
        local.clear_prefix_cache()
    summary = reward_summary(groups)
    improved = selector.offer(step, summary, model, seconds=time.perf_counter() - t0)
    _append_jsonl(out / VALIDATION_FILE, [{"step": step, **r.log_row()} for g in groups for r in g])
    logger.info("validation after step %d: reward %.3f (std %.3f)%s, %.0fs", step, summary["reward_mean"],
                summary["reward_std"], ", the best so far" if improved else f"; best: step {selector.best_step}",
                selector.last_seconds())


class GRPOTrainer:
    """GRPO through the agent graph, in TRL's trainer shape: `rollout`, `update`, `evaluate`, `validate` and
    `save` steps, and callbacks (`training.grpo_callbacks`) for the update guard, the validation that keeps
    the best policy, the time limit and the weight sync.

    Args:
        config: The run.
        callbacks: The hooks into the loop; None: `default_callbacks`.
        progress: Progress bars on stderr.
    """

    def __init__(self, config: GRPOJobConfig, *, callbacks: list[GRPOCallback] | None = None,
                 progress: bool = False) -> None:
        import torch

        from graph.inference import load_local_model
        from training.sft import count_parameters, freeze_for_training

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.config = config
        self.progress = progress
        self.trl_args = config.to_trl()  # TRL's GRPOConfig validates and holds the optimisation fields
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.local = load_policy(config)
        self.ref = None
        if self.trl_args.beta != 0.0:
            self.ref = copy.deepcopy(self.model).eval()
            for parameter in self.ref.parameters():
                parameter.requires_grad = False
        self.adapters = add_lora(self.model, config) if config.lora.r else None
        self.parameters = (freeze_for_training(self.model, config.trainable_layers, False) if self.adapters is None
                           else count_parameters(self.model))
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=self.trl_args.learning_rate, weight_decay=self.trl_args.weight_decay)
        self.train_tasks, self.heldout = make_task_sets(config, self.out / "tasks")
        self.guard = UpdateGuard(self.model, load_local_model(config.model).tokenizer, config.guard.probes_per_tool,
                                 config.guard.backtracks)
        self.validation = make_validation_tasks(config, self.out / "tasks")
        self.selector = CheckpointSelector()
        self.state: dict[str, Any] = {"step": 0, "history": [], "before": None, "train_seconds": 0.0}
        self.callbacks = default_callbacks(self.guard) if callbacks is None else callbacks
        self._train_started = 0.0

    # ----------------------------------------------------------------------------------------- steps

    def rollout(self, step: int) -> list[list[Any]]:
        """The step's groups: `num_generations` scored rollouts of each of its `tasks_per_step` training tasks."""
        config = self.config
        tasks = [self.train_tasks[(step * config.tasks.tasks_per_step + j) % len(self.train_tasks)]
                 for j in range(config.tasks.tasks_per_step)]
        run_dir = self.out / "runs" / f"step{step:04d}"
        groups = run_groups(tasks, self.trl_args.num_generations, config.graph_overrides(), run_dir, config.rewards,
                            workers=config.workers, progress=self.progress, desc=f"step {step + 1} rollouts")
        shutil.rmtree(run_dir, ignore_errors=True)  # images of finished rollouts are not needed again
        return groups

    def update(self, step: int, groups: list[list[Any]]) -> tuple[dict[str, Any], list[Any], int]:
        """Advantages, then `policy_update` between the guard's hooks; returns (update fields, sequences, dropped)."""
        config, gas = self.config, self.trl_args.gradient_accumulation_steps
        sequences, dropped = rollout_sequences(groups, config.scale_rewards, config.credit.rejected_turn_advantage,
                                               config.credit.refusal_credit, config.credit.negative_advantage_scale,
                                               config.credit.rejected_token_max_prob)
        self._call("on_rollouts_end", groups)
        steps_optimizer = bool(sequences) and ((step + 1) % gas == 0 or self.trl_args.num_iterations > 1)
        self._call("on_update_begin", steps_optimizer)
        update = policy_update(self.model, self.ref, self.optimizer, sequences, self.trl_args,
                               apply=(step + 1) % gas == 0, progress=self.progress)
        self._call("on_update_end", update)
        return update, sequences, dropped

    def evaluate(self, label: str) -> dict[str, Any]:
        """The held-out reward of the current policy (`evaluate`)."""
        return evaluate(self.config, self.heldout, self.out, label, self.progress)

    def validate(self, step: int) -> None:
        """Score the current policy on the validation tasks and offer it to the selector (`validate`)."""
        validate(self.config, self.validation, self.out, step, self.local, self.selector, self.model, self.progress)

    def save(self) -> Path:
        """The checkpoint ``--resume`` continues from."""
        return save_checkpoint(self.out / CHECKPOINT, self.model, self.optimizer,
                               {**self.state, "guard_probes": self.guard.probe_records()}, self.selector)

    def save_final(self) -> Path:
        """The kept policy as a full model folder (adapters merged)."""
        _save_final(self.model if self.adapters is None else merged_copy(self.adapters), self.config, self.out / FINAL)
        return self.out / FINAL

    def flush_rollout_cache(self) -> None:
        """Drop the local engine's kept conversations (their attention keys belong to other weights)."""
        if self.local is not None:
            self.local.clear_prefix_cache()

    def sync_weights(self) -> None:
        """Send the trained weights to the openai backend's server."""
        from training.grpo_sync import sync_weights

        sync_weights(self.config, self.model, self.out / "sync")

    def train_seconds(self) -> float:
        """Seconds of training so far, across resumes."""
        return time.perf_counter() - self._train_started

    # ------------------------------------------------------------------------------------------ loop

    def resume(self) -> None:
        """Continue from ``output_dir/checkpoint``: weights, optimizer, probes, selection and logs."""
        self.state = load_checkpoint(self.out / CHECKPOINT, self.model, self.optimizer)
        self.guard.restore(self.state.pop("guard_probes", []))
        self.selector = CheckpointSelector.load(self.out / CHECKPOINT, self.state.pop("selection", None))
        trim_logs_to_checkpoint(self.out, self.state["step"], before_done=self.state["before"] is not None)
        logger.info("resumed at step %d from %s", self.state["step"], self.out / CHECKPOINT)
        if self.config.rollout_backend == "openai":
            self.sync_weights()

    def train(self, *, resume: bool = False) -> dict[str, Any]:
        """Run the steps; return the summary also written to ``output_dir/grpo_summary.json``."""
        import torch

        out, state = self.out, self.state
        if resume:
            self.resume()
            state = self.state
        else:
            for name in (STEPS_FILE, ROLLOUTS_FILE, VALIDATION_FILE, "heldout_before.jsonl", "heldout_after.jsonl"):
                (out / name).unlink(missing_ok=True)
        started = time.perf_counter()
        if self.config.evaluate_before_after and state["before"] is None:
            state["before"] = self.evaluate("before")
        self._train_started = time.perf_counter() - state["train_seconds"]
        control = TrainerControl()
        self._call("on_train_begin", control)
        for step in range(state["step"], self.trl_args.max_steps):
            t0 = time.perf_counter()
            control = TrainerControl(stopped_by_time_limit=control.stopped_by_time_limit)
            groups = self.rollout(step)
            t_rollouts = time.perf_counter() - t0
            _append_jsonl(out / ROLLOUTS_FILE, [{"step": step + 1, **r.log_row()} for g in groups for r in g])
            update, sequences, dropped = self.update(step, groups)
            summary = reward_summary(groups)
            row = {"step": step + 1, **{k: round(v, 5) if isinstance(v, float) else v for k, v in summary.items()},
                   "groups_dropped": dropped, "sequences": len(sequences),
                   "pushed_down_tokens": sum(c < 0 for s in sequences for c in s.turn_credit or ()), **update,
                   "rollout_seconds": round(t_rollouts, 1), "seconds": round(time.perf_counter() - t0, 1)}
            state["history"].append(row)
            _append_jsonl(out / STEPS_FILE, [row])
            logger.info("step %d: reward %.3f +- %.3f, loss %.4f, kl %.4f, %d groups dropped, %.0fs", step + 1,
                        row["reward_mean"], row["reward_std"], update["loss"], update["kl"], dropped, row["seconds"])
            state["step"] = step + 1
            self._call("on_step_end", control)
            if control.should_validate:
                self.validate(state["step"])
            state["train_seconds"] = self.train_seconds()
            plot_reward_curve(state["history"], out / CURVE_FILE, state.get("before"), None, self.selector.history)
            if (state["step"] % self.config.save_steps == 0 or state["step"] == self.trl_args.max_steps
                    or control.should_training_stop or control.should_save):
                self.save()
            if control.should_training_stop:
                if control.stopped_by_time_limit:
                    logger.warning("time limit of %.0f s: stopping after step %d (%.0f s trained; the next step "
                                   "was forecast at %.0f s)", self.config.time_limit_s, step + 1,
                                   state["train_seconds"], expected_step_seconds(state["history"]))
                break
        self._call("on_train_end", control)
        after = self.evaluate("after") if self.config.evaluate_before_after else None
        plot_reward_curve(state["history"], out / CURVE_FILE, state.get("before"), after, self.selector.history)
        self.save_final()
        summary = {
            "model": str(self.config.model), "output_dir": str(out), "final_model": str(out / FINAL),
            "steps": state["step"], "parameters": self.parameters, "torch_threads": torch.get_num_threads(),
            "before": state.get("before"), "after": after, "history": state["history"],
            "paired": paired_difference(state["before"], after) if state.get("before") and after else None,
            "validation": self.selector.history, "selected_step": self.selector.best_step,
            "train_seconds": round(state["train_seconds"], 1),
            "stopped_by_time_limit": control.stopped_by_time_limit,
            "wall_seconds": round(time.perf_counter() - started, 1), "curve": str(out / CURVE_FILE),
            "heldout_tasks": [f"{t.category}/{t.anomaly_type}" for t in self.heldout],
            "train_tasks_used": sorted({f"{t.category}/{t.anomaly_type}" for i, t in enumerate(self.train_tasks)
                                        if i < state["step"] * self.config.tasks.tasks_per_step}),
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def default_callbacks(guard: UpdateGuard) -> list[GRPOCallback]:
    """The guard, weight sync, time limit and selection, in the order their hooks run."""
    return [GuardCallback(guard), WeightSyncCallback(), TimeLimitCallback(), SelectionCallback()]


def train_grpo(config: GRPOJobConfig, *, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run GRPO as configured (`GRPOTrainer`); return the summary also written to ``output_dir/grpo_summary.json``."""
    return GRPOTrainer(config, progress=progress).train(resume=resume)


def compare_policies(config: GRPOJobConfig, before_model: str, after_models: list[str], *,
                     progress: bool = False) -> dict[str, Any]:
    """The held-out reward of a policy before training and of one or more after it, on the same tasks and
    run seeds, each after-policy paired with the before one.

    Why: settings tuned by looking at one held-out set's result are no longer judged fairly by it; a
    second held-out set (another `heldout_seed`, still checked disjoint from the training images) confirms
    a before/after change, with the rollouts of `train grpo`'s own evaluation. Several runs of the same
    starting checkpoint (other task sets, other settings) share one "before" evaluation instead of
    repeating it for each (an evaluation takes minutes on a CPU).

    The first after-policy is written as ``after`` (``heldout_after.jsonl``, summary keys ``after`` and
    ``paired``), the k-th (k >= 2) as ``after<k>``; ``summary["afters"]`` lists every one in order.
    """
    import dataclasses

    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out = Path(config.output_dir)
    _, heldout = make_task_sets(config, out / "tasks")
    afters = list(after_models)
    if not afters:
        raise ValueError("compare_policies needs at least one after-policy")
    labels = ["before"] + ["after" if k == 0 else f"after{k + 1}" for k in range(len(afters))]
    results: dict[str, Any] = {}
    for label, model in zip(labels, [before_model, *afters]):
        own = dataclasses.replace(config, model=str(model), prefix_cache=max(config.prefix_cache, config.workers))
        _, local = load_policy(own)
        (out / f"heldout_{label}.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / "runs" / label, ignore_errors=True)
        results[label] = evaluate(own, heldout, out, label, progress)
        if local is not None:  # its attention caches (~3 GB at 48 conversations) would outlive it in the loader's cache
            local.enable_prefix_cache(0)
    listed = [{"label": label, "model": str(model), "result": results[label],
               "paired": paired_difference(results["before"], results[label])}
              for label, model in zip(labels[1:], afters)]
    summary = {"before_model": str(before_model), "after_model": str(afters[0]), "before": results["before"],
               "after": results["after"], "paired": listed[0]["paired"], "afters": listed,
               "heldout_seed": config.tasks.heldout_seed, "heldout_tasks": [f"{t.category}/{t.anomaly_type}" for t in heldout]}
    (out / "grpo_compare.json").write_text(json.dumps(summary, indent=1))
    return summary


def policy_update(model: Any, ref: Any | None, optimizer: Any, sequences: list[Any], trl_args: Any, *, apply: bool,
                  progress: bool = False) -> dict[str, Any]:
    """`num_iterations` passes of the clipped loss over one round's sequences, an optimizer step after each.

    Every pass keeps the sampling log-probabilities as the "old" ones, so from the second pass on the
    ratio moves and the clip bounds how far one round's data can push the policy (PPO's reuse). With
    gradient accumulation (`apply` False until the last round of an accumulation) a single pass only
    adds gradients. Returns the last pass's loss, KL, clip fraction and tokens, every pass's clip fraction,
    and the gradient norm when a step was taken.
    """
    import torch

    update: dict[str, Any] = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "tokens": 0}
    clip_fractions = []
    for _ in range(trl_args.num_iterations):
        update = accumulate_gradients(model, ref, sequences, beta=trl_args.beta, epsilon=trl_args.epsilon,
                                      progress=progress)
        clip_fractions.append(round(update["clip_fraction"], 5))
        if apply or trl_args.num_iterations > 1:
            trained = [p for p in model.parameters() if p.requires_grad]
            update["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trained, trl_args.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if trl_args.num_iterations > 1:
        update["clip_fractions"] = clip_fractions
    return update


def add_lora(model: Any, config: GRPOJobConfig) -> Any:
    """Put rank-`lora.r` LoRA adapters (peft) on the top `trainable_layers` layers, in place; returns the PeftModel.

    Why LoRA for GRPO on a small budget: AdamW moves every trained parameter by about the learning rate
    on its first steps whatever the gradient's size, so with ~10 noisy updates a full-weight update of
    even 6 layers is mostly noise (enough to break a small model's tool calls in one step). Adapters confine each step to a few hundred thousand directions and start as the
    identity (B = 0). The adapters sit inside the model object the rollouts generate with, so the next
    round samples from the updated policy; the layers below stay frozen and shared with the reference.
    """
    from peft import LoraConfig, get_peft_model

    from training.sft import _decoder_layers

    count = len(_decoder_layers(model))
    top = min(count, config.trainable_layers or count)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(config.lora.target_modules), layers_to_transform=list(range(count - top, count)))
    return get_peft_model(model, lora)


def merged_copy(adapters: Any) -> Any:
    """A plain model with the adapters merged into its weights (what `--model` and serve-policy load)."""
    return copy.deepcopy(adapters).merge_and_unload()


def _save_final(model: Any, config: GRPOJobConfig, folder: Path) -> None:
    """A full model folder (weights + tokenizer with its chat template) that `--model` and serve-policy load."""
    from transformers import AutoTokenizer

    from training.sft import resolve_model

    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(resolve_model(config.model), local_files_only=True).save_pretrained(str(folder))


def trim_logs_to_checkpoint(out: Path, step: int, *, before_done: bool) -> None:
    """Drop what an interrupted run logged after its last checkpoint, so a resume neither duplicates nor mixes rows.

    Why: steps are logged every step but checkpointed every `save_steps`; a run stopped between the two
    left rows of steps that the resumed run does again. The held-out "after" rows belong to a finished
    run only, and the "before" rows are redone when the checkpoint holds no "before" summary.
    """
    for name in (STEPS_FILE, ROLLOUTS_FILE, VALIDATION_FILE):
        path = out / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
    (out / "heldout_after.jsonl").unlink(missing_ok=True)
    if not before_done:
        (out / "heldout_before.jsonl").unlink(missing_ok=True)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def plot_reward_curve(history: list[dict[str, Any]], path: Path, before: dict[str, Any] | None,
                      after: dict[str, Any] | None, validation: list[dict[str, Any]] | None = None) -> Path | None:
    """A PNG: training reward per step (mean +- std over the step's rollouts), its components, the
    validation reward of the policies scored during the run (the kept one circled), and the held-out
    reward before and after training with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history and before is None and not validation:
        return None
    steps = [row["step"] for row in history]
    figure, (axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        mean = [row["reward_mean"] for row in history]
        std = [row["reward_std"] for row in history]
        axis.plot(steps, mean, marker="o", label="train reward (mean of G x tasks)")
        axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        for key, style in (("task", "--"), ("reflection", ":"), ("behaviour", "-.")):
            axis.plot(steps, [row[key] for row in history], style, label=key)
        loss_axis.plot(steps, [row["loss"] for row in history], marker=".", label="loss")
        loss_axis.plot(steps, [row["kl"] for row in history], marker=".", label="KL (k3)")
        loss_axis.plot(steps, [row["clip_fraction"] for row in history], marker=".", label="clip fraction")
        guarded = [row for row in history if "guard_scale" in row]
        if guarded:  # 1 = the update kept whole, 0.5 / 0.25 = halved, 0 = undone (training.grpo_guard)
            loss_axis.plot([row["step"] for row in guarded], [row["guard_scale"] for row in guarded], "x",
                           label="update kept (guard)")
    if validation:
        axis.plot([row["step"] for row in validation], [row["reward_mean"] for row in validation], "D-", color="purple",
                  label="validation reward (policy after step)")
        best = [row for row in validation if row["step"] == validation[-1]["best_step"]]
        axis.plot([row["step"] for row in best], [row["reward_mean"] for row in best], "o", markersize=14,
                  markerfacecolor="none", color="purple", label=f"kept: step {validation[-1]['best_step']}")
    after_label = "held-out after (kept policy)" if validation else "held-out after"
    after_x = (steps[-1] if steps else 0) + 1
    for label, summary, x in (("held-out before", before, 0), (after_label, after, after_x)):
        if summary:
            axis.errorbar([x], [summary["reward_mean"]], yerr=[summary["group_std_mean"]], fmt="s", capsize=4,
                          label=f"{label} {summary['reward_mean']:.3f}")
    axis.set_xlabel("step")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    loss_axis.set_xlabel("step")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=7)
    figure.suptitle("GRPO through the agent graph")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
