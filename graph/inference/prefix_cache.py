"""The prefix cache of the local engine: attention caches of earlier turns, continued by the next turn.

Why: an agent turn's prompt is the previous turn's prompt plus its reply and a tool result, so without
reuse every turn re-reads the whole run; on a CPU that prefill is most of a turn's time. The last `size`
conversations are kept (about 46 KB per token for SmolLM2-135M), and a new prompt continues the one
sharing its longest prefix. Callers hold the engine's lock.
"""

from __future__ import annotations

from typing import Any

#: A kept conversation is reused only when it shares at least this many tokens with the new prompt.
MIN_SHARED_TOKENS = 16


class PrefixCache:
    """The attention caches of the last `size` conversations (0: off), by their token ids."""

    def __init__(self, size: int = 0) -> None:
        self.size = max(0, int(size))
        self._kept: list[tuple[list[int], Any]] = []

    def __len__(self) -> int:
        """How many conversations are kept now."""
        return len(self._kept)

    def resize(self, size: int) -> None:
        """Keep up to `size` conversations from now on (0 turns the cache off), dropping every kept one."""
        self.size = max(0, int(size))
        self._kept = []

    def clear(self) -> None:
        """Drop every kept conversation (after a weight change their keys and values are stale)."""
        self._kept = []

    def take(self, prompt: list[int]) -> Any:
        """The kept conversation sharing the longest prefix with `prompt`, cropped to it (None: none).

        The conversation leaves the cache: its continuation is kept again by `keep` when it ends.
        """
        best, best_len = -1, 0
        for index, (ids, _) in enumerate(self._kept):
            n = 0
            limit = min(len(ids), len(prompt) - 1)  # at least one prompt token must be fed
            while n < limit and ids[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = index, n
        if best < 0 or best_len < MIN_SHARED_TOKENS:
            return None
        _, cache = self._kept.pop(best)
        extra = int(cache.get_seq_length()) - best_len
        if extra:
            cache.crop(-extra)  # transformers 5: a negative count removes that many tokens from the end
        return cache

    def keep(self, ids: list[int], cache: Any) -> None:
        """Keep the attention cache of the conversation `ids` (the oldest one goes when the cache is full)."""
        length = int(cache.get_seq_length())
        self._kept.append((ids[:length], cache))
        del self._kept[: -self.size]
