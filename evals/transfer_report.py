"""Writes the transfer benchmark: report.json, report.md, bars.png (error bars) and contact sheets.

Why the protocol and the settings travel with the table: a transfer number means nothing without
what was held out and what the detector was allowed; a table copied out of context must still say so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tools.imaging import write_json_atomic, write_text_atomic

NOTES = (
    "AUROC/AP: image level, held-out normals against one source's anomalies per category, every image in "
    "every stored format (PNG and JPEG) scored; mean over categories, then over the row's held-out sources; "
    "mean ± sample std over every detector of every data draw.",
    "Held-out sources: every other generator's anomalies on held-out normals (agent and open_loop share an "
    "engine and are not tested on each other's output) and the engine's family sets `engine:F`, which the "
    "engine rows are tested on by a detector trained without family F. Rows average over different "
    "generator sources (never their own); agent and open_loop have the same set. The column 'other "
    "generators only' leaves the engine:F sources out. Test anomalies smaller than QE's resolution floor "
    "(24 px) are left out of every source.",
    "open_loop is the agent's own first image of every run (the same samples, seeds and instructions through "
    "the same batch path, one image attempt), so agent − open_loop is what the loop alone adds.",
    "Detector: a small head on frozen ImageNet features (EfficientNet-Lite0, strides 4 and 8) unless the config "
    "says backbone '' (a UNet from scratch); the same for every row. Each anomaly crop holds part of its defect.",
    "samples/s = anomalies written / generation seconds in this run (train and test sets), loads included.",
    "Synthetic test sources, not real defects.",
)


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _detectors(cfg: dict[str, Any]) -> str:
    """'N detectors (D data draws × S seeds)'."""
    draws, seeds = cfg.get("data_draws", 1), cfg["detector_seeds"]
    return f"{draws * seeds} detectors ({draws} data draws × {seeds} seeds)"


def _gain(gain: dict[str, Any]) -> str:
    """The gain with its standard error and what that error is taken over."""
    over = f"over {gain['draws']} data draws" if gain["draws"] > 1 else f"over {gain['seeds']} detector seeds of one data draw"
    return f"{gain['mean']:+.4f} ± {_f(gain['se'])} (standard error {over}; {_f(gain['z'])} standard errors)."


def _table(title: str, corner: str, columns: list[str], cells: dict[str, list[str]]) -> list[str]:
    """A titled markdown table: one row per key of `cells`, one column per entry of `columns`."""
    lines = ["", f"## {title}", "", f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: main table, paired gain, per-source AUROC, per-format AUROC, settings."""
    rows = report["rows"]
    cfg = report["config"]
    lines = ["# Transfer benchmark", "", report["protocol"], ""]
    lines += [
        f"| generator | image AUROC (mean ± std over {_detectors(cfg)}) | image AP | held-out sources "
        "| image AUROC, other generators only | samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for gen, r in rows.items():
        lines.append(
            f"| {gen} | {_f(r['auroc'])} ± {_f(r['auroc_std'])} | {_f(r['ap'])} ± {_f(r['ap_std'])} "
            f"| {len(r['sources'])} | {_f(r['generators_auroc'])} ± {_f(r['generators_auroc_std'])} "
            f"| {r['samples_per_s']:.2f} |"
        )
    gain = report.get("agent_minus_open_loop")
    lines.append("")
    if gain:
        lines.append(f"agent − open_loop, image AUROC, paired (same detector seeds, same test sets): {_gain(gain)}")
        if gain["draws"] > 1:
            lines.append(
                "Per data draw: " + ", ".join(f"{g:+.4f}" for g in gain["per_draw"])
                + f"; over detector seeds alone the standard error would be {_f(gain['se_detectors'])}."
            )
    if gain_generators := report.get("agent_minus_open_loop_generators"):
        lines.append(f"The same on the other generators' sources only: {_gain(gain_generators)}")
    if report.get("best_other"):
        lines.append(f"Best row other than agent and open_loop: {report['best_other']}.")
    lines += ["", *(f"- {n}" for n in NOTES)]
    sources = sorted({s for r in rows.values() for s in r["sources"]})
    lines += _table(
        "Image AUROC per held-out source (mean ± std over detectors; - = not held out for this row)",
        "trained on \\ tested on",
        sources,
        {
            gen: [f"{_f(r['sources'][s]['auroc'])} ± {_f(r['sources'][s]['auroc_std'])}" if s in r["sources"] else "-"
                  for s in sources]
            for gen, r in rows.items()
        },
    )
    formats = sorted({f for r in rows.values() for s in r["sources"].values() for f in s["per_format"]})
    lines += _table(
        "Image AUROC per stored format (mean over the row's sources and detectors; one format at a time)",
        "generator",
        formats,
        {
            gen: [_f(sum(s["per_format"][f] for s in r["sources"].values()) / max(1, len(r["sources"])))
                  for f in formats]
            for gen, r in rows.items()
        },
    )
    sec = report["seconds"]
    lines += [
        "",
        f"Detector: {cfg['detector']}.",
        f"Splits: {cfg['split']}. Engine families: {sorted({f for t in report['splits']['families'].values() for f in t.values()})}.",
        f"Wall time: {report['wall_seconds']} s (generation {sec['generation']} s, detectors {sec['detectors']} s); "
        f"load average at start {report['load_average']['start']}, at end {report['load_average']['end']}; "
        f"CPU time {report.get('cpu_seconds', 'n/a')} s (close to the wall time on an idle machine).",
        "",
    ]
    return "\n".join(lines)


def bar_chart(report: dict[str, Any], path: Path) -> Path:
    """Image AUROC and AP per row, mean with std over detectors (all draws) as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = list(report["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ("auroc", "ap"), ("held-out image AUROC", "held-out image AP"), strict=True):
        rows = report["rows"]
        ax.bar(
            range(len(gens)),
            [rows[g][key] for g in gens],
            yerr=[rows[g][f"{key}_std"] for g in gens],
            capsize=4,
            color=["C3" if g == "agent" else "C0" for g in gens],
        )
        ax.set_xticks(range(len(gens)), gens, rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        if key == "auroc":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"transfer: trained on one generator, tested on what it never made ({_detectors(report['config'])})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path, runs: dict[str, list]) -> list[Path]:
    """report.json, report.md, bars.png and contact_<generator>.png (normal | anomaly | mask) under `out`."""
    from tools.contact_sheet import SheetRow, make_contact_sheet

    written = [write_json_atomic(out / "report.json", report), write_text_atomic(out / "report.md", markdown(report))]
    written.append(bar_chart(report, out / "bars.png"))
    for gen, generated in runs.items():
        rows = [SheetRow(*r) for run in generated for r in run.rows[:: max(1, len(run.rows) // 3)][:3]]
        if rows:
            written.append(make_contact_sheet(rows, out / f"contact_{gen}.png", thumb=96, label_width=220))
    return written
