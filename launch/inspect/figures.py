"""The report's figures, drawn headless (matplotlib's Agg backend) from what launch/inspect/results.py
collects.

<sweep dir>/report/top1-<field>.png    linear top-1 against each numeric swept field, one line per loss
<sweep dir>/report/curves-<run>.png    a run's training objective, global objective and kNN top-1 by epoch
<sweep dir>/report/rungs-<metric>.png  pruning: each run's metric by epoch, the rungs, where runs stopped
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are files

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from launch.inspect.results import RunRow, Series, numeric_fields, short, top1_series  # noqa: E402

CURVE_PANELS = {
    "objective": "training objective",
    "global_objective": "global objective (exact)",
    "knn_top1": "kNN top-1 (%)",
}


def write_figures(rows: list[RunRow], directory: Path) -> list[Path]:
    """Every figure of the report into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [top1_figure(rows, key, directory / f"top1-{short(key)}.png") for key in numeric_fields(rows)]
    paths += [curves_figure(row, directory / f"curves-{row.run}.png") for row in rows if row.curves]
    pruning = next((row for row in rows if row.rungs), None)
    if pruning is not None:
        paths.append(rungs_figure(rows, directory / f"rungs-{pruning.prune_metric}.png"))
    return paths


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
        if row.pruned_at is not None:
            ax.axvline(row.pruned_at, color="tab:red", linestyle="--")  # where it stopped
        ax.set_xlabel("epoch")
        ax.set_title(CURVE_PANELS[key])
        ax.set_xlim(0, row.epochs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{row.run} ({row.standing})")
    return _save(fig, path)


def rungs_figure(rows: list[RunRow], path: Path) -> Path:
    """The metric successive halving judges, by epoch, one line per run: dotted lines at the rungs and a
    cross where a pruned run stopped, so one sees which runs a rung cut and how they compared."""
    metric = next(row.prune_metric for row in rows if row.prune_metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rung in next(row.rungs for row in rows if row.rungs):
        ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    for row in rows:
        curve = row.curves.get(metric)
        if curve is None:
            continue
        (line,) = ax.plot(curve.x, curve.y, marker="o", markersize=3, label=row.run)
        if row.pruned_at in curve.x:
            stop = curve.y[curve.x.index(row.pruned_at)]
            ax.plot([row.pruned_at], [stop], marker="x", markersize=10, mew=2, color=line.get_color())
    ax.set_xlabel("epoch (dotted: rungs; x: pruned there)")
    ax.set_ylabel(CURVE_PANELS.get(metric, metric))
    ax.set_xlim(0, max(row.epochs for row in rows))
    ax.set_title(
        f"{metric} by epoch: {sum(row.pruned_at is not None for row in rows)} of {len(rows)} run(s) pruned"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(rows) > 8 else 1)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
