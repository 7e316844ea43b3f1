"""A transformers causal LM on the CPU: chat rendering with tools, and generation with token ids and logprobs.

Why one place: `LocalPolicy` (in-process) and `anomaly-agent serve-policy` (over HTTP) must produce the
same text for the same conversation, or an evaluation through the server would measure a different
policy than the one trained and run locally. Both call `LocalModel.generate`.

Models are cached per resolved path (loading SmolLM2 takes seconds; a run asks the policy ~10 times).
Generation holds a lock: one model, one generation at a time (the server's threads queue on it).
GRPO's rollout threads instead share one `BatchScheduler` (`LocalModel.enable_batching`, in
`graph.inference.batching`): their requests are decoded together, one batched forward pass per token.
"""

from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graph.inference.prefix_cache import PrefixCache
from graph.inference.types import DecodeRequest, Generation, GenerationCancelled
from graph.errors import PolicyError
from graph.inference.hermes import flatten_content, hermes_system_block, render_tool_call
from graph.inference.chat_template import template_supports_tools

if TYPE_CHECKING:
    from graph.inference.batching import BatchScheduler

logger = logging.getLogger(__name__)


class LocalModel:
    """A loaded tokenizer and causal LM, ready to render chats and generate."""

    def __init__(self, path: Path, tokenizer: Any, model: Any) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.model = model
        self.supports_tools = template_supports_tools(getattr(tokenizer, "chat_template", None))
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        #: Held while the model runs: one forward pass at a time (batched decoding holds it per step).
        self.lock = threading.Lock()
        #: Conversations kept for prefix reuse (size 0: off); see `enable_prefix_cache`.
        self.prefix_cache = PrefixCache()
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

    @property
    def prefix_cache_size(self) -> int:
        """How many conversations the prefix cache keeps (0: off)."""
        return self.prefix_cache.size

    def enable_prefix_cache(self, conversations: int) -> None:
        """Reuse the attention cache of earlier turns of the same conversation (0 turns it off; `PrefixCache`).

        Off by default: results equal a full prefill only up to float rounding, and GRPO rollouts (which
        turn it on) want speed over that.
        """
        with self.lock:
            self.prefix_cache.resize(conversations)

    def clear_prefix_cache(self) -> None:
        """Drop the kept conversations: their attention keys belong to the weights before an update."""
        with self.lock:
            self.prefix_cache.clear()

    def enable_batching(self, on: bool = True, wait_s: float = 1.0) -> None:
        """Send `generate` calls (without `cancel`) through a `BatchScheduler` (False: back to one at a time).

        Why: GRPO's G rollout threads each need a reply at about the same time; decoding them as one
        batch runs one forward pass per token for all of them instead of one per thread under the lock.
        """
        from graph.inference.batching import BatchScheduler

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
        with self.lock:
            self.model.load_state_dict(state, strict=False)
            self.prefix_cache.clear()
        return len(state)

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
        with self.lock, torch.inference_mode():
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("the request was cancelled before generation started")
            if seed is not None:
                torch.manual_seed(int(seed))
            if self.prefix_cache.size:
                past = self.prefix_cache.take(prompt)
                if past is not None:
                    options["past_key_values"] = past
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
            if self.prefix_cache.size and getattr(output, "past_key_values", None) is not None:
                self.prefix_cache.keep([int(i) for i in output.sequences[0].tolist()], output.past_key_values)
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("the request was cancelled during generation")
        new_ids = [int(i) for i in output.sequences[0, len(prompt):].tolist()]
        result = self.decode_reply(new_ids, prompt, stop, max_new_tokens)
        if logprobs:
            steps = torch.stack([step[0] for step in output.logits[: len(new_ids)]]).float()
            chosen = torch.log_softmax(steps, dim=-1).gather(1, torch.tensor(new_ids).unsqueeze(1)).squeeze(1)
            self.add_logprobs(result, [float(v) for v in chosen.tolist()])
        return result

    def add_logprobs(self, result: Generation, values: list[float]) -> None:
        """Set the reply's per-token logprobs and the decoded text of each of its tokens."""
        result.logprobs = values
        result.tokens = [self.tokenizer.decode([i], skip_special_tokens=False) for i in result.token_ids]

    def generate_batch(self, requests: list[DecodeRequest]) -> list[Generation]:
        """Decode every request's reply together (see `graph.inference.batching.decode_batch`)."""
        from graph.inference.batching import decode_batch

        with self.lock:
            return decode_batch(self, requests)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def decode_reply(self, ids: list[int], prompt: list[int], stop: list[str] | None, limit: int) -> Generation:
        """The reply of the sampled `ids`: text cut at the end of turn or a stop string, and why it finished."""
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
        from graph.inference.chat_template import DEFAULT_SYSTEM

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
        from graph.inference.smollm2 import ensure_smollm2

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
