"""The graph's nodes: `policy`, one node per tool, and `finalize` (DESIGN §3).

Why the policy node validates calls itself: a malformed or unknown call must become an error
observation the policy can read and recover from, never an exception that kills the run. The policy
node answers such calls with an error tool message and routes back to itself; only a valid call is
routed to its tool's node. Tool nodes turn their own failures (an image number that does not exist)
into error observations too.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langgraph.runtime import Runtime

from graph import prompts, tracing
from graph.configuration import Configuration, ConfigurationError, RunSettings, run_configuration
from graph.policies import PolicyError, get_policy
from graph.protocol import BUDGET_REFUSAL, best_image, error_message
from graph.run_inputs import RunInputError, check_seed, resolve_image, resolve_run_dir
from graph.state import AgentState
from graph.tool_calls import TOOL_NAMES, InvalidCall, validate_call
from graph.toolbox import get_toolbox
from graph.trajectory import write_outputs
from tools.image_store import ImageStore
from tools.image_gen.camera import jpeg_settings
from tools.imaging import load_image
from tools.mask_gen import ChangeMaskGenerator, change_mask
from tools.knowledge.catalog import load_catalog
from tools.types import BackendUnavailableError, EvaluationRequest, GenerationRequest, KnowledgeEntry, PromptRequest

logger = logging.getLogger(__name__)

FINALIZE = "finalize"
POLICY = "policy"


#: Run endings caused by infrastructure (an endpoint or model), not by the sample: batch --resume reruns them.
INFRASTRUCTURE_STATUSES = frozenset({"policy_error", "backend_error"})


class ToolFailure(Exception):
    """A tool could not run on the arguments it was given; shown to the policy as an error observation."""


# --------------------------------------------------------------------------------------------- policy


def start_run(state: AgentState, config: Configuration, *, confined: bool = False) -> dict[str, Any]:
    """Validate the inputs, store the normal image as image 1 and write the opening messages.

    A data URL input is replaced by the stored file's path, so the pixels are kept once (in the image
    store), never again in the state, its history or traces. `confined`: see `resolve_run_dir`, `resolve_image`.
    """
    for key in ("image", "category", "anomaly_type"):
        if not state.get(key):
            raise ValueError(f"missing input '{key}': give image (path or data URL), category and anomaly_type")
    catalog = load_catalog()
    category = catalog.category(state["category"])
    defect = catalog.defect(category.name, state["anomaly_type"])
    seed = check_seed(state.get("seed"), config.seed)
    run_dir = resolve_run_dir(state.get("run_dir"), config.storage.run_root, confined=confined)
    source = resolve_image(state["image"], config.storage.input_root, confined=confined)
    normal = load_image(source)
    store = ImageStore(run_dir)
    try:
        image_id = store.put(normal)
    except OSError as error:
        raise RunInputError(f"input 'run_dir': cannot write to {run_dir}: {error.strerror or error}") from None
    jpeg = jpeg_settings(source)
    subject = category.subject
    return {
        "image": str(store.path(image_id)),
        "category": category.name,
        "anomaly_type": defect.name,
        "seed": seed,
        "run_dir": str(run_dir),
        "subject": subject,
        "is_texture": category.kind == "texture",
        "default_shape": defect.shape,
        "region": defect.region,
        "jpeg_quality": jpeg.quality if jpeg else None,
        "jpeg_subsampling": jpeg.subsampling if jpeg else 2,
        "images": {"1": image_id},
        "generations": {},
        "evaluations": {},
        "masks": {},
        "knowledge": [],
        "prompt": "",
        "steps": 0,
        "image_gens": 0,
        "calls": [],
        "messages": [
            SystemMessage(
                prompts.system_prompt(
                    category=category.name,
                    anomaly_type=defect.name,
                    subject=subject,
                    max_steps=config.budget.max_steps,
                    max_image_gens=config.budget.max_image_gens,
                )
            ),
            HumanMessage(prompts.task_prompt(anomaly_type=defect.name, subject=subject)),
        ],
    }


def policy_node(
    state: AgentState, config: RunnableConfig, runtime: Runtime[RunSettings], *, served: bool = False
) -> dict[str, Any]:
    """Ask the policy for its next message and route it: to a tool, back to itself, or to finalize.

    `served`: the graph takes its inputs from a server's callers (see `start_run`, `run_configuration`).
    """
    cfg = run_configuration(config, runtime.context, served=served)
    if state.get("status") in INFRASTRUCTURE_STATUSES:
        return {"next": FINALIZE}  # a tool's backend failed: nothing the policy can do about it
    update: dict[str, Any] = start_run(state, cfg, confined=served) if not state.get("images") else {}
    view: AgentState = {**state, **update}  # type: ignore[typeddict-item]
    name, tags, metadata = tracing.run_labels(view, cfg)
    if update:
        tracing.label_graph_run(config, name, tags, metadata)
    if view.get("steps", 0) >= cfg.budget.max_steps:
        return {**update, "status": "budget_exhausted", "next": FINALIZE}

    started = time.perf_counter()
    try:
        message = tracing.traced_policy_call(config, cfg, list(view.get("messages", [])),
                                             lambda: get_policy(cfg).decide(view, cfg), tags, metadata)
    except PolicyError as error:
        # A dead endpoint or a model that cannot load: end this run (finalize keeps the best image so
        # far and records why), so a batch goes on with its next sample instead of crashing or hanging.
        logger.error("policy failed; ending the run: %s", error)
        update["timings"] = _add_time(view, POLICY, time.perf_counter() - started)
        return {**update, "status": "policy_error", "error": str(error), "next": FINALIZE}
    update["timings"] = _add_time(view, POLICY, time.perf_counter() - started)
    # On the first turn `update` already holds the opening messages; the policy's answer follows them.
    new_messages: list[Any] = [*update.pop("messages", []), message]
    if not message.tool_calls and not message.invalid_tool_calls:
        return {**update, "messages": new_messages, "next": FINALIZE}

    calls = [validate_call(c["name"], c.get("args"), c.get("id") or f"call_{uuid.uuid4().hex[:8]}") for c in message.tool_calls]
    calls += [
        InvalidCall(c.get("name") or "?", f"could not parse the tool call: {c.get('error') or 'bad JSON'}", c.get("id") or "")
        for c in message.invalid_tool_calls
    ]
    first, rest = calls[0], calls[1:]
    answer_at = len(new_messages)
    for extra in rest:
        new_messages.append(_error_message("one tool call per turn; this one was ignored", extra))

    if not isinstance(first, InvalidCall) and first.name == "image_gen" and view.get("image_gens", 0) >= cfg.budget.max_image_gens:
        first = InvalidCall(first.name, f"{BUDGET_REFUSAL}; call mask_gen on your best image", first.call_id)
    if isinstance(first, InvalidCall):
        new_messages.insert(answer_at, _error_message(first.error, first))
        return {
            **update,
            "messages": new_messages,
            "steps": view.get("steps", 0) + 1,
            "calls": [*view.get("calls", []), "invalid"],
            "next": POLICY,
        }
    return {
        **update,
        "messages": new_messages,
        "pending_call": {"name": first.name, "args": first.args.model_dump(), "id": first.call_id},
        "next": first.name,
    }


def route_from_policy(state: AgentState) -> str:
    """The node the policy's last message goes to."""
    target = state.get("next", FINALIZE)
    return target if target in (*TOOL_NAMES, POLICY, FINALIZE) else FINALIZE


