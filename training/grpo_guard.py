"""The update guard of `train grpo`: after each update, does the policy still make the calls its successful runs made?

Why: on a 2-core budget an update is a handful of sequences, and AdamW moves every adapter weight by about
the learning rate whatever the gradient's size. One such step can flip a decision the whole protocol rests
on (a policy that calls ``mask_gen`` where ``image_gen`` belongs fails every later rollout), and no later
update can recover, because a group of equal failures carries no signal.

What it checks: *probes*, states taken from the training rollouts that succeeded and followed the
protocol, at the five steps where the protocol allows exactly one move (DESIGN §6):

    start -> prompt_gen,  prompt_gen -> image_gen,  image_gen -> quality_eval,  a passed quality_eval -> mask_gen,
    mask_gen -> the final answer

A probe is the state's prompt with the turn the successful run wrote there. It passes when every token
of that turn (its thought, its call and the end of the turn; for image_gen all but its free-text prompt)
is still the policy's greedy choice, teacher-forced: greedy decoding from that state writes the same
turn. Probes are kept only if they pass when added. States after a failed evaluation are left out:
there KR, a new instruction and a new image are all allowed.

Why the thought too: checking only the call tokens after the thought the run had written passes a policy
whose own thought has changed. A policy whose thoughts collapse (to "Image 2." on every turn) goes on to
call mask_gen again and again after its mask while its call tokens, teacher-forced after the old thought,
are still greedy; its first thought token is not. The SFT policy writes these templated thoughts
greedily, so whole-turn probes are not rarer than call-only ones. The final answer after the mask is
probed for the same reason: nothing else forces the run to stop after its mask.

Why teacher-forced and not generated: a probe's prompt is 1-2.5k tokens, and decoding several of them
after every update costs a large share of a CPU step. The layers below the trained ones do not change, so their output for each probe is computed once and kept; a check runs only the trained top
layers over it.

What it does: a backtracking line search on the update, as TRPO's on its KL bound. The update's
parameter change d is tried at full size, then halved (`backtracks` times); the first size at which every
probe still passes is kept. If none does, the weights and the optimizer state go back to before the
update, so one bad batch costs one step instead of the run. Held-out tasks are never probed. The probes
are saved with each checkpoint, so `--resume` guards against the same states.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

from graph.inference.hermes import TOOL_CALL_OPEN
from graph.protocol import FINAL_ANSWER, FORCED_MOVES

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Probe:
    """A state of a successful training rollout with the turn written there, and which of its tokens must stay greedy."""

    ids: tuple[int, ...]  # the state's prompt, then the turn
    checked: tuple[int, ...]  # positions in `ids` of the turn's tokens that must stay greedy
    tool: str  # the forced call, or FINAL_ANSWER


def called_tool(text: str) -> str | None:
    """The tool of the single valid call `text` makes, or None (no call, several, or one that does not validate)."""
    from graph.inference.hermes import parse_completion
    from graph.tool_calls import ValidCall, validate_call

    message = parse_completion(text)
    if message.invalid_tool_calls or len(message.tool_calls) != 1:
        return None
    call = message.tool_calls[0]
    checked = validate_call(call["name"], call.get("args"), call.get("id") or "probe")
    return checked.name if isinstance(checked, ValidCall) else None


def turn_move(text: str) -> str | None:
    """`called_tool` of the turn, FINAL_ANSWER for a turn with no call at all, None for anything else."""
    from graph.inference.hermes import parse_completion

    message = parse_completion(text)
    if not message.tool_calls and not message.invalid_tool_calls and TOOL_CALL_OPEN not in text:
        return FINAL_ANSWER
    return called_tool(text)


def checked_positions(tokenizer: Any, prompt_length: int, token_ids: list[int], tool: str) -> tuple[int, ...]:
    """The positions (after a prompt of `prompt_length` ids) of the turn's tokens that must stay greedy.

    The whole turn (thought, call and end-of-turn tokens); for image_gen only up to the opening quote of
    its ``prompt``, whose text is the policy's free choice.
    """
    if tool != "image_gen":
        return tuple(prompt_length + i for i in range(len(token_ids)))
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    ends = [len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=False)) for i in range(len(token_ids))]
    begin = text.find(TOOL_CALL_OPEN)
    begin = text.find("{") if begin < 0 else begin
    free_text = re.search(r'"prompt"\s*:\s*"', text[begin:]) if begin >= 0 else None
    stop = begin + free_text.end() if free_text else len(text)
    return tuple(prompt_length + i for i in range(len(token_ids)) if ends[i] <= stop)


def candidate_probes(groups: list[list[Any]], tokenizer: Any) -> list[Probe]:
    """The forced states (`FORCED_MOVES`) of every rollout that succeeded and followed the protocol.

    A ``quality_eval -> mask_gen`` state counts only in such a run, where mask_gen's image had passed; the
    final answer counts where it follows the run's mask_gen.
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
                tool = turn_move(tokenizer.decode(turn.token_ids, skip_special_tokens=False))
                if tool is None:
                    break  # a turn the protocol has no single move for: nothing is forced after it
                if (previous, tool) in FORCED_MOVES:
                    checked = checked_positions(tokenizer, len(turn.prompt_ids), list(turn.token_ids), tool)
                    if checked:
                        probes.append(Probe((*turn.prompt_ids, *turn.token_ids), checked, tool))
                if tool == FINAL_ANSWER:
                    break  # nothing is forced after the answer
                previous = tool
    return probes


