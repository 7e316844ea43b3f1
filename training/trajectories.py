"""Trajectory records from graph traces, in one canonical form, and their JSONL / Hugging Face exports.

Why a canonical form: training reads trajectories from three places (a batch root's
``trajectories.jsonl``, per-run ``trajectory.json`` files, and SqliteSaver checkpoint threads) and
from reverse synthesis, and TRL renders whatever it is given with the tokenizer's chat template. For
training to see exactly the text the policy sees at inference, every record is normalised the same way:

* ``messages`` are OpenAI chat messages; an assistant's ``tool_calls[*].function.arguments`` is a JSON
  string written as the chat template's ``tojson`` writes a dict (``json.dumps(..., ensure_ascii=False)``),
  so a template that prints a string verbatim and one that prints ``arguments | tojson`` agree. A string
  is also the only shape Arrow can store: the five tools' argument objects have different keys, and a
  dataset column of dicts would be unified into one struct with ``null`` for every missing key.
* ``tools`` are the OpenAI function schemas (DESIGN §6). In the Hugging Face dataset they are one JSON
  string per row, which TRL's SFTTrainer decodes before rendering (same Arrow reason).

The JSONL keeps the full record (ids, category, type, image paths, evaluations, final image/mask/score,
source); the dataset keeps what SFT reads (``messages``, ``tools``, optional ``images``) plus a few
string columns to filter or split on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAJECTORY_FILE = "trajectory.json"
BATCH_FILE = "trajectories.jsonl"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
#: Columns of the exported dataset besides messages/tools/images, for filtering and splitting.
META_COLUMNS = ("id", "source", "category", "anomaly_type", "status")


class TrajectoryError(ValueError):
    """Inputs that hold no trajectory, or a record that cannot be used for training."""


# ------------------------------------------------------------------------------------------- reading


def iter_records(inputs: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Every trajectory record under `inputs`, in a stable order.

    Args:
        inputs: Any mix of: a batch output root (its ``trajectories.jsonl``; without one, every
            ``trajectory.json`` below it), a folder of runs, a ``.jsonl`` file of records, a
            ``trajectory.json`` file, or a SqliteSaver checkpoint file (every thread in it).

    Yields:
        Records as `graph.trajectory.trajectory_record` writes them (not yet normalised).
    """
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir():
            if (path / BATCH_FILE).is_file():
                yield from _read_jsonl(path / BATCH_FILE)
            else:
                files = sorted(path.rglob(TRAJECTORY_FILE))
                databases = [] if files else sorted(p for p in path.rglob("*") if p.suffix in SQLITE_SUFFIXES)
                for file in files:
                    yield json.loads(file.read_text())
                for database in databases:
                    yield from records_from_checkpoints(database)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif path.suffix in SQLITE_SUFFIXES:
            yield from records_from_checkpoints(path)
        else:
            yield json.loads(path.read_text())


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise TrajectoryError(f"{path}:{number} is not a JSON record: {error.msg}") from None


def records_from_checkpoints(database: Path) -> Iterator[dict[str, Any]]:
    """The trajectory of every thread in a SqliteSaver file, from each thread's latest checkpoint.

    A finished thread carries its `result`; an unfinished one (killed mid-run) is rebuilt from its
    state with status ``incomplete`` and no final image, so it can be inspected but is dropped by
    `normalise_record`'s training checks unless asked for.
    """
    from langgraph.checkpoint.sqlite import SqliteSaver

    from graph.graph import build_graph
    from graph.trajectory import trajectory_record

    with SqliteSaver.from_conn_string(str(database)) as saver:
        threads = sorted({c.config["configurable"]["thread_id"] for c in saver.list(None)})
        agent = build_graph(checkpointer=saver)
        for thread in threads:
            values = agent.get_state({"configurable": {"thread_id": thread}}).values
            if not values.get("run_dir") or not values.get("messages"):
                continue
            result = values.get("result") or {"status": values.get("status") or "incomplete", "run_dir": values["run_dir"]}
            record = trajectory_record(values, result)
            record["thread_id"] = thread
            yield record