def _add_time(state: AgentState, key: str, seconds: float) -> dict[str, float]:
    timings = dict(state.get("timings") or {})
    timings[key] = timings.get(key, 0.0) + seconds
    return timings


def _error_message(error: str, call: Any) -> ToolMessage:
    return error_message(prompts.error_observation(error), call.call_id or "none", call.name)


# ---------------------------------------------------------------------------------------------- tools


def _make_tool_node(name: str, run: Callable[[AgentState, dict[str, Any], Configuration], tuple[str, dict[str, Any]]]):
    """Wrap `run` (state, args, config) -> (observation, state update) as a graph node."""

    def node(state: AgentState, config: RunnableConfig, runtime: Runtime[RunSettings]) -> dict[str, Any]:
        cfg = run_configuration(config, runtime.context)
        call = state["pending_call"]
        started = time.perf_counter()
        status = "success"
        _, tags, metadata = tracing.run_labels(state, cfg)
        with tracing.tool_run(config, name, call["args"], tags, metadata) as traced:
            try:
                observation, update = run(state, call["args"], cfg)
            except ToolFailure as failure:
                observation, update, status = prompts.error_observation(str(failure)), {}, "error"
            except (BackendUnavailableError, ConfigurationError) as error:
                # The backend itself is down or misconfigured: end the run (finalize keeps the best image
                # so far) instead of crashing the batch; `batch --resume` reruns it.
                logger.error("%s backend failed; ending the run: %s", name, error)
                observation = prompts.error_observation(f"the {name} backend failed: {error}")
                update, status = {"status": "backend_error", "error": str(error)}, "error"
            traced.on_tool_end(observation)
        message = ToolMessage(content=observation, tool_call_id=call["id"], name=name, status=status)
        return {
            **update,
            "timings": _add_time(state, name, time.perf_counter() - started),
            "messages": [message],
            "steps": state.get("steps", 0) + 1,
            "calls": [*state.get("calls", []), name],
            "pending_call": {},
        }

    node.__name__ = f"{name}_node"
    node.__doc__ = f"Run the {name} tool on the pending call and answer with its observation."
    return node


