"""Tiny causal LMs for policy tests, built in the test from real transformers classes (no downloads).

`build_tiny_llm` writes a folder any `--model PATH` accepts: a byte-level BPE tokenizer trained on the
agent's own prompts (so prompts tokenise compactly) with our Hermes ChatML template, and a random
2-layer Llama (hidden 32). Greedy generation from it is garbage, which is the point: the graph must end
within budget whatever the model writes.

With `fixed_reply`, the weights are set by hand so that greedy decoding writes exactly that reply on
every turn: the reply is one added (non-special) token, the layers are made the identity (their output
projections are zero, so each position's logits depend only on its own token, a bigram model), and the
output rows are aimed so that the prompt's last token ("\\n" after ``assistant``) is followed by the
reply token, and the reply token by ``<|im_end|>``. This is a real model run by real `generate`; it lets
tests check the path from generated text through the server's tool-call parser to a tool being run.
"""

from __future__ import annotations

import json
from pathlib import Path

from graph import prompts
from graph.inference.chat_template import HERMES_CHATML_TEMPLATE
from graph.tool_calls import tool_schemas

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_llm(folder: Path, *, fixed_reply: str | None = None, vocab_size: int = 600, seed: int = 0) -> Path:
    """Write a tiny Llama and its tokenizer to `folder`; return the folder."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        prompts.SYSTEM_PROMPT,
        prompts.TASK_PROMPT,
        json.dumps(tool_schemas()),
        '<tool_call>\n{"name": "prompt_gen", "arguments": {}}\n</tool_call>',
        "<tool_response>\nInstruction: Generated <image 2> Error: Image 2: location quality PASS FAIL\n</tool_response>",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 3, trainer)
    if fixed_reply:
        tokenizer.add_tokens([AddedToken(fixed_reply, special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = HERMES_CHATML_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=fixed_reply is None,
    )
    model = LlamaForCausalLM(config)
    if fixed_reply:
        _aim(model, fast, fixed_reply)
    model.save_pretrained(folder)
    return folder


def _aim(model, tokenizer, reply: str) -> None:
    """Make greedy decoding after the generation prompt write `reply` and then end the turn."""
    import torch

    prompt_end = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_end, "keys"):
        prompt_end = prompt_end["input_ids"]
    last = int(prompt_end[-1])
    reply_id = tokenizer.convert_tokens_to_ids(reply)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.normal_(0.0, 0.01)
        head[reply_id] = 10 * embed[last] / embed[last].norm()
        head[tokenizer.eos_token_id] = 10 * embed[reply_id] / embed[reply_id].norm()
