"""Batched decoding for the local model: many conversations' next replies in one forward pass per token.

Why its own module: GRPO's G rollout threads each ask the one CPU model for a reply at about the same
time; decoding them together costs about what one row costs (decoding is memory-bound), where one at a
time under the model's lock costs G times as much. The single-row path (`LocalModel.generate` without batching,
used by serve-policy and the `local` policy) stays as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from graph.inference.prefix_cache import PrefixCache
from graph.inference.types import DecodeRequest, Generation

logger = logging.getLogger(__name__)


class DecodingModel(Protocol):
    """What batched decoding uses of the engine; `graph.inference.model.LocalModel` provides it."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]
    lock: threading.Lock
    prefix_cache: PrefixCache

    @property
    def pad_id(self) -> int: ...

    def decode_reply(self, ids: list[int], prompt: list[int], stop: list[str] | None, limit: int) -> Generation: ...

    def add_logprobs(self, result: Generation, values: list[float]) -> None: ...


def decode_batch(model: DecodingModel, requests: list[DecodeRequest]) -> list[Generation]:
    """Decode every request's reply together: one left-padded forward pass per token for all rows.

    Each row stops on its own (end of turn, a stop string, its token limit) and samples with its own
    temperature and seeded generator; logprobs are the raw (temperature 1) log-probabilities of the
    sampled tokens, as `LocalModel.generate` records them. With the prefix cache on, each row continues
    the cached conversation it extends, so only its new tokens are read. The caller holds the model's lock.
    """
    import torch

    with torch.inference_mode():
        running = RunningBatch(model)
        running.start(requests)
        replies: dict[int, Generation] = {}
        while running.rows:
            replies.update((id(request), generation) for request, generation in running.advance())
    return [replies[id(request)] for request in requests]


class RunningBatch:
    """The rows being decoded; each leaves the batch (and its caller gets the reply) as soon as it stops.

    Why: an agent's turns differ in length (a 20-token mask_gen call, a 70-token image_gen instruction).
    Kept until the longest row stopped, a finished row would cost a padded row per step, and its rollout
    would wait to run its tool. Why new turns do not join rows already decoding (continuous batching): it
    was slower for the same round (RESULTS.md): on a CPU a decoding step costs nearly as much for 1 row as for 8, so rows that start together share the most steps, and every
    join pays a prefill and a copy of the batch's cache. Call under the model's lock and `torch.inference_mode`.
    """

    def __init__(self, model: DecodingModel) -> None:
        self.model = model
        self.batch: _Batch | None = None
        self.rows: list[_Row] = []

    def start(self, requests: list[DecodeRequest]) -> None:
        """Read the requests' prompts (continuing their cached prefixes) as the rows of a new batch."""
        assert self.batch is None, "rows join only an idle batch"
        model = self.model
        caches = [model.prefix_cache.take(r.prompt) if model.prefix_cache.size else None for r in requests]
        self.batch = _Batch.prefill(model, [r.prompt for r in requests], caches)
        self.rows = [_Row(r, model) for r in requests]

    def advance(self) -> list[tuple[DecodeRequest, Generation]]:
        """Sample one token for every row; rows that stopped leave (their cache kept as a prefix), the rest
        are fed their token. Returns the finished requests with their replies."""
        assert self.batch is not None
        for index, row in enumerate(self.rows):
            row.take(self.batch.logits[index])
        finished = []
        for index, row in enumerate(self.rows):
            if row.finished:
                if self.model.prefix_cache.size:
                    fed = len(row.request.prompt) + len(row.ids) - 1  # the last sampled token was never fed
                    self.model.prefix_cache.keep(row.request.prompt + row.ids, self.batch.row_cache(index, fed))
                finished.append((row.request, row.generation()))
        if finished:
            keep = [i for i, row in enumerate(self.rows) if not row.finished]
            self.rows = [self.rows[i] for i in keep]
            self.batch = self.batch.select(keep) if keep else None
        if self.batch is not None:
            self.batch.step([row.ids[-1] for row in self.rows])
        return finished


