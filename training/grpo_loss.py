"""GRPO's update: group-relative advantages, training sequences from recorded turns, and the clipped loss.

The formulas are TRL 1.16's (`trl.trainer.grpo_trainer.GRPOTrainer`):

* advantages (``_generate_and_score_completions``): ``A_i = (r_i - mean(r_group)) / (std + 1e-4)`` where
  std is the group's (``scale_rewards="group"``), the whole step's (``"batch"``) or 1 (``"none"``, Dr. GRPO);
  a group whose rewards are all equal has no signal and is dropped (DESIGN §6) instead of being trained
  on with A = 0. Why not always "group": a group of four clean runs scored 10, 10, 10 and 9.8 by QE has
  a std of 0.01, and dividing by it turns QE's rounding into a full-size push against a good run.
* per-token loss (``_compute_loss``, token-level importance sampling, two-sided clip):
  ``ratio = exp(logp - old_logp)``, ``loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``
  ``+ beta * KL_t`` with the k3 estimator ``KL_t = exp(ref_logp - logp) - (ref_logp - logp) - 1``.
* aggregation (``loss_type="dapo"``): the sum of ``loss_t`` over every policy token of the update divided
  by the number of those tokens, so long and short turns weigh per token.

Only the policy's own tokens carry loss; prompts, tool observations and the template's text are context.
Log-probabilities are taken at temperature 1 from the raw logits, as the sampler's are recorded.

Turn-level credit (``rejected_turn_advantage`` c > 0, our addition to DESIGN §6's run-level advantage):
the tokens of a turn the graph turned away (an invalid call, a call answered with an error, an answer
before the mask) get ``A_run - c`` instead of ``A_run``. Why: most failed runs start with one bad sampled
turn (``quality_eval`` where ``image_gen`` belongs) and then go wrong; the run-level advantage spreads the
blame over every token of the run, most of them fine, while the graph already says which turn it refused.
With c = 0 (the default) the update is exactly DESIGN §6's. A flat group is still dropped unless one of
its runs has a refused turn; then only c pushes (its run-level advantages are 0). With
``refusal_credit="first"`` only a run's first refused turn is pushed down, and with ``min(A_run, 0) - c``:
the copies that follow it are consequences, and a run above its group's mean does not lift its own
refusal. ``rejected_token_max_prob`` p < 1 narrows the push-down to the tokens sampled with probability
below p (`pushed_down_positions` says why). Why push refusals down at all: with only the runs above
their group's mean trained, nothing in the update lowers a malformed call, so sampling can write more of
them after training.

Refusal-aware token selection (``refusal_credit="first"``, ours): which turns of a run carry loss.
A run with A < 0 trains on its turns up to and including the first refused one; the turns after it stay
context. A run with A > 0 trains on its accepted turns only. Why: a failed run is usually one bad sampled
turn followed by the model copying its own malformed call, nesting it deeper each turn (seen in the
held-out traces: eight refused ``{"name": "image_gen", "arguments": {"name": ...`` turns after one missing
comma). Under token-level normalisation those copies, which the model already expects (much likelier
than the first bad turn), outweigh the turn that went wrong; most of their tokens are valid call syntax
(``"image": 2}``). And a run that ended early without a mask beats a garbage loop in its group, so
``"run"`` pushes its early final answer up; here a refused turn in a run above its group's mean is never
pushed up.
A turn whose call repeats an earlier quality_eval, mask_gen or knowledge_retrieval exactly (`Turn.repeats`)
counts as refused here: the repeat penalty lowers the run's reward, but in a group where every run loops,
the run that loops least is above the mean, and training all its accepted turns would push its repeated
calls up too.
``"run"`` (the default) trains every token on the run's advantage, DESIGN §6's update.

Asymmetric advantages (``negative_advantage_scale`` s in [0, 1], ours; 1 = DESIGN §6): a run below its
group's mean gets ``s * A``, so s = 0 trains only on the runs that beat their group (RAFT++-like
self-imitation, Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning"). Why: raising the
likelihood of the policy's own better samples keeps it near itself, while pushing a sampled token down
moves its mass to every other token, garbage included, which a small model's first turns show first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
    turn_credit: list[float] | None = None  # per position: added to `advantage` (-c on refused turns)

    def advantages(self) -> list[float]:
        """The advantage of each policy token (`positions` order)."""
        if self.turn_credit is None:
            return [self.advantage] * len(self.positions)
        return [self.advantage + c for c in self.turn_credit]


SCALE_REWARDS = ("group", "batch", "none")
REFUSAL_CREDITS = ("run", "first")


def turn_advantages(turns: list[Turn], advantage: float, refusal_credit: str = "run",
                    rejected_turn_advantage: float = 0.0) -> list[float | None]:
    """Each turn's advantage, or None where the turn is context only (module doc: turn-level credit and
    refusal-aware selection)."""
    c = rejected_turn_advantage
    if refusal_credit == "run":
        return [advantage - (0.0 if turn.accepted else c) for turn in turns]
    first_refused = next((i for i, turn in enumerate(turns) if not turn.accepted or turn.repeats), len(turns))
    first_invalid = next((i for i, turn in enumerate(turns) if not turn.accepted), None)
    out: list[float | None] = [None] * len(turns)
    if advantage > 0:
        out = [advantage if turn.accepted and not turn.repeats else None for turn in turns]
    elif advantage < 0:
        out = [advantage if i <= first_refused else None for i in range(len(turns))]
    elif c == 0:  # a run exactly at its group's mean: its tokens carry the KL term only
        out = [0.0] * len(turns)
    if c > 0 and first_invalid is not None:
        out[first_invalid] = min(advantage, 0.0) - c
    return out


def pushed_down_positions(turn: Turn, max_prob: float) -> list[int]:
    """Indexes of a refused turn's tokens that its push-down applies to: those sampled below `max_prob`.

    Why: a malformed call is a few sampled choices off the policy's mode (a nested ``{"name"`` where the
    arguments belong, a stop token before the call) followed by tokens it was sure of. Lowering a token
    moves its mass to the others in proportion to their probability: for an unlikely choice that is mostly
    the mode, the valid call; for a near-certain continuation it is whatever came second, usually garbage.
    Without recorded log-probabilities (or with `max_prob` >= 1) every token is pushed down.
    """
    if max_prob >= 1.0 or turn.logprobs is None:
        return list(range(len(turn.token_ids)))
    bound = math.log(max_prob)
    return [i for i, logprob in enumerate(turn.logprobs) if logprob < bound]


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def group_advantages(rewards: list[float], scale: float | None = None) -> list[float] | None:
    """(r - group mean) / (scale + 1e-4), `scale` defaulting to the group's std; None for a flat group (dropped)."""
    mean = sum(rewards) / len(rewards)
    std = _std(rewards)
    if std < 1e-6:
        return None
    return [(r - mean) / ((std if scale is None else scale) + ADV_EPS) for r in rewards]


