"""GRPO's update: group-relative advantages, training sequences from recorded turns, and the clipped loss.

The formulas are TRL 1.16's (`trl.trainer.grpo_trainer.GRPOTrainer`):

* advantages (``_generate_and_score_completions``, ``scale_rewards="group"``):
  ``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)``; a group whose rewards are all equal has no
  signal and is dropped (DESIGN §6) instead of being trained on with A = 0.
* per-token loss (``_compute_loss``, token-level importance sampling, two-sided clip):
  ``ratio = exp(logp - old_logp)``, ``loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``
  ``+ beta * KL_t`` with the k3 estimator ``KL_t = exp(ref_logp - logp) - (ref_logp - logp) - 1``.
* aggregation (``loss_type="dapo"``): the sum of ``loss_t`` over every policy token of the update divided
  by the number of those tokens, so long and short turns weigh per token.

Only the policy's own tokens carry loss; prompts, tool observations and the template's text are context.
Log-probabilities are taken at temperature 1 from the raw logits, as the sampler's are recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.grpo_rollouts import Rollout, Turn

ADV_EPS = 1e-4


@dataclass
class Sequence:
    """One forward pass worth of a rollout: ids, where the policy's tokens are, their old logprobs, A."""

    ids: list[int]
    positions: list[int]
    old_logprobs: list[float] | None
    advantage: float


def group_advantages(rewards: list[float]) -> list[float] | None:
    """(r - mean) / (std + 1e-4) within a group; None when the group has no spread (dropped)."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1))
    if std < 1e-6:
        return None
    return [(r - mean) / (std + ADV_EPS) for r in rewards]


def build_sequences(turns: list[Turn], advantage: float) -> list[Sequence]:
    """The turns of one rollout as few sequences as their token ids allow.

    A turn whose prompt starts with the previous sequence (previous prompt + what was generated) is
    appended to it, so a rollout is usually one forward pass; when the chat template re-rendered the
    earlier reply differently (another tokenisation of the same text), a new sequence starts from the
    turn's own prompt, so every generated token is scored in exactly the context it was sampled in.
    """
    out: list[Sequence] = []
    current: Sequence | None = None
    for turn in turns:
        if current is not None and turn.prompt_ids[: len(current.ids)] == current.ids and len(turn.prompt_ids) >= len(current.ids):
            ids = list(turn.prompt_ids)
        else:
            current = Sequence([], [], [] if turn.logprobs is not None else None, advantage)
            out.append(current)
            ids = list(turn.prompt_ids)
        start = len(ids)
        current.ids = ids + list(turn.token_ids)
        current.positions.extend(range(start, start + len(turn.token_ids)))
        if current.old_logprobs is not None and turn.logprobs is not None:
            current.old_logprobs.extend(turn.logprobs)
        else:
            current.old_logprobs = None
    return out


def rollout_sequences(groups: list[list[Rollout]]) -> tuple[list[Sequence], int]:
    """Training sequences of every group with signal, and the number of groups dropped for zero spread."""
    sequences: list[Sequence] = []
    dropped = 0
    for group in groups:
        advantages = group_advantages([r.reward.total for r in group])
        if advantages is None:
            dropped += 1
            continue
        for rollout, advantage in zip(group, advantages):
            sequences.extend(build_sequences(rollout.turns, advantage))
    return sequences, dropped


def token_logprobs(model: Any, ids: list[int], positions: list[int]) -> Any:
    """log p(ids[p] | ids[:p]) for each p in `positions` (raw logits, temperature 1).

    Only the scored positions go through the LM head (a 49k-word head over every position would cost
    more than the top layers).
    """
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    index = torch.tensor(positions, dtype=torch.long)
    logits = model.get_output_embeddings()(hidden[index - 1]).float()
    return torch.log_softmax(logits, dim=-1).gather(1, input_ids[0, index].unsqueeze(1)).squeeze(1)


def per_token_loss(logp: Any, old_logp: Any, ref_logp: Any | None, advantage: float, *, beta: float,
                   epsilon: float) -> tuple[Any, Any, Any]:
    """(loss per token, KL per token, clipped flags) - TRL's token-level clipped surrogate + beta * k3 KL."""
    import torch

    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantage, clipped_ratio * advantage)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss = loss + beta * kl
    clipped = (ratio * advantage > clipped_ratio * advantage).detach()
    return loss, kl.detach(), clipped


def accumulate_gradients(model: Any, ref: Any | None, sequences: list[Sequence], *, beta: float, epsilon: float,
                         progress: bool = False) -> dict[str, float]:
    """Backward the dapo-normalised loss of `sequences` into the model's grads (one sequence at a time).

    Returns:
        loss (the update's value), kl and clip_fraction (token means), tokens.
    """
    import torch

    tokens = sum(len(s.positions) for s in sequences)
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    if not tokens:
        return {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "tokens": 0}
    iterator: Any = sequences
    if progress:
        from tqdm import tqdm

        iterator = tqdm(sequences, desc="update", unit="seq", leave=False)
    for seq in iterator:
        ref_logp = None
        if ref is not None and beta != 0.0:
            with torch.no_grad():
                ref_logp = token_logprobs(ref, seq.ids, seq.positions)
        logp = token_logprobs(model, seq.ids, seq.positions)
        old = torch.tensor(seq.old_logprobs) if seq.old_logprobs is not None else logp.detach()
        loss, kl, clipped = per_token_loss(logp, old, ref_logp, seq.advantage, beta=beta, epsilon=epsilon)
        (loss.sum() / tokens).backward()
        totals["loss"] += float(loss.detach().sum())
        totals["kl"] += float(kl.sum())
        totals["clipped"] += float(clipped.float().sum())
    return {"loss": totals["loss"] / tokens, "kl": totals["kl"] / tokens, "clip_fraction": totals["clipped"] / tokens,
            "tokens": tokens}