class _Row:
    """One request's state during batched decoding: its sampler, sampled ids and logprobs, whether it stopped."""

    def __init__(self, request: DecodeRequest, model: DecodingModel) -> None:
        import torch

        self.request, self.model = request, model
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.finished = False
        self.sampler = torch.Generator()
        self.sampler.manual_seed(int(request.seed) if request.seed is not None else int(torch.randint(0, 2**62, ()).item()))

    def take(self, logits: Any) -> None:
        """Pick the next token from this row's raw logits (greedy at temperature 0) and record it."""
        import torch

        logits = logits.float()
        if self.request.temperature > 0:
            probs = torch.softmax(logits / self.request.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.sampler).item())
        else:
            token = int(torch.argmax(logits).item())
        self.ids.append(token)
        if self.request.logprobs:
            self.logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
        self.finished = token in self.model.eos_ids or len(self.ids) >= self.request.max_new_tokens or self._hit_stop()

    def _hit_stop(self) -> bool:
        if not self.request.stop:
            return False
        text = self.model.tokenizer.decode(self.ids, skip_special_tokens=False)
        return any(word in text for word in self.request.stop)

    def generation(self) -> Generation:
        result = self.model.decode_reply(self.ids, self.request.prompt, self.request.stop, self.request.max_new_tokens)
        if self.request.logprobs:
            self.model.add_logprobs(result, self.logprobs)
        return result


class _Batch:
    """The left-padded batch being decoded: its attention cache, mask, positions and last logits.

    Layout: row i's tokens end at the right edge, preceded by padding the mask hides; positions count
    only real tokens, so each row sees exactly the positions it would see alone.
    """

    def __init__(self, model: DecodingModel, past: Any, mask: Any, positions: Any, logits: Any, starts: list[int]) -> None:
        self.model, self.past, self.mask, self.positions, self.logits = model, past, mask, positions, logits
        self.starts = starts  # where each row's first real token sits in the cache

    @classmethod
    def prefill(cls, model: DecodingModel, prompts: list[list[int]], caches: list[Any]) -> _Batch:
        """Read every prompt, continuing each row's cached prefix (None: from scratch), in one forward pass.

        Every row feeds the same number of trailing tokens (the longest unread part); a row whose cache
        covers more than that keeps only what fits, and a short prompt without a cache is left-padded.
        """
        import torch

        lengths = [len(p) for p in prompts]
        cached = [int(c.get_seq_length()) if c is not None else 0 for c in caches]
        width = max(n - c for n, c in zip(lengths, cached))
        keep = [max(0, min(c, n - width)) for n, c in zip(lengths, cached)]
        held = max(keep)
        pad = model.pad_id
        input_ids = torch.tensor([[pad] * (width - (n - k)) + p[k:] for p, n, k in zip(prompts, lengths, keep)])
        starts = [held + width - n for n in lengths]
        mask = torch.zeros((len(prompts), held + width), dtype=torch.long)
        for row, start in enumerate(starts):
            mask[row, start:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = _stack_caches(model.model, caches, keep, held) if held else None
        out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, held:],
                          past_key_values=past, use_cache=True, logits_to_keep=1)
        return cls(model, out.past_key_values, mask, positions[:, -1:], out.logits[:, -1], starts)

    def step(self, tokens: list[int]) -> None:
        """Feed one token per row and keep the next logits."""
        import torch

        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=self.mask.dtype)], dim=1)
        self.positions = self.positions + 1
        out = self.model.model(input_ids=torch.tensor(tokens).unsqueeze(1), attention_mask=self.mask,
                               position_ids=self.positions, past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past, self.logits = out.past_key_values, out.logits[:, -1]

    def select(self, rows: list[int]) -> _Batch:
        """Only `rows` (in that order), without the columns of padding every one of them has on the left."""
        import torch

        index = torch.tensor(rows, dtype=torch.long)
        trim = min(self.starts[r] for r in rows)
        for layer in self.past.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.starts = [self.starts[r] - trim for r in rows]
        self.mask = self.mask.index_select(0, index)[:, trim:]
        self.positions = self.positions.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        return self

    def row_cache(self, row: int, length: int) -> Any:
        """Row `row`'s first `length` real tokens as a cache of their own (for the prefix cache)."""
        from transformers import DynamicCache

        start = self.starts[row]
        return DynamicCache(ddp_cache_data=[
            (layer.keys[row:row + 1, :, start:start + length].clone(), layer.values[row:row + 1, :, start:start + length].clone())
            for layer in self.past.layers])


def _stack_caches(model: Any, caches: list[Any], keep: list[int], held: int) -> Any:
    """One batch cache of `held` positions: row i's first keep[i] cached tokens right-aligned, zeros before."""
    import torch
    from transformers import DynamicCache

    template = next(c for c in caches if c is not None)
    layers = []
    for index, layer in enumerate(template.layers):
        shape = (len(caches), layer.keys.shape[1], held, layer.keys.shape[3])
        keys, values = torch.zeros(shape, dtype=layer.keys.dtype), torch.zeros(shape, dtype=layer.values.dtype)
        for row, (cache, k) in enumerate(zip(caches, keep)):
            if cache is not None and k:
                keys[row, :, held - k:] = cache.layers[index].keys[0, :, :k]
                values[row, :, held - k:] = cache.layers[index].values[0, :, :k]
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)


