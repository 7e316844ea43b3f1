"""Writes the generator evaluation: report.json, report.md, bar charts, pair matrices, contact sheets.

Why the labels travel with the numbers: the IS and IC-LPIPS columns are EfficientNet-Lite0 stand-ins and
the cross-generator mode has no real defects; a table copied out of context must still say so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tools.imaging import write_json_atomic, write_text_atomic

#: (row key, column header) of the main table.
COLUMNS = (
    ("loc_ap", "loc AP (pixel)"),
    ("image_ap", "image AP"),
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_f1_max", "pixel F1-max"),
    ("cls_acc", "cls acc"),
    ("cls_acc_type_aware", "cls acc (type-aware sources)"),
    ("is", "IS*"),
    ("ic_lpips", "IC-LPIPS*"),
    ("samples_per_s", "samples/s"),
)


#: What a reader of the table must know; printed under it.
NOTES = (
    "loc AP = pixel AP of the UNet; image AP/AUROC from the max of the 21x21 average-pooled map.",
    "cls acc = ResNet34 defect-type accuracy; the epoch of both detectors is chosen on held-out generated data.",
    "cls acc (type-aware sources) = the same mean over test sources whose anomalies follow their type label "
    "(real, agent, open_loop) only.",
    "DRAEM-style and CutPaste-scar ignore the defect type, so classification tested on their output is at "
    "chance by construction (and a classifier trained on it has no type signal to learn).",
    "samples/s = anomalies written / generation seconds in this run, model and knowledge-store loads "
    "included; `anomaly-agent bench generators` measures steady-state speed.",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the main table, the pair matrices, and what every column means."""
    rows = report["rows"]
    lines = [f"# Generator evaluation ({report['mode']})", "", report["protocol"], ""]
    lines.append("| generator | " + " | ".join(h for _, h in COLUMNS) + " | IC-LPIPS empty clusters |")
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    for gen, row in rows.items():
        cells = [_fmt(row[k]) for k, _ in COLUMNS] + [
            f"{row['ic_lpips_empty_clusters']}/{row['ic_lpips_clusters']}"
        ]
        lines.append(f"| {gen} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"\\* {report['labels']['is']}; {report['labels']['ic_lpips']}. Never compare with published IS/LPIPS.",
        "",
        *(f"- {note}" for note in NOTES),
        "",
    ]
    for key, title in (
        ("pixel_ap", "pixel AP"),
        ("image_ap", "image AP"),
        ("cls_acc", "classification accuracy"),
    ):
        sources = sorted({s for pairs in report["pairs"].values() for s in pairs})
        lines += [
            f"## {title}: trained on (row), tested on (column)",
            "",
            "| train \\ test | " + " | ".join(sources) + " |",
            "|---" * (len(sources) + 1) + "|",
        ]
        for gen, pairs in report["pairs"].items():
            lines.append(
                f"| {gen} | " + " | ".join(_fmt(pairs[s][key]) if s in pairs else "-" for s in sources) + " |"
            )
        lines.append("")
    lines += [f"Wall time: {report['wall_seconds']} s. Types: {report['types']}.", ""]
    return "\n".join(lines)


def bar_charts(report: dict[str, Any], path: Path) -> Path:
    """One bar chart per main column, generators side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = list(report["rows"])
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(2.6 * len(COLUMNS), 3.2))
    for ax, (key, title) in zip(axes, COLUMNS, strict=True):
        values = [report["rows"][g][key] for g in gens]
        ax.bar(
            range(len(gens)),
            [0 if math.isnan(v) else v for v in values],
            color=["C3" if g == "agent" else "C0" for g in gens],
        )
        ax.set_xticks(range(len(gens)), gens, rotation=60, fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{report['mode']} evaluation (* = EfficientNet-Lite0 stand-in)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pair_matrix(report: dict[str, Any], key: str, path: Path) -> Path:
    """Heat map of one metric over (train generator, test source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = list(report["pairs"])
    sources = sorted({s for pairs in report["pairs"].values() for s in pairs})
    grid = np.array([[report["pairs"][g].get(s, {}).get(key, np.nan) for s in sources] for g in gens], float)
    fig, ax = plt.subplots(figsize=(1.2 * len(sources) + 2, 0.6 * len(gens) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(sources)), sources, rotation=30, fontsize=8)
    ax.set_yticks(range(len(gens)), gens, fontsize=8)
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    ax.set_title(key)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out: Path, runs: dict[str, list]) -> None:
    """report.json, report.md, bars.png, matrix_<metric>.png and contact_<generator>.png under `out`."""
    from tools.contact_sheet import SheetRow, make_contact_sheet

    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))
    bar_charts(report, out / "bars.png")
    for key in ("pixel_ap", "cls_acc"):
        pair_matrix(report, key, out / f"matrix_{key}.png")
    for gen, generated in runs.items():
        rows = [SheetRow(*r) for run in generated for r in run.rows[:: max(1, len(run.rows) // 6)][:6]]
        if rows:
            make_contact_sheet(rows, out / f"contact_{gen}.png", thumb=96, label_width=200)
