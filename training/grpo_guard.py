"""The update guard of `train grpo`: after each update, does the policy still make the calls its successful runs made?

Why: on a 2-core budget an update is a handful of sequences, and AdamW moves every adapter weight by about
the learning rate whatever the gradient's size. One such step can flip a decision the whole protocol rests
on. Measured (session 8, pool 7, lr 5e-3, positive-only advantages): after the third update the policy
called ``mask_gen`` where ``image_gen`` belongs ("Apply the instruction to the normal tile." followed by
a ``mask_gen`` call), every later rollout failed (training reward 1.46 -> 0.18), and no later update
could recover, because a group of equal failures carries no signal.

What it checks: *probes*, states taken from the training rollouts that succeeded and followed the
protocol, at the four steps where the protocol allows exactly one call (DESIGN §6):

    start -> prompt_gen,  prompt_gen -> image_gen,  image_gen -> quality_eval,  a passed quality_eval -> mask_gen

A probe passes when the policy, decoding greedily from that state, writes one call that validates and
names the tool the successful run called there. Probes are kept only if they pass when added (states
after a failed evaluation are left out: there KR, a new instruction and a new image are all allowed).

What it does: a backtracking line search on the update, as TRPO's on its KL bound. The update's
parameter change d is tried at full size, then halved (`backtracks` times); the first size at which every
probe still passes is kept. If none does, the weights and the optimizer state go back to before the
update, so one bad batch costs one step instead of the run. Held-out tasks are never probed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: (previous call, the only call the protocol allows next) - None: the run's first call.
FORCED_CALLS: frozenset[tuple[str | None, str]] = frozenset({
    (None, "prompt_gen"), ("prompt_gen", "image_gen"), ("image_gen", "quality_eval"), ("quality_eval", "mask_gen"),
})


@dataclass(frozen=True)
class Probe:
    """A state from a successful training rollout (its prompt ids) and the call the protocol forces there."""

    prompt_ids: tuple[int, ...]
    tool: str


def called_tool(text: str) -> str | None:
    """The tool of the single valid call `text` makes, or None (no call, several, or one that does not validate)."""
    from graph.policies.chat import parse_completion
    from graph.tool_calls import ValidCall, validate_call

    message = parse_completion(text)
    if message.invalid_tool_calls or len(message.tool_calls) != 1:
        return None
    call = message.tool_calls[0]
    checked = validate_call(call["name"], call.get("args"), call.get("id") or "probe")
    return checked.name if isinstance(checked, ValidCall) else None


def candidate_probes(groups: list[list[Any]], tokenizer: Any) -> list[Probe]:
    """The forced-call states (`FORCED_CALLS`) of every rollout that succeeded and followed the protocol.

    A ``quality_eval -> mask_gen`` state counts only in such a run, where mask_gen's image had passed.
    """
    probes: list[Probe] = []
    for group in groups:
        for rollout in group:
            if rollout.reward.status != "success" or not rollout.reward.protocol:
                continue
            previous: str | None = None
            for turn in rollout.turns:
                if not turn.accepted:
                    continue
                tool = called_tool(tokenizer.decode(turn.token_ids, skip_special_tokens=False))
                if tool is None:
                    break  # the final answer: nothing is forced after it
                if (previous, tool) in FORCED_CALLS:
                    probes.append(Probe(tuple(turn.prompt_ids), tool))
                previous = tool
    return probes


def probe_passes(local: Any, probes: list[Probe], max_new_tokens: int) -> list[bool]:
    """Greedy-decode every probe's state as one batch; whether each writes its forced call.

    The model's prefix caches are dropped first: they hold keys computed with the weights before the update.
    """
    from graph.policies.batched_generation import DecodeRequest

    if not probes:
        return []
    local.enable_prefix_cache(local.prefix_cache_size)
    replies = local.generate_batch([DecodeRequest(list(p.prompt_ids), max_new_tokens, 0.0) for p in probes])
    return [called_tool(reply.text) == probe.tool for reply, probe in zip(replies, probes)]


class UpdateGuard:
    """Collects probes from successful training rollouts and line-searches each update against them (module doc)."""

    def __init__(self, local: Any, per_tool: int, backtracks: int, max_new_tokens: int) -> None:
        self.local = local
        self.per_tool = per_tool
        self.backtracks = backtracks
        self.max_new_tokens = max_new_tokens
        self.probes: list[Probe] = []

    @property
    def enabled(self) -> bool:
        return self.per_tool > 0

    def add_probes(self, groups: list[list[Any]]) -> int:
        """Add up to `per_tool` probes per forced call from this step's rollouts (before its update); returns how many.

        A candidate joins only if the current policy passes it, so the guard asks for no more than it had.
        """
        if not self.enabled:
            return 0
        have = {tool: sum(p.tool == tool for p in self.probes) for _, tool in FORCED_CALLS}
        known = set(self.probes)
        wanted: list[Probe] = []
        for probe in candidate_probes(groups, self.local.tokenizer):
            if probe not in known and have[probe.tool] < self.per_tool:
                wanted.append(probe)
                known.add(probe)
                have[probe.tool] += 1
        kept = [p for p, ok in zip(wanted, probe_passes(self.local, wanted, self.max_new_tokens)) if ok]
        self.probes.extend(kept)
        return len(kept)

    def snapshot(self, model: Any, optimizer: Any) -> tuple[list[Any], dict[str, Any]] | None:
        """The trained tensors and the optimizer state before an update (None when there is nothing to guard)."""
        if not self.enabled or not self.probes:
            return None
        return [p.detach().clone() for p in _trained(model)], copy.deepcopy(optimizer.state_dict())

    def check(self, model: Any, optimizer: Any, before: tuple[list[Any], dict[str, Any]] | None) -> dict[str, Any]:
        """Keep the largest fraction of the update (1, 1/2, ...) that every probe passes, or undo it.

        Returns the log fields: ``guard_scale`` (the fraction kept; 0 = undone), ``guard_passed`` (probes
        passing at the last size tried) and ``guard_probes``.
        """
        import torch

        if before is None:
            return {}
        old, optimizer_state = before
        trained = _trained(model)
        new = [p.detach().clone() for p in trained]
        passed: list[bool] = []
        for halving in range(self.backtracks + 1):
            scale = 0.5 ** halving
            with torch.no_grad():
                for parameter, start, end in zip(trained, old, new):
                    parameter.copy_(start + scale * (end - start))
            passed = probe_passes(self.local, self.probes, self.max_new_tokens)
            if all(passed):
                return {"guard_scale": scale, "guard_passed": sum(passed), "guard_probes": len(passed)}
        with torch.no_grad():
            for parameter, start in zip(trained, old):
                parameter.copy_(start)
        optimizer.load_state_dict(optimizer_state)
        failed = sorted({p.tool for p, ok in zip(self.probes, passed) if not ok})
        logger.warning("update undone: at 1/%d of its size it still broke the %s probes", 2 ** self.backtracks,
                       ", ".join(failed))
        return {"guard_scale": 0.0, "guard_passed": sum(passed), "guard_probes": len(passed)}


def _trained(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]
