"""Issue 19's study: the full sweep of configs/digits_prune_study.yaml against the same sweep pruned by
successive halving, read from their two output roots (nothing is trained here).

For every run: linear top-1 and CPU-hours in each sweep, where the pruned sweep stopped it; for each
sweep: CPU-hours, pretraining epochs and evaluations (the compute, free of the machine's load), and its
wall clock (first attempt's start to last attempt's end); whether the full sweep's best run survives
pruning; from the full sweep, the Spearman rank correlation between each epoch's kNN top-1 and the final
linear top-1 (is the early signal predictive?); and whether the pruned sweep's runs trained exactly as the
full sweep's up to where they stopped (their kNN top-1 at every epoch both have). Prints Markdown and
draws a figure.

    sogclr-submit configs/digits_prune_study.yaml --local --parallel 2 --set sweep.prune=null \\
        --set output_root=/tmp/prunestudy/full
    sogclr-submit configs/digits_prune_study.yaml --local --parallel 2 \\
        --set output_root=/tmp/prunestudy/pruned
    python benchmarks/prune_study.py --full /tmp/prunestudy/full --pruned /tmp/prunestudy/pruned
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from launch.inspect.results import RunRow, collect, short  # noqa: E402
from launch.manifest import read_manifest  # noqa: E402
from launch.spec import Run, expand, load_spec  # noqa: E402
from launch.standing import standings  # noqa: E402
from sogclr.contract.state import read_state  # noqa: E402

SPEC = ROOT / "configs" / "digits_prune_study.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--full", type=Path, required=True, help="output_root of the full sweep")
    parser.add_argument("--pruned", type=Path, required=True, help="output_root of the pruned sweep")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "digits_prune_study.png")
    return parser.parse_args()


def sweep(spec: Path, overrides: list[str]) -> tuple[list[Run], dict[str, RunRow]]:
    loaded = load_spec(spec, overrides)
    runs = expand(loaded)
    rows = collect(runs, standings(runs, read_manifest(loaded.directory)))
    return runs, {row.run: row for row in rows}


def knn_by_epoch(row: RunRow) -> dict[int, float]:
    curve = row.curves.get("knn_top1")
    return {} if curve is None else {int(x): y for x, y in zip(curve.x, curve.y, strict=True)}


def wall_clock(runs: list[Run]) -> float:
    """Seconds from the sweep's first attempt's start to its last attempt's end (both phases)."""
    attempts = [
        attempt
        for run in runs
        for phase in run.phases
        for attempt in read_state(run.files.phase(phase).state).get("attempts", [])
    ]
    starts = [datetime.fromisoformat(a["started"]) for a in attempts if a.get("started")]
    ends = [datetime.fromisoformat(a["ended"]) for a in attempts if a.get("ended")]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0


def correlations(rows: dict[str, RunRow]) -> dict[int, tuple[float, float]]:
    """Epoch -> Spearman's rho between that epoch's kNN top-1 and the final linear top-1 over the runs,
    and its two-sided p-value (ties get average ranks)."""
    done = [row for row in rows.values() if row.linear_top1 is not None]
    epochs = sorted(set.intersection(*(set(knn_by_epoch(row)) for row in done)))
    final = [row.linear_top1 for row in done]
    tests = {e: spearmanr([knn_by_epoch(row)[e] for row in done], final) for e in epochs}
    return {e: (float(test.statistic), float(test.pvalue)) for e, test in tests.items()}


def totals(rows: dict[str, RunRow]) -> tuple[float, int, int]:
    """CPU-hours, pretraining epochs trained and evaluations done."""
    return (
        sum(row.hours for row in rows.values()),
        sum(row.epochs_done for row in rows.values()),
        sum(row.linear_top1 is not None for row in rows.values()),
    )


def same_training(full: dict[str, RunRow], pruned: dict[str, RunRow]) -> float:
    """The largest difference between the two sweeps' kNN top-1 of a run at an epoch both logged."""
    gaps = [
        abs(knn_by_epoch(full[name])[e] - value)
        for name, row in pruned.items()
        for e, value in knn_by_epoch(row).items()
        if e in knn_by_epoch(full[name])
    ]
    return max(gaps, default=float("nan"))