class BatchScheduler:
    """Collects concurrent `generate` calls and decodes them together in one `RunningBatch`.

    Why a scheduler: the rollout threads do not know of each other. Each registered client (`client()`,
    one per rollout) that is not waiting for a reply is busy in a tool and will soon ask again. When
    nothing is decoding, the worker waits until every active client has asked (at most `wait_s` after the
    first request), so a wave starts as one batch; a finished reply is handed back at once, and the
    requests that arrive meanwhile start the next wave when the running rows have all stopped.
    """

    def __init__(self, model: DecodingModel, wait_s: float = 1.0) -> None:
        self.model, self.wait_s = model, wait_s
        self._cond = threading.Condition()
        self._pending: list[DecodeRequest] = []
        self._active = 0
        self._reserved = 0  # counted in _active, not yet claimed by a client (see `reserve`)
        self.batch_sizes: list[int] = []  # one entry per batch started, for logs and tests
        self._closed = False
        threading.Thread(target=self._serve, name="batch-generation", daemon=True).start()

    @contextmanager
    def client(self) -> Iterator[None]:
        """Count the calling rollout as active while it runs (the worker waits for active clients' requests)."""
        with self._cond:
            if self._reserved:
                self._reserved -= 1  # already counted by `reserve`
            else:
                self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Count `count` clients as active before their threads start; each `client()` claims one.

        Why: without it the first thread to ask finds itself the only active client and is decoded
        alone while the others are still starting. Reservations no thread claimed are dropped on exit.
        """
        with self._cond:
            self._active += count
            self._reserved += count
        try:
            yield
        finally:
            with self._cond:
                self._active -= self._reserved
                self._reserved = 0
                self._cond.notify_all()

    def submit(self, request: DecodeRequest) -> Generation:
        """Queue `request` and block until its batch is decoded; re-raises the batch's error."""
        with self._cond:
            self._pending.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        """Stop the worker once the requests already queued are served."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _next_wave(self) -> list[DecodeRequest] | None:
        """The requests to start next (None: closed with nothing queued).

        Blocks for the first request, then waits for every active client's request, or `wait_s`, so a
        wave of rollouts starts together.
        """
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._pending) < self._active and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            wave, self._pending = self._pending, []
        return wave

    def _serve(self) -> None:
        import torch

        while (wave := self._next_wave()) is not None:
            self.batch_sizes.append(len(wave))
            running = RunningBatch(self.model)
            try:
                with self.model.lock, torch.inference_mode():
                    running.start(wave)
                while running.rows:
                    with self.model.lock, torch.inference_mode():
                        finished = running.advance()
                    for request, generation in finished:  # its rollout goes on to its tool now
                        request.result = generation
                        request.done.set()
            except BaseException as error:  # every waiting caller must wake up and see it
                logger.exception("batched generation of %d requests failed", len(wave))
                for request in wave:
                    if not request.done.is_set():
                        request.error = error
                        request.done.set()
