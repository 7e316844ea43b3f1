"""Contact sheets: one row per sample (normal | anomaly | mask | label), for people to look at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tools.imaging import load_image, save_png_atomic


@dataclass(frozen=True)
class SheetRow:
    normal: str
    anomaly: str
    mask: str
    label: str


def make_contact_sheet(rows: list[SheetRow], path: Path, *, thumb: int = 128, max_rows: int = 64, label_width: int = 300) -> Path:
    """Write a PNG with up to `max_rows` rows; says how many were left out when there are more.

    Why a cap: a sheet is for looking at; past a few dozen rows nobody does, and the file grows huge.
    """
    shown = rows[:max_rows]
    pad = 4
    height = len(shown) * (thumb + pad) + pad + (18 if len(rows) > max_rows else 0)
    sheet = Image.new("RGB", (3 * (thumb + pad) + pad + label_width, max(height, thumb)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(shown):
        y = pad + r * (thumb + pad)
        for c, source in enumerate((row.normal, row.anomaly, row.mask)):
            tile = Image.fromarray(load_image(source, min_side=1)).resize((thumb, thumb), Image.Resampling.LANCZOS)
            sheet.paste(tile, (pad + c * (thumb + pad), y))
        draw.text((3 * (thumb + pad) + pad, y + thumb // 2 - 6), row.label, fill=(0, 0, 0))
    if len(rows) > max_rows:
        draw.text((pad, height - 16), f"... {len(rows) - max_rows} more rows not shown", fill=(120, 0, 0))
    return save_png_atomic(np.asarray(sheet), Path(path))