def _store(state: AgentState) -> ImageStore:
    return ImageStore(Path(state["run_dir"]))


def _image(state: AgentState, number: int, *, generated: bool = False) -> Any:
    images = state.get("images") or {}
    if str(number) not in images:
        raise ToolFailure(f"there is no image {number}; the images are {', '.join(sorted(images, key=int))}")
    if generated and number == 1:
        raise ToolFailure("image 1 is the normal image; give the number of a generated image")
    return _store(state).get(images[str(number)])


def _knowledge(state: AgentState) -> list[KnowledgeEntry]:
    retrieved = [KnowledgeEntry.model_validate(k) for k in state.get("knowledge") or []]
    return retrieved or [load_catalog().entry(state["category"], state["anomaly_type"])]


def run_prompt_gen(state: AgentState, args: dict[str, Any], cfg: Configuration) -> tuple[str, dict[str, Any]]:
    request = PromptRequest(
        category=state["category"],
        anomaly_type=state["anomaly_type"],
        subject=state.get("subject", "the object"),
        knowledge=_knowledge(state),
        feedback=args.get("feedback", ""),
        seed=_derive_seed(state, "prompt_gen"),
    )
    instruction = get_toolbox(cfg).prompt.generate(request)
    return prompts.prompt_observation(instruction), {"prompt": instruction}


def run_image_gen(state: AgentState, args: dict[str, Any], cfg: Configuration) -> tuple[str, dict[str, Any]]:
    source = int(args["image"])
    image = _image(state, source)
    request = GenerationRequest(
        prompt=args["prompt"],
        category=state["category"],
        anomaly_type=state["anomaly_type"],
        is_texture=bool(state.get("is_texture")),
        default_shape=state.get("default_shape", "stain"),
        region=state.get("region"),
        seed=_derive_seed(state, "image_gen"),
        look_seed=_look_seed(state, args["prompt"], source),
        jpeg_quality=state.get("jpeg_quality"),
        jpeg_subsampling=state.get("jpeg_subsampling", 2),
    )
    result = get_toolbox(cfg).image.generate(image, request)
    store = _store(state)
    number = len(state["images"]) + 1
    info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool, list, type(None)))}
    record = {
        "prompt": args["prompt"],
        "source": source,
        "image_id": store.put(result.image),
        "region_id": store.put_mask(result.region) if result.region is not None else None,
        "spec": result.spec.model_dump() if result.spec else None,
        "info": info,
    }
    return prompts.image_observation(number, source, info), {
        "images": {**state["images"], str(number): record["image_id"]},
        "generations": {**state.get("generations", {}), str(number): record},
        "image_gens": state.get("image_gens", 0) + 1,
        "prompt": args["prompt"],
    }


def run_quality_eval(state: AgentState, args: dict[str, Any], cfg: Configuration) -> tuple[str, dict[str, Any]]:
    number = int(args["image"])
    edited = _image(state, number, generated=True)
    normal = _image(state, 1)
    generation = (state.get("generations") or {}).get(str(number), {})
    request = EvaluationRequest(
        category=state["category"],
        anomaly_type=state["anomaly_type"],
        prompt=generation.get("prompt", ""),
        is_texture=bool(state.get("is_texture")),
    )
    evaluation = get_toolbox(cfg).judge.evaluate(normal, edited, request).model_dump()
    return prompts.evaluation_observation(number, evaluation), {
        "evaluations": {**state.get("evaluations", {}), str(number): evaluation}
    }


def run_knowledge_retrieval(state: AgentState, args: dict[str, Any], cfg: Configuration) -> tuple[str, dict[str, Any]]:
    entries = get_toolbox(cfg).knowledge.retrieve(state["category"], state["anomaly_type"], query=args.get("query", ""), k=3)
    return prompts.knowledge_observation([e.as_text() for e in entries]), {
        "knowledge": [e.model_dump() for e in entries]
    }


def run_mask_gen(state: AgentState, args: dict[str, Any], cfg: Configuration) -> tuple[str, dict[str, Any]]:
    number = int(args["image"])
    edited = _image(state, number, generated=True)
    result = _mask(state, cfg, number, edited)
    record = {
        "mask_id": _store(state).put_mask(result.mask),
        "box": list(result.box) if result.box else None,
        "area_fraction": result.area_fraction,
    }
    return prompts.mask_observation(number, result.area_fraction, record["box"]), {
        "masks": {**state.get("masks", {}), str(number): record}
    }


def _mask(state: AgentState, cfg: Configuration, number: int, edited: Any) -> Any:
    """MG on image `number`; the change-mask backend also gets the region IG stored for it (see
    `ChangeMaskGenerator.generate` for the contract)."""
    mask = get_toolbox(cfg).mask
    region_id = ((state.get("generations") or {}).get(str(number)) or {}).get("region_id")
    if isinstance(mask, ChangeMaskGenerator) and region_id:
        return mask.generate(_image(state, 1), edited, known_region=_store(state).get(region_id))
    return mask.generate(_image(state, 1), edited)


