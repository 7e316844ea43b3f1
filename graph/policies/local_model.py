"""A transformers causal LM on the CPU: chat rendering with tools, and generation with token ids and logprobs.

Why one place: `LocalPolicy` (in-process) and `anomaly-agent serve-policy` (over HTTP) must produce the
same text for the same conversation, or an evaluation through the server would measure a different
policy than the one trained and run locally. Both call `LocalModel.generate`.

Models are cached per resolved path (loading SmolLM2 takes seconds; a run asks the policy ~10 times).
Generation holds a lock: one model, one generation at a time (the server's threads queue on it).
GRPO's rollout threads instead share one `BatchScheduler` (`LocalModel.enable_batching`, in
`batched_generation.py`): their requests are decoded together, one batched forward pass per token.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graph.policies.base import PolicyError
from graph.policies.chat import flatten_content, hermes_system_block, render_tool_call
from graph.policies.chat_template import template_supports_tools

if TYPE_CHECKING:
    from graph.policies.batched_generation import BatchScheduler, DecodeRequest

logger = logging.getLogger(__name__)


class GenerationCancelled(RuntimeError):
    """Generation stopped because its `cancel` event was set."""


@dataclass
class Generation:
    """One generated reply.

    Attributes:
        text: The decoded reply, without the end-of-turn token and without a matched stop string.
        token_ids: Every generated token id, as sampled (including a stop string's tokens and the
            end-of-turn token), so training can use exactly what the policy produced.
        logprobs: Per generated token, its log-probability under the model's raw distribution
            (temperature 1, no top-k/top-p), as vLLM reports by default. Empty unless asked for.
        tokens: Per generated token, its decoded text (for OpenAI-style logprobs).
        prompt_token_ids: The rendered prompt's ids.
        finish_reason: "stop" (end of turn or a stop string) or "length" (hit max_new_tokens).
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


