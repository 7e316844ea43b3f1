"""Shared fixtures: offline environment, a per-session cache, real sample images on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LANGGRAPH_CLI_NO_ANALYTICS", "1")
os.environ.setdefault("LANGGRAPH_NO_VERSION_CHECK", "true")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One knowledge-base cache for the whole session, outside the user's home."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["ANOMALY_AGENT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normal sample images written by the same code as `anomaly-agent samples`."""
    from tools.samples import make_samples

    root = tmp_path_factory.mktemp("samples")
    make_samples(root, size=128, per_category=2)
    return root