def build_sequences(turns: list[Turn], advantage: float, rejected_turn_advantage: float = 0.0,
                    refusal_credit: str = "run", rejected_token_max_prob: float = 1.0) -> list[Sequence]:
    """The turns of one rollout as few sequences as their token ids allow.

    A turn whose prompt starts with the previous sequence (previous prompt + what was generated) is
    appended to it, so a rollout is usually one forward pass; when the chat template re-rendered the
    earlier reply differently (another tokenisation of the same text), a new sequence starts from the
    turn's own prompt, so every generated token is scored in exactly the context it was sampled in.
    Each turn's tokens carry its `turn_advantages` (None: context only); a refused turn pushed down
    carries it on its `pushed_down_positions` only. A sequence left with no policy token is not returned.
    """
    out: list[Sequence] = []
    current: Sequence | None = None
    credit = rejected_turn_advantage > 0
    for turn, turn_advantage in zip(turns, turn_advantages(turns, advantage, refusal_credit, rejected_turn_advantage)):
        if current is not None and turn.prompt_ids[: len(current.ids)] == current.ids and len(turn.prompt_ids) >= len(current.ids):
            ids = list(turn.prompt_ids)
        else:
            current = Sequence([], [], [] if turn.logprobs is not None else None, advantage, [] if credit else None)
            out.append(current)
            ids = list(turn.prompt_ids)
        start = len(ids)
        current.ids = ids + list(turn.token_ids)
        if turn_advantage is None:
            continue
        kept = (pushed_down_positions(turn, rejected_token_max_prob) if credit and not turn.accepted
                else list(range(len(turn.token_ids))))
        current.positions.extend(start + i for i in kept)
        if current.turn_credit is not None:
            current.turn_credit.extend([turn_advantage - advantage] * len(kept))
        if current.old_logprobs is not None and turn.logprobs is not None:
            current.old_logprobs.extend(turn.logprobs[i] for i in kept)
        else:
            current.old_logprobs = None
    return [sequence for sequence in out if sequence.positions]


