"""The report's figures, drawn headless (matplotlib's Agg backend) from what launch/results.py collects.

<sweep dir>/report/top1-<field>.png    linear top-1 against each numeric swept field, one line per loss
<sweep dir>/report/curves-<run>.png    a run's training objective, global objective and kNN top-1 by epoch
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from launch.results import RunRow, Series, numeric_fields, short, top1_series  # noqa: E402

CURVE_PANELS = {
    "objective": "training objective",
    "global_objective": "global objective (exact)",
    "knn_top1": "kNN top-1 (%)",
}


def write_figures(rows: list[RunRow], directory: Path) -> list[Path]:
    """Every figure of the report into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [top1_figure(rows, key, directory / f"top1-{short(key)}.png") for key in numeric_fields(rows)]
    return paths + [curves_figure(row, directory / f"curves-{row.run}.png") for row in rows if row.curves]


def top1_figure(rows: list[RunRow], key: str, path: Path) -> Path:
    series = top1_series(rows, key)
    values = sorted({row.point[key] for row in rows})
    missing = sum(row.linear_top1 is None for row in rows)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for line in series:
        ax.plot(line.x, line.y, marker="o", label=line.label)
    if values[0] > 0 and values[-1] / values[0] >= 4:  # batch sizes, learning rates: a log axis
        ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()
    ax.set_xlabel(short(key))
    ax.set_ylabel("linear top-1 (%)")
    unfinished = f" ({missing} run(s) unfinished)" if missing else ""
    ax.set_title(f"linear top-1 against {short(key)}{unfinished}")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    return _save(fig, path)


def curves_figure(row: RunRow, path: Path) -> Path:
    """One panel per curve; kNN top-1 always has one, saying so when the run logs none."""
    keys = [key for key in CURVE_PANELS if key in row.curves or key == "knn_top1"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        curve: Series | None = row.curves.get(key)
        if curve is None:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.plot(curve.x, curve.y, marker="o" if key != "objective" else None, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(CURVE_PANELS[key])
        ax.set_xlim(0, row.epochs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{row.run} ({row.standing})")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