# ------------------------------------------------------------------------------------------ normalising


def canonical_arguments(arguments: Any) -> str:
    """Tool-call arguments as the JSON text a chat template's ``tojson`` writes for the same object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments  # a malformed call the policy wrote: keep its text as it was
    return json.dumps(arguments, ensure_ascii=False)


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages with string contents and canonical tool-call arguments (see module docstring)."""
    out = []
    for message in messages:
        entry: dict[str, Any] = {"role": message["role"], "content": _text(message.get("content"))}
        if message["role"] == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = [
                {
                    "type": "function",
                    "id": call.get("id") or f"call_{index}",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": canonical_arguments(call["function"].get("arguments")),
                    },
                }
                for index, call in enumerate(message["tool_calls"], start=1)
            ]
        if message["role"] == "tool":
            entry["tool_call_id"] = message.get("tool_call_id") or ""
            entry["name"] = message.get("name") or ""
        out.append(entry)
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)


def normalise_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record in the canonical form (DESIGN §6), with absolute image paths.

    Raises:
        TrajectoryError: the record has no conversation (nothing to train on).
    """
    messages = record.get("messages") or []
    if not any(m.get("role") == "assistant" for m in messages):
        raise TrajectoryError(f"trajectory {record.get('id')!r} has no assistant turn")
    final = dict(record.get("final") or {})
    run_dir = final.get("run_dir") or record.get("run_dir")
    images = dict(record.get("images") or {})
    if run_dir:
        images = {k: str(Path(run_dir) / v) if not Path(v).is_absolute() else v for k, v in images.items()}
    out = {
        "id": str(record.get("id") or record.get("thread_id") or ""),
        "source": record.get("source") or "graph",
        "category": record.get("category"),
        "anomaly_type": record.get("anomaly_type"),
        "seed": record.get("seed", 0),
        "status": record.get("status") or final.get("status"),
        "images": images,
        "messages": normalise_messages(messages),
        "tools": record.get("tools") or _tool_schemas(),
        "calls": record.get("calls") or [],
        "evaluations": record.get("evaluations") or {},
        "masks": record.get("masks") or {},
        "final": final,
        "score": final.get("score"),
        "final_image": final.get("anomaly_path"),
        "final_mask": final.get("mask_path"),
    }
    for key in ("sample", "reverse", "thread_id", "created"):
        if key in record:
            out[key] = record[key]
    return out


def _tool_schemas() -> list[dict[str, Any]]:
    from graph.tool_calls import tool_schemas

    return tool_schemas()


def is_trainable(record: dict[str, Any], statuses: tuple[str, ...] = ("success", "budget_exhausted")) -> bool:
    """Whether a normalised record is a finished run worth imitating (by default: the policy masked an image)."""
    return record.get("status") in statuses and bool(record.get("final_mask"))


# ------------------------------------------------------------------------------------------- writing


def export_records(
    inputs: Iterable[str | Path],
    out: Path,
    *,
    hf_dataset: Path | None = None,
    with_images: bool = False,
    statuses: tuple[str, ...] | None = ("success", "budget_exhausted"),
    records_in: Iterable[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Read, normalise, filter and write trajectories as JSONL (and optionally a saved HF dataset).

    Args:
        inputs: See `iter_records`; with `records_in`, only names the source in messages.
        out: The JSONL file to write (one canonical record per line).
        hf_dataset: A folder for `datasets.Dataset.save_to_disk` (``messages``, ``tools``, meta columns).
        with_images: Add an ``images`` column (the normal image) and an image part to the first user
            message, for vision-language policies; text-only SFT must leave it off (TRL treats a
            dataset with images as a VLM dataset).
        statuses: Keep only runs with these statuses (None keeps all finished or not).
        records_in: Raw records to export instead of reading `inputs` (e.g. `training.served_runs`).

    Returns:
        Counts: read, kept, skipped (by reason), per source.
    """
    from tools.imaging import write_text_atomic

    records, skipped = [], {}
    read = 0
    seen: set[str] = set()
    for raw in iter_records(inputs) if records_in is None else records_in:
        read += 1
        try:
            record = normalise_record(raw)
        except TrajectoryError as error:
            skipped["no_conversation"] = skipped.get("no_conversation", 0) + 1
            logger.info("skipping: %s", error)
            continue
        if statuses is not None and not is_trainable(record, statuses):
            skipped[f"status_{record.get('status')}"] = skipped.get(f"status_{record.get('status')}", 0) + 1
            continue
        key = json.dumps(record["messages"], sort_keys=True)
        if key in seen:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen.add(key)
        records.append(record)
    if not records:
        raise TrajectoryError(f"no trajectory to export from {', '.join(map(str, inputs))} (read {read}, skipped {skipped})")
    out = Path(out)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if hf_dataset is not None:
        to_hf_dataset(records, with_images=with_images).save_to_disk(str(hf_dataset))
    sources: dict[str, int] = {}
    for record in records:
        sources[record["source"]] = sources.get(record["source"], 0) + 1
    return {"read": read, "kept": len(records), "skipped": skipped, "sources": sources, "out": str(out),
            "hf_dataset": str(hf_dataset) if hf_dataset else None}


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Canonical records from a JSONL written by `export_records` (or any record JSONL, normalised)."""
    return [normalise_record(r) for r in _read_jsonl(Path(path))]


def to_hf_dataset(records: list[dict[str, Any]], *, with_images: bool = False) -> Any:
    """A `datasets.Dataset` of the records in TRL's conversational format with tools.

    Columns: ``messages`` (role, content, tool_calls with string arguments, tool_call_id, name),
    ``tools`` (a JSON string of the schemas), the `META_COLUMNS`, and with `with_images` an ``images``
    column holding the normal image.
    """
    from datasets import Dataset, Features, Image, List, Value

    call = {"type": Value("string"), "id": Value("string"),
            "function": {"name": Value("string"), "arguments": Value("string")}}
    message = {"role": Value("string"), "content": Value("string"), "tool_calls": List(call),
               "tool_call_id": Value("string"), "name": Value("string")}
    if with_images:
        part = {"type": Value("string"), "text": Value("string")}
        message = {**message, "content": List(part)}
    features = {"messages": List(message), "tools": Value("string"), **{c: Value("string") for c in META_COLUMNS}}
    rows: dict[str, list[Any]] = {name: [] for name in features}
    if with_images:
        features["images"] = List(Image())
        rows["images"] = []
    for record in records:
        messages = [_full_message(m) for m in record["messages"]]
        if with_images:
            messages = _with_image_part(messages)
            rows["images"].append([record["images"]["1"]])
        rows["messages"].append(messages)
        rows["tools"].append(json.dumps(record["tools"], ensure_ascii=False))
        for column in META_COLUMNS:
            rows[column].append(str(record.get(column) or ""))
    return Dataset.from_dict(rows, features=Features(features))


def _full_message(message: dict[str, Any]) -> dict[str, Any]:
    """Every key present, so Arrow stores one struct type (a missing list is empty, a missing string None)."""
    return {
        "role": message["role"],
        "content": message.get("content") or "",
        "tool_calls": message.get("tool_calls") or [],
        "tool_call_id": message.get("tool_call_id"),
        "name": message.get("name"),
    }


def _with_image_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, done = [], False
    for message in messages:
        parts = [{"type": "text", "text": message["content"]}]
        if message["role"] == "user" and not done:
            parts = [{"type": "image", "text": None}, *parts]
            done = True
        out.append({**message, "content": parts})
    return out


def training_rows(dataset: Any) -> Any:
    """The dataset with only the columns SFT reads (``messages``, ``tools``, and ``images`` if present)."""
    keep = [c for c in ("messages", "tools", "images") if c in dataset.column_names]
    return dataset.select_columns(keep)
