"""Trajectory records from runs served by a LangGraph server (`langgraph dev`, LangGraph Platform, Studio, the SDK).

Why: a served run is a graph trace like a batch sample; its thread's final state holds the same
conversation, artefacts and result. Reading it through the LangGraph SDK (``threads.search``,
``threads.get_state``) and building the record with `graph.trajectory.trajectory_record`, the one
record builder, gives exactly the records a batch root gives, so `train sft` reads both alike.

Images: the state refers to images by path in the server's run store. When the exporter shares the
server's filesystem (one machine, or a shared mount) those paths are used as they are. Otherwise a run
made with ``return_data_urls`` carries its anomaly and mask as data URLs, written under `image_dir`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from training.trajectories import TrajectoryError

logger = logging.getLogger(__name__)

PAGE = 100


def parse_since(text: str) -> datetime:
    """An ISO date or date-time (UTC when no zone is given), or a one-line TrajectoryError."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TrajectoryError(f"--since {text!r}: expected an ISO date such as 2026-12-01 or 2026-12-01T08:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def records_from_langgraph(url: str, *, assistant: str = "anomaly_agent", since: datetime | None = None,
                           image_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """The trajectory record of every thread of `assistant` (a graph or assistant id) on the server at `url`.

    Args:
        since: Keep threads updated at or after this moment.
        image_dir: Where anomaly/mask data URLs are written when the state's paths are not on this machine.

    Yields:
        Records as `graph.trajectory.trajectory_record` builds them, plus ``thread_id`` (``created`` is
        when the thread was last updated); a thread whose
        run did not finish has status ``incomplete`` (dropped by the export's status filter).

    Raises:
        TrajectoryError: the server cannot be reached or answers with an error.
    """
    import httpx
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=url)
    offset = 0
    try:
        while True:
            threads = client.threads.search(limit=PAGE, offset=offset, sort_by="created_at", sort_order="asc")
            for thread in threads:
                metadata = thread.get("metadata") or {}
                if assistant not in (metadata.get("graph_id"), metadata.get("assistant_id")):
                    continue
                if since is not None and datetime.fromisoformat(thread["updated_at"]) < since:
                    continue
                values = client.threads.get_state(thread["thread_id"])["values"]
                record = _record(values, image_dir / thread["thread_id"] if image_dir else None)
                if record is not None:
                    record.update(thread_id=thread["thread_id"], created=thread["updated_at"])
                    yield record
            if len(threads) < PAGE:
                return
            offset += PAGE
    except httpx.HTTPError as error:
        raise TrajectoryError(f"cannot read threads from the LangGraph server at {url}: {error}") from None


def _record(values: dict[str, Any], image_dir: Path | None) -> dict[str, Any] | None:
    from graph.trajectory import trajectory_record

    if not isinstance(values, dict) or not values.get("messages") or not values.get("run_dir"):
        return None  # a thread without a run of this graph
    result = dict(values.get("result") or {"status": values.get("status") or "incomplete", "run_dir": values["run_dir"]})
    if image_dir is not None:
        result = _local_images(result, image_dir)
    return trajectory_record({**values, "messages": to_messages(values["messages"])}, result)


def to_messages(messages: list[dict[str, Any]]) -> list[Any]:
    """LangChain messages from the server's JSON (``type`` names the class; every other key is a field)."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    classes = {"system": SystemMessage, "human": HumanMessage, "ai": AIMessage, "tool": ToolMessage}
    out = []
    for message in messages:
        kind = message.get("type")
        if kind not in classes:
            raise TrajectoryError(f"unexpected message type {kind!r} in a served thread")
        out.append(classes[kind](**{k: v for k, v in message.items() if k != "type"}))
    return out


def _local_images(result: dict[str, Any], image_dir: Path) -> dict[str, Any]:
    """The result with its anomaly and mask on this machine: the server's files if visible, else its data URLs."""
    from tools.imaging import load_image, load_mask, save_png_atomic

    out = dict(result)
    for key, load in (("anomaly", load_image), ("mask", load_mask)):
        path, data_url = result.get(f"{key}_path"), result.get(f"{key}_data_url")
        if path and not Path(path).is_file():
            if data_url:
                out[f"{key}_path"] = str(save_png_atomic(load(data_url), image_dir / f"{key}.png"))
            else:
                logger.warning("%s is not on this machine and the run kept no data URL (run with return_data_urls)", path)
    return out
