"""Baseline defect generators, compared with the agent: open loop, DRAEM-style, CutPaste-scar, and the
third-party `defect-synthesis` package."""

from __future__ import annotations

from evals.baselines.base import Baseline, Stages, Synthetic

#: Baseline name -> "module:Class"; built only when asked for (the open loop loads the knowledge catalog).
BASELINES: dict[str, str] = {
    "open_loop": "evals.baselines.open_loop:OpenLoop",
    "draem": "evals.baselines.draem:Draem",
    "cutpaste_scar": "evals.baselines.cutpaste:CutPasteScar",
    "defect_synthesis": "evals.baselines.third_party:DefectSynthesis",
}


def make_baseline(name: str) -> Baseline:
    """The baseline called `name` (a key of `BASELINES`)."""
    import importlib

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    module, cls = BASELINES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["BASELINES", "Baseline", "Stages", "Synthetic", "make_baseline"]