def table(full: dict[str, RunRow], pruned: dict[str, RunRow], rungs: list[int]) -> str:
    swept = [short(key) for key in next(iter(full.values())).point]
    names = [*swept, *(f"kNN@{e}" for e in rungs), "full: linear top-1", "full: CPU-h"]
    names += ["pruned: standing", "pruned: linear top-1", "pruned: CPU-h"]
    lines = ["| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, row in full.items():
        other, knn = pruned[name], knn_by_epoch(row)
        cells = [str(v) for v in row.point.values()] + [f"{knn[e]:.2f}" for e in rungs]
        cells += [f"{row.linear_top1:.2f}", f"{row.hours:.3f}", other.standing]
        cells += ["-" if other.linear_top1 is None else f"{other.linear_top1:.2f}", f"{other.hours:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(
    full: dict[str, RunRow],
    pruned: dict[str, RunRow],
    rho: dict[int, tuple[float, float]],
    rungs: list[int],
    path: Path,
) -> None:
    fig, (curves, ranks) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for rung in rungs:
        for ax in (curves, ranks):
            ax.axvline(rung, color="grey", linestyle=":", linewidth=1)
    for name, row in full.items():
        knn = knn_by_epoch(row)
        label = f"{name}: {row.linear_top1:.2f}"
        (line,) = curves.plot(list(knn), list(knn.values()), marker="o", markersize=3, label=label)
        stopped = pruned[name].pruned_at
        if stopped is not None:
            curves.plot([stopped], [knn[stopped]], marker="x", markersize=11, mew=2.5, color=line.get_color())
    curves.set(xlabel="epoch (dotted: rungs; x: pruned there)", ylabel="kNN top-1 (%)")
    curves.set_title("full sweep: kNN top-1 by epoch (legend: final linear top-1)")
    curves.legend(fontsize=7, ncol=2, loc="lower right")
    curves.grid(alpha=0.3)
    ranks.plot(list(rho), [r for r, _ in rho.values()], marker="o")
    ranks.axhline(0, color="black", linewidth=0.8)
    ranks.set(xlabel="epoch", ylabel="Spearman rho", ylim=(-1, 1))
    title = f"Spearman rho (n={len(full)} runs):\nkNN top-1 at the epoch vs final linear top-1"
    ranks.set_title(title, fontsize=10)
    ranks.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    full_runs, full = sweep(args.spec, ["sweep.prune=null", f"output_root={args.full}"])
    pruned_runs, pruned = sweep(args.spec, [f"output_root={args.pruned}"])
    rungs = next(row.rungs for row in pruned.values())
    rho = correlations(full)
    print(table(full, pruned, rungs), end="\n\n")
    print("| sweep | CPU-h | pretraining epochs | evaluations | wall clock |\n|---|---|---|---|---|")
    for label, runs, rows in (("full", full_runs, full), ("pruned", pruned_runs, pruned)):
        hours, epochs, evaluations = totals(rows)
        minutes = wall_clock(runs) / 60
        print(f"| {label} | {hours:.3f} | {epochs} | {evaluations} | {minutes:.1f} min |")
    (hours_full, epochs_full, _), (hours_pruned, epochs_pruned, _) = totals(full), totals(pruned)
    print(
        f"\npruned / full: CPU-h {hours_pruned / hours_full:.2f}, "
        f"pretraining epochs {epochs_pruned / epochs_full:.2f}"
    )
    best = max(row.linear_top1 for row in full.values())
    for name in (name for name, row in full.items() if row.linear_top1 == best):
        print(f"full sweep's best: {name} ({best:.2f}); in the pruned sweep: {pruned[name].standing}")
    survivors = {name: row.linear_top1 for name, row in pruned.items() if row.linear_top1 is not None}
    if survivors:
        name = max(survivors, key=survivors.get)
        ranked = sorted(full, key=lambda n: -full[n].linear_top1)
        print(
            f"pruned sweep's best: {name} ({survivors[name]:.2f}), "
            f"{ranked.index(name) + 1} of {len(ranked)} in the full sweep"
        )
    print(f"\nSpearman rho, kNN top-1 at epoch vs final linear top-1 (full sweep, n = {len(full)}):")
    print("| epoch | " + " | ".join(str(e) + (" (rung)" if e in rungs else "") for e in rho) + " |")
    print("|---|" + "---|" * len(rho))
    print("| rho | " + " | ".join(f"{r:+.2f}" for r, _ in rho.values()) + " |")
    print("| p | " + " | ".join(f"{p:.2f}" for _, p in rho.values()) + " |")
    print(
        "\nlargest kNN top-1 difference between the sweeps at an epoch both trained: "
        f"{same_training(full, pruned):.3g}"
    )
    figure(full, pruned, rho, rungs, args.figure)
    print(f"figure: {args.figure.relative_to(ROOT) if args.figure.is_relative_to(ROOT) else args.figure}")


if __name__ == "__main__":
    main()