TOOL_RUNNERS = {
    "prompt_gen": run_prompt_gen,
    "image_gen": run_image_gen,
    "quality_eval": run_quality_eval,
    "knowledge_retrieval": run_knowledge_retrieval,
    "mask_gen": run_mask_gen,
}
TOOL_NODES = {name: _make_tool_node(name, run) for name, run in TOOL_RUNNERS.items()}


def _derive_seed(state: AgentState, tool: str, index: int | None = None) -> int:
    """A seed per (run seed, tool, index: by default how many calls so far) so retries differ and reruns repeat."""
    index = len(state.get("calls", [])) if index is None else index
    return (int(state.get("seed", 0)) * 1_000_003 + index * 7919 + sum(map(ord, tool))) % (2**32)


def _look_seed(state: AgentState, prompt: str, source: int) -> int:
    """IG's appearance seed: the same for every new instruction of a run, a fresh one for each repeat of an earlier one.

    Why: a refined instruction then draws the same look (the quantile of every appearance range: size,
    contrast, softness, interior), so a fix moves what the review named, in the direction it named: the
    refined attempt is better, not just different. Where the defect goes and its exact outline come from
    IG's per-call seed, so a failure no word names (a seam on an unlucky spot) is not simply repeated. An
    instruction sent again word for word asks for another look, and gets one.
    """
    repeats = sum(
        1 for g in (state.get("generations") or {}).values() if g.get("prompt") == prompt and g.get("source") == source
    )
    return _derive_seed(state, "image_gen:look", index=repeats)


# ------------------------------------------------------------------------------------------- finalize


def finalize_node(state: AgentState, config: RunnableConfig, runtime: Runtime[RunSettings]) -> dict[str, Any]:
    """Choose the final image and mask, decide the status, and write the outputs to the run directory."""
    cfg = run_configuration(config, runtime.context)
    if not state.get("images"):
        raise ValueError("the run ended before it started: no normal image was stored")
    chosen, status = choose_final(state, cfg)
    update: dict[str, Any] = {"status": status}
    if chosen is None:
        update["result"] = write_outputs(state, cfg, chosen=None, status=status)
        return update
    masks = dict(state.get("masks") or {})
    mask_by = "policy"
    if str(chosen) not in masks:
        # The policy stopped (or ran out of steps) before masking its best image: mask it here so
        # every finished run has a mask, and say so in the result.
        try:
            result = _mask(state, cfg, chosen, _image(state, chosen))
            mask_by = "finalize"
        except BackendUnavailableError as error:
            # The mask model is down (the run usually ended backend_error for it already): keep the
            # image with the model-free change mask rather than lose the run.
            logger.error("mask backend failed in finalize; using the change mask: %s", error)
            result = change_mask(_image(state, 1), _image(state, chosen))
            mask_by = "finalize (change mask: the mask backend failed)"
        masks[str(chosen)] = {
            "mask_id": _store(state).put_mask(result.mask),
            "box": list(result.box) if result.box else None,
            "area_fraction": result.area_fraction,
        }
        update["masks"] = masks
    final_state: AgentState = {**state, "masks": masks}  # type: ignore[typeddict-item]
    update["result"] = write_outputs(final_state, cfg, chosen=chosen, status=status, mask_by=mask_by)
    return update


def choose_final(state: AgentState, cfg: Configuration) -> tuple[int | None, str]:
    """The image to return and the run's status.

    success: the policy masked an image that passed QE. budget_exhausted: steps or image generations
    ran out; the best-scored image is returned. policy_error / backend_error: the policy, or a tool's
    model backend, could not answer (endpoint down, model failed); the best image so far, if any, is
    returned. incomplete: the policy stopped early
    without a passing, masked image. failed: no image was generated at all.
    """
    infrastructure = state.get("status") if state.get("status") in INFRASTRUCTURE_STATUSES else None
    generations = state.get("generations") or {}
    if not generations:
        return None, infrastructure or "failed"
    evaluations = state.get("evaluations") or {}
    masks = state.get("masks") or {}
    passed_and_masked = [int(k) for k in masks if evaluations.get(k, {}).get("passed")]
    if passed_and_masked:
        return max(passed_and_masked), "success"
    best = best_image(evaluations, map(int, generations))
    if infrastructure:
        return best, infrastructure
    out_of_budget = (
        state.get("status") == "budget_exhausted"
        or state.get("steps", 0) >= cfg.budget.max_steps
        or state.get("image_gens", 0) >= cfg.budget.max_image_gens
    )
    return best, "budget_exhausted" if out_of_budget else "incomplete"