def rollout_sequences(groups: list[list[Rollout]], scale_rewards: str = "group",
                      rejected_turn_advantage: float = 0.0, refusal_credit: str = "run",
                      negative_advantage_scale: float = 1.0,
                      rejected_token_max_prob: float = 1.0) -> tuple[list[Sequence], int]:
    """Training sequences of every group with signal, and the number of groups dropped for zero spread.

    With `rejected_turn_advantage` > 0, refused turns carry signal of their own (module doc), so a flat
    group is kept when one of its runs has a refused turn. A negative advantage is multiplied by
    `negative_advantage_scale` (module doc); a run it zeroes is not trained on at all.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, not {scale_rewards!r}")
    if refusal_credit not in REFUSAL_CREDITS:
        raise ValueError(f"refusal_credit must be one of {', '.join(REFUSAL_CREDITS)}, not {refusal_credit!r}")
    everything = [r.reward.total for g in groups for r in g]
    scale = {"group": None, "batch": _std(everything) if len(everything) > 1 else 1.0, "none": 1.0}[scale_rewards]
    sequences: list[Sequence] = []
    dropped = 0
    for group in groups:
        advantages = group_advantages([r.reward.total for r in group], scale)
        if advantages is None:
            refused = rejected_turn_advantage > 0 and any(r.rejected_turns for r in group)
            if not refused:
                dropped += 1
                continue
            advantages = [0.0] * len(group)
        for rollout, advantage in zip(group, advantages):
            if advantage < 0:
                advantage *= negative_advantage_scale
                if advantage == 0 and rejected_turn_advantage == 0:
                    continue
            sequences.extend(build_sequences(rollout.turns, advantage, rejected_turn_advantage, refusal_credit,
                                             rejected_token_max_prob))
    return sequences, dropped


def token_logprobs(model: Any, ids: list[int], positions: list[int]) -> Any:
    """log p(ids[p] | ids[:p]) for each p in `positions` (raw logits, temperature 1)."""
    import torch

    input_ids = torch.tensor([ids], dtype=torch.long)
    backbone = getattr(model, model.base_model_prefix)
    return _head_logprobs(model, backbone(input_ids=input_ids, use_cache=False).last_hidden_state[0], ids, positions)


def _head_logprobs(model: Any, hidden: Any, ids: list[int], positions: list[int]) -> Any:
    """The LM head's log-probabilities of ids[p] from the final hidden states, at `positions` only.

    Why only there: a 49k-word head over every position would cost more than the top layers.
    """
    import torch

    index = torch.tensor(positions, dtype=torch.long)
    logits = model.get_output_embeddings()(hidden[index - 1]).float()
    targets = torch.tensor(ids, dtype=torch.long)[index]
    return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def frozen_trunk_layers(model: Any) -> int:
    """How many bottom decoder layers (with the embeddings) are frozen: the trunk policy and reference share.

    0 when the embeddings train or the model's layers cannot be found (then nothing is shared).
    """
    backbone = getattr(model, model.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if layers is None or any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return 0
    count = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        count += 1
    return count if count < len(layers) else 0


@contextmanager
def _running_only(backbone: Any, layers: list[Any], final_norm: bool) -> Iterator[None]:
    """Let `backbone.forward` run just `layers` (and the final norm or not); restored on exit.

    Why swap modules instead of re-implementing the forward: the backbone's own forward keeps building the
    causal mask and rotary embeddings as the model family does. Only for the update, while no rollout
    generates with the model.
    """
    import torch

    all_layers, norm = backbone.layers, backbone.norm
    backbone.layers = torch.nn.ModuleList(layers)
    if not final_norm:
        backbone.norm = torch.nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = all_layers, norm


def policy_and_reference_logprobs(model: Any, ref: Any | None, ids: list[int], positions: list[int],
                                  trunk: int = 0) -> tuple[Any, Any | None]:
    """(policy log-probs with grad, reference log-probs or None) of ids at `positions`.

    With `trunk` > 0 (`frozen_trunk_layers`) the bottom `trunk` layers are frozen and equal in the policy
    and its reference copy, so their output is computed once, without grad, and both run only their top
    layers on it: one full forward instead of two (the update's cost on a CPU). Equal to two full forwards.
    """
    import torch

    if not trunk:
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref, ids, positions)
        return token_logprobs(model, ids, positions), ref_logp
    hidden = trunk_hidden(model, ids, trunk)
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp = _head_logprobs(ref, top_hidden(ref, hidden, trunk), ids, positions)
    return _head_logprobs(model, top_hidden(model, hidden, trunk), ids, positions), ref_logp


def trunk_hidden(model: Any, ids: list[int], trunk: int) -> Any:
    """The output of the bottom `trunk` (frozen) layers for `ids`, without grad: (1, len(ids), hidden)."""
    import torch

    backbone = getattr(model, model.base_model_prefix)
    with torch.no_grad(), _running_only(backbone, list(backbone.layers)[:trunk], final_norm=False):
        return backbone(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).last_hidden_state


def top_hidden(model: Any, hidden: Any, trunk: int) -> Any:
    """The final hidden states (after the last norm) of the layers above `trunk`, run on `trunk_hidden`'s output."""
    backbone = getattr(model, model.base_model_prefix)
    with _running_only(backbone, list(backbone.layers)[trunk:], final_norm=True):
        return backbone(inputs_embeds=hidden, use_cache=False).last_hidden_state[0]


def k3_kl(logp: Any, ref_logp: Any) -> Any:
    """Per-token KL(policy || reference), the k3 estimator TRL uses: exp(r - p) - (r - p) - 1 (>= 0)."""
    import torch

    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def per_token_loss(logp: Any, old_logp: Any, ref_logp: Any | None, advantage: Any, *, beta: float,
                   epsilon: float) -> tuple[Any, Any, Any]:
    """(loss per token, KL per token, clipped flags) - TRL's token-level clipped surrogate + beta * k3 KL.

    `advantage`: one float for every token, or a tensor with one per token (turn-level credit).
    """
    import torch

    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantage, clipped_ratio * advantage)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0.0:
        kl = k3_kl(logp, ref_logp)
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
    trunk = frozen_trunk_layers(model)
    reference = ref if beta != 0.0 else None
    for seq in iterator:
        logp, ref_logp = policy_and_reference_logprobs(model, reference, seq.ids, seq.positions, trunk)
        old = torch.tensor(seq.old_logprobs) if seq.old_logprobs is not None else logp.detach()
        advantage = seq.advantage if seq.turn_credit is None else torch.tensor(seq.advantages())
        loss, kl, clipped = per_token_loss(logp, old, ref_logp, advantage, beta=beta, epsilon=epsilon)
        (loss.sum() / tokens).backward()
        totals["loss"] += float(loss.detach().sum())
        totals["kl"] += float(kl.sum())
        totals["clipped"] += float(clipped.float().sum())
    return {"loss": totals["loss"] / tokens, "kl": totals["kl"] / tokens, "clip_fraction": totals["clipped"] / tokens,
            "tokens": tokens}
