"""A finished run's outputs: the anomaly image, its mask, and the trajectory record (DESIGN §6).

Why the record is written here, by the graph: every caller (CLI, batch, `langgraph dev`, Python) gets
the same files, and training reads the same record whichever way the run was started.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from graph.configuration import Configuration
from graph.policies.chat import to_openai_messages
from graph.state import AgentState
from graph.tool_calls import tool_schemas
from tools.image_store import ImageStore
from tools.imaging import encode_data_url, save_png_atomic, write_json_atomic

ANOMALY_FILE = "anomaly.png"
MASK_FILE = "mask.png"
TRAJECTORY_FILE = "trajectory.json"


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def write_outputs(
    state: AgentState, cfg: Configuration, *, chosen: int | None, status: str, mask_by: str = "policy"
) -> dict[str, Any]:
    """Write anomaly.png, mask.png and trajectory.json into the run directory; return the result dict."""
    run_dir = Path(state["run_dir"])
    store = ImageStore(run_dir)
    result: dict[str, Any] = {
        "status": status,
        "run_dir": str(run_dir),
        "steps": state.get("steps", 0),
        "image_gens": state.get("image_gens", 0),
        "image": chosen,
        "timings": {k: round(v, 4) for k, v in (state.get("timings") or {}).items()},
    }
    if state.get("error"):
        result["error"] = state["error"]
    if chosen is not None:
        key = str(chosen)
        anomaly = store.get(state["images"][key])
        mask = store.get(state["masks"][key]["mask_id"])
        result["anomaly_path"] = str(save_png_atomic(anomaly, run_dir / ANOMALY_FILE))
        result["mask_path"] = str(save_png_atomic(mask, run_dir / MASK_FILE))
        result["mask_by"] = mask_by
        result["mask_area_fraction"] = float(mask.mean())
        evaluation = (state.get("evaluations") or {}).get(key)
        if evaluation:
            result.update(
                score=evaluation["location"] + evaluation["quality"],
                location=evaluation["location"],
                quality=evaluation["quality"],
                passed=evaluation["passed"],
            )
        region_id = (state.get("generations") or {}).get(key, {}).get("region_id")
        if region_id:
            result["mask_iou"] = mask_iou(mask, store.get(region_id))
        if cfg.storage.return_data_urls:
            result["anomaly_data_url"] = encode_data_url(anomaly)
            result["mask_data_url"] = encode_data_url(mask)
    record = trajectory_record(state, result)
    result["trajectory_path"] = str(write_json_atomic(run_dir / TRAJECTORY_FILE, record))
    return result


def trajectory_record(state: AgentState, result: dict[str, Any]) -> dict[str, Any]:
    """The JSON trajectory of a run: OpenAI-format messages with tool calls, tool schemas, artefacts."""
    run_dir = Path(state["run_dir"])
    store = ImageStore(run_dir)
    images = {k: str(store.path(v).relative_to(run_dir)) for k, v in (state.get("images") or {}).items()}
    return {
        "id": run_dir.name,
        "category": state.get("category"),
        "anomaly_type": state.get("anomaly_type"),
        "seed": state.get("seed", 0),
        "source": "graph",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "images": images,
        # The same conversion the policies are sent, so unparseable calls stay paired with their errors.
        "messages": to_openai_messages(state.get("messages", [])),
        "tools": tool_schemas(),
        "calls": state.get("calls", []),
        "generations": state.get("generations", {}),
        "evaluations": state.get("evaluations", {}),
        "masks": state.get("masks", {}),
        "knowledge": state.get("knowledge", []),
        "final": {k: v for k, v in result.items() if not k.endswith("_data_url")},
        "status": result["status"],
    }
