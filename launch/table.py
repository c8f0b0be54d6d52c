"""The launcher's tables (submission, status, dry run): plain aligned columns, like squeue's own.

Rich's Table takes seconds to lay out a sweep of a thousand runs; this takes milliseconds, and a cell is
never folded, so every line can be read (and grepped) whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)]
    lines = [title] + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                       for row in [columns, *rows]]  # fmt: skip
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
