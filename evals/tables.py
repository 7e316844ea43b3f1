"""The two-column "measure | value" table that benchmarks and evaluations print.

Why one function: every report of ours reads the same way on a terminal, and the column set lives in
one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def measure_table(title: str, rows: Iterable[tuple[str, str]]) -> Any:
    """A rich Table with a "measure" column and a right-aligned "value" column.

    Args:
        title: the table's caption.
        rows: (measure, formatted value) pairs, in display order.

    Returns:
        A `rich.table.Table`, ready for `rich.console.Console().print`.
    """
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for measure, value in rows:
        table.add_row(measure, value)
    return table