class LocalModel:
    """A loaded tokenizer and causal LM, ready to render chats and generate."""

    def __init__(self, path: Path, tokenizer: Any, model: Any) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.model = model
        self.supports_tools = template_supports_tools(getattr(tokenizer, "chat_template", None))
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._lock = threading.Lock()
        #: Conversations kept for prefix reuse (0: off); see `enable_prefix_cache`.
        self.prefix_cache_size = 0
        self._prefixes: list[tuple[list[int], Any]] = []
        self.batcher: BatchScheduler | None = None
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        if not eos_ids:
            raise PolicyError(f"model {path} defines no end-of-sequence token; set eos_token in its tokenizer")
        self.eos_ids = sorted(eos_ids)

    @property
    def name(self) -> str:
        return self.path.name

    def enable_prefix_cache(self, conversations: int) -> None:
        """Reuse the attention cache of earlier turns of the same conversation (0 turns it off).

        Why: an agent turn's prompt is the previous turn's prompt plus its reply and a tool result, so
        without reuse every turn re-reads the whole run; on a CPU that prefill is most of a turn's time.
        The last `conversations` caches are kept (about 46 KB per token for SmolLM2-135M), and a new
        prompt continues the one sharing its longest prefix. Off by default: results equal a full
        prefill only up to float rounding, and GRPO rollouts (which turn it on) want speed over that.
        """
        with self._lock:
            self.prefix_cache_size = max(0, int(conversations))
            self._prefixes = []

    def enable_batching(self, on: bool = True, wait_s: float = 1.0) -> None:
        """Send `generate` calls (without `cancel`) through a `BatchScheduler` (False: back to one at a time).

        Why: GRPO's G rollout threads each need a reply at about the same time; decoding them as one
        batch runs one forward pass per token for all of them instead of one per thread under the lock.
        """
        from graph.policies.batched_generation import BatchScheduler

        if self.batcher is not None:
            self.batcher.close()
        self.batcher = BatchScheduler(self, wait_s=wait_s) if on else None

    def load_weights(self, folder: str | Path) -> int:
        """Load the ``*.safetensors`` tensors in `folder` into the model (names as `save_pretrained` writes).

        Why: GRPO syncs a served rollout model with the trainer's weights between steps; a partial file
        (only the trained layers) is enough. Returns the number of tensors loaded.

        Raises:
            PolicyError: no safetensors file there, or a tensor name the model does not have.
        """
        from safetensors.torch import load_file

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise PolicyError(f"no .safetensors file in {folder}; save the weights with save_pretrained first")
        state: dict[str, Any] = {}
        for file in files:
            state.update(load_file(str(file)))
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise PolicyError(f"{folder} holds tensors the model does not have: {', '.join(unknown[:3])}")
        with self._lock:
            self.model.load_state_dict(state, strict=False)
            self._prefixes = []
        return len(state)

    def _take_prefix(self, prompt: list[int]) -> Any:
        """The cached conversation sharing the longest prefix with `prompt`, cropped to it (None: none)."""
        best, best_len = -1, 0
        for index, (ids, _) in enumerate(self._prefixes):
            n = 0
            limit = min(len(ids), len(prompt) - 1)  # at least one prompt token must be fed
            while n < limit and ids[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = index, n
        if best < 0 or best_len < 16:
            return None
        _, cache = self._prefixes.pop(best)
        extra = int(cache.get_seq_length()) - best_len
        if extra:
            cache.crop(-extra)  # transformers 5: a negative count removes that many tokens from the end
        return cache

    def _keep_prefix(self, ids: list[int], cache: Any) -> None:
        length = int(cache.get_seq_length())
        self._prefixes.append((ids[:length], cache))
        del self._prefixes[: -self.prefix_cache_size]

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        """The prompt ids for `messages` (OpenAI format) and `tools`, ending with the assistant's turn."""
        messages = flatten_content(messages)
        if tools and not self.supports_tools:
            messages = render_without_tool_template(messages, tools)
            tools = None
        else:
            messages = [_arguments_as_objects(m) for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # jinja errors are many types; the message is what matters
            raise PolicyError(f"the chat template of {self.path} cannot render this conversation: {error}") from error
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Generate one reply; greedy when `temperature` is 0, else plain sampling (no top-k/top-p).

        Args:
            cancel: Set it to stop early (the server does when its client hangs up, so a request the
                client gave up on does not hold the model while the client's retry waits behind it).

        Raises:
            PolicyError: the conversation does not fit the model's context.
            GenerationCancelled: `cancel` was set.
        """
        prompt = self.render(messages, tools)
        max_new_tokens = self._fit_context(prompt, max_new_tokens)
        if self.batcher is not None and cancel is None:
            from graph.policies.batched_generation import DecodeRequest

            return self.batcher.submit(DecodeRequest(prompt, max_new_tokens, float(temperature), stop, seed, logprobs))
        return self._generate_one(prompt, temperature, max_new_tokens, stop, seed, logprobs, cancel)

    def _fit_context(self, prompt: list[int], max_new_tokens: int) -> int:
        """`max_new_tokens` cut to what the context leaves; raises when the prompt itself does not fit."""
        if self.context_length and len(prompt) + 1 > self.context_length:
            raise PolicyError(
                f"the conversation ({len(prompt)} tokens) does not fit the context of {self.name} "
                f"({self.context_length} tokens); lower max_steps or use a model with a longer context"
            )
        if self.context_length:
            max_new_tokens = max(1, min(max_new_tokens, self.context_length - len(prompt)))
        return max_new_tokens

    def _generate_one(self, prompt: list[int], temperature: float, max_new_tokens: int, stop: list[str] | None,
                      seed: int | None, logprobs: bool, cancel: threading.Event | None) -> Generation:
        """One prompt through transformers' `generate` under the lock (the server's and the `local` policy's path)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
            "return_dict_in_generate": True,
            "output_logits": logprobs,
        }
        if temperature > 0:
            options.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if stop:
            options.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if cancel is not None:

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                    return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

            options["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])
        input_ids = torch.tensor([prompt], dtype=torch.long)
        with self._lock, torch.inference_mode():
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("the request was cancelled before generation started")
            if seed is not None:
                torch.manual_seed(int(seed))
            if self.prefix_cache_size:
                past = self._take_prefix(prompt)
                if past is not None:
                    options["past_key_values"] = past
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
            if self.prefix_cache_size and getattr(output, "past_key_values", None) is not None:
                self._keep_prefix([int(i) for i in output.sequences[0].tolist()], output.past_key_values)
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("the request was cancelled during generation")
        new_ids = [int(i) for i in output.sequences[0, len(prompt):].tolist()]
        result = self._decode(new_ids, prompt, stop, max_new_tokens)
        if logprobs:
            steps = torch.stack([step[0] for step in output.logits[: len(new_ids)]]).float()
            chosen = torch.log_softmax(steps, dim=-1).gather(1, torch.tensor(new_ids).unsqueeze(1)).squeeze(1)
            self._add_logprobs(result, [float(v) for v in chosen.tolist()])
        return result

    def _add_logprobs(self, result: Generation, values: list[float]) -> None:
        result.logprobs = values
        result.tokens = [self.tokenizer.decode([i], skip_special_tokens=False) for i in result.token_ids]

    def generate_batch(self, requests: list[DecodeRequest]) -> list[Generation]:
        """Decode every request's reply together (see `graph.policies.batched_generation.decode_batch`)."""
        from graph.policies.batched_generation import decode_batch

        with self._lock:
            return decode_batch(self, requests)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _decode(self, ids: list[int], prompt: list[int], stop: list[str] | None, limit: int) -> Generation:
        # Keep special tokens: a tokenizer with <tool_call> as a special token would lose it otherwise.
        body = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        finish = "stop" if len(body) < len(ids) else "length"
        for word in stop or []:
            at = text.find(word)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish == "length" and len(ids) < limit:
            finish = "stop"
        return Generation(text=text, token_ids=ids, prompt_token_ids=list(prompt), finish_reason=finish)


def render_without_tool_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation rewritten for a template that ignores tools, in the Hermes layout.

    The tool schemas go to the end of the system message, assistant calls become ``<tool_call>`` text,
    and tool results become a user turn of ``<tool_response>`` blocks (consecutive results share one).
    """
    block = hermes_system_block(tools)
    out: list[dict[str, Any]] = []
    if messages and messages[0]["role"] == "system":
        out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{block}"})
        messages = messages[1:]
    else:
        from graph.policies.chat_template import DEFAULT_SYSTEM

        out.append({"role": "system", "content": f"{DEFAULT_SYSTEM}\n\n{block}"})
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant":
            parts = [content] if content else []
            for call in message.get("tool_calls") or []:
                function = call.get("function", call)
                parts.append(render_tool_call(function["name"], function.get("arguments")))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out]


def _arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """HF templates render ``arguments | tojson``; a JSON string would be quoted twice, so decode it."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function", {}))
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


_LOAD_LOCK = threading.Lock()


def load_local_model(path: str | Path | None) -> LocalModel:
    """The model at `path` (a local HF folder), or the default SmolLM2 when None; cached per path.

    Raises:
        PolicyError: the folder does not exist or does not hold a causal LM and its tokenizer.
    """
    if path is None:
        from graph.policies.smollm2 import ensure_smollm2

        path = ensure_smollm2()
    with _LOAD_LOCK:  # concurrent first loads would race in transformers' lazy imports and weight init
        return _load(str(Path(path).expanduser().resolve()))


@lru_cache(maxsize=2)
def _load(path: str) -> LocalModel:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PolicyError(
            f"no model at {folder}: give a local Hugging Face model folder (config.json, weights, tokenizer), "
            "or leave the model unset to use the bundled SmolLM2-135M-Instruct"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32")
    except (OSError, ValueError) as error:
        raise PolicyError(f"could not load the model at {folder}: {str(error).splitlines()[0]}") from error
    if not getattr(tokenizer, "chat_template", None):
        raise PolicyError(f"the tokenizer at {folder} has no chat template; use an instruct/chat model")
    model.eval()
    logger.info("loaded %s (%.0fM parameters)", folder, sum(p.numel() for p in model.parameters()) / 1e6)
    return LocalModel(folder, tokenizer, model)