def probe_passes(model: Any, probes: list[Probe], trunk_cache: dict[Probe, Any] | None = None) -> list[bool]:
    """Whether each probe's checked tokens are all still the model's greedy choice (teacher-forced).

    `trunk_cache` keeps each probe's output of the frozen bottom layers (`frozen_trunk_layers`) across checks.
    """
    import torch

    from training.grpo_loss import frozen_trunk_layers, top_hidden, trunk_hidden

    trunk = frozen_trunk_layers(model)
    cache = trunk_cache if trunk_cache is not None and trunk else {}
    passes = []
    with torch.no_grad():
        for probe in probes:
            hidden = cache.get(probe)
            if hidden is None:
                hidden = trunk_hidden(model, list(probe.ids), trunk)
                if trunk:
                    cache[probe] = hidden
            index = torch.tensor(probe.checked, dtype=torch.long)
            logits = model.get_output_embeddings()(top_hidden(model, hidden, trunk)[index - 1])
            passes.append(bool((logits.argmax(-1) == torch.tensor(probe.ids)[index]).all()))
    return passes


class UpdateGuard:
    """Collects probes from successful training rollouts and line-searches each update against them (module doc)."""

    def __init__(self, model: Any, tokenizer: Any, per_tool: int, backtracks: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.per_tool = per_tool
        self.backtracks = backtracks
        self.probes: list[Probe] = []
        self._trunk_cache: dict[Probe, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.per_tool > 0

    def probe_records(self) -> list[dict[str, Any]]:
        """The probes as JSON-ready rows, for the checkpoint: a resumed run checks the same states."""
        return [{"ids": list(p.ids), "checked": list(p.checked), "tool": p.tool} for p in self.probes]

    def restore(self, records: list[dict[str, Any]]) -> None:
        """Take back the probes of `probe_records` (their frozen-trunk outputs are recomputed on first use)."""
        self.probes = [Probe(tuple(r["ids"]), tuple(r["checked"]), r["tool"]) for r in records]
        self._trunk_cache.clear()

    def passes(self, probes: list[Probe]) -> list[bool]:
        """`probe_passes` on the guarded model in eval mode, keeping the frozen layers' output of each probe."""
        training = self.model.training
        self.model.eval()
        try:
            return probe_passes(self.model, probes, self._trunk_cache)
        finally:
            self.model.train(training)

    def add_probes(self, groups: list[list[Any]]) -> int:
        """Add up to `per_tool` probes per forced call from this step's rollouts (before its update); returns how many.

        A candidate joins only if the current policy passes it, so the guard asks for no more than it had.
        """
        if not self.enabled:
            return 0
        have = {tool: sum(p.tool == tool for p in self.probes) for _, tool in FORCED_MOVES}
        known = set(self.probes)
        wanted: list[Probe] = []
        for probe in candidate_probes(groups, self.tokenizer):
            if probe not in known and have[probe.tool] < self.per_tool:
                wanted.append(probe)
                known.add(probe)
                have[probe.tool] += 1
        passing = self.passes(wanted)
        self.probes.extend(p for p, ok in zip(wanted, passing) if ok)
        for probe, ok in zip(wanted, passing):
            if not ok:
                self._trunk_cache.pop(probe, None)
        return sum(passing)

    def snapshot(self, optimizer: Any) -> tuple[list[Any], dict[str, Any]] | None:
        """The trained tensors and the optimizer state before an update (None when there is nothing to guard)."""
        if not self.enabled or not self.probes:
            return None
        return [p.detach().clone() for p in _trained(self.model)], copy.deepcopy(optimizer.state_dict())

    def check(self, optimizer: Any, before: tuple[list[Any], dict[str, Any]] | None) -> dict[str, Any]:
        """Keep the largest fraction of the update (1, 1/2, ...) that every probe passes, or undo it.

        Returns the log fields: ``guard_scale`` (the fraction kept; 0 = undone), ``guard_passed`` (probes
        passing at the last size tried) and ``guard_probes``.
        """
        import torch

        if before is None:
            return {}
        old, optimizer_state = before
        trained = _trained(self.model)
        new = [p.detach().clone() for p in trained]
        passed: list[bool] = []
        for halving in range(self.backtracks + 1):
            scale = 0.5 ** halving
            with torch.no_grad():
                for parameter, start, end in zip(trained, old, new):
                    parameter.copy_(start + scale * (end - start))
            passed = self.passes(self.probes)
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
