"""Successive halving with and without ASHA's promotion: how often the final best run is trained to the
end, and what the sweep costs, over many simulated arrival orders, with the real rule
(sogclr/contract/rungs.py: `decide` on arrival, `promotions` when an attempt ends, as jobs/promote.py
gives them).

A run trains from rung to rung; each epoch takes it `speed` time units (drawn per run, 0.8 to 1.2), and
`workers` runs train at once (the queue's slots): new runs start in a random order, promoted runs first.
At a rung the run records its value and is judged against the values recorded so far; a stopped run
frees its slot. With promotion, whenever an attempt ends (a run stopped at a rung, or done) the verdicts
are given: each paused run that its rung's top now takes in is queued to continue from the rung. Costs
are epochs trained and the makespan, against the same sweep without pruning (same slots and speeds).

Sweeps:
- `digits`: the digits study's own records (configs/digits_prune_study.yaml; the table
  benchmarks/prune_study.py printed into BENCHMARKS.md, read from there): kNN top-1 at rungs 1, 2, 4 of
  8 epochs, eta 2, and each run's final linear top-1 (the quality to keep).
- `exact` and `noisy`: n runs of quality 0..n-1; the value at a rung is the quality (a perfectly
  predictive metric) or the quality plus Gaussian noise of sd n/3 (correlation about 0.65); 27
  epochs, rungs 1, 3, 9, eta 3.

    python benchmarks/promotion.py [--orders 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import heapq
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sogclr.contract.rungs import decide, promotions  # noqa: E402


@dataclass(frozen=True)
class Sweep:
    name: str
    values: dict[str, dict[int, float]]  # run -> rung -> metric value there (higher is better)
    quality: dict[str, float]  # run -> what the sweep is after (final linear top-1)
    rungs: list[int]
    epochs: int
    eta: int

    def ranked(self, place: int) -> set[str]:
        """The runs of the `place`-th best final quality (0: the best; ties share a place)."""
        return {run for run, q in self.quality.items() if q == sorted(set(self.quality.values()))[-1 - place]}


@dataclass
class Outcome:
    finished: set[str] = field(default_factory=set)
    epochs: float = 0.0
    makespan: float = 0.0
    promoted: int = 0


def simulate(sweep: Sweep, order: list[str], speed: dict[str, float], workers: int, promote: bool) -> Outcome:
    """One sweep: arrivals in `order` as slots free up; returns what trained to the end and the cost."""
    stops = {run: [*sweep.rungs, sweep.epochs] for run in order}
    recorded: dict[int, dict[str, float]] = {rung: {} for rung in sweep.rungs}
    paused: dict[int, set[str]] = {rung: set() for rung in sweep.rungs}
    reached = dict.fromkeys(order, 0)
    waiting, promoted, events, out = list(reversed(order)), [], [], Outcome()
    clock = 0.0

    def start(run: str) -> None:
        target = next(stop for stop in stops[run] if stop > reached[run])
        heapq.heappush(events, (clock + (target - reached[run]) * speed[run], run, target))

    def fill(free: int) -> int:
        while free and (promoted or waiting):
            start(promoted.pop(0) if promoted else waiting.pop())
            free -= 1
        return free

    free = fill(workers)
    while events:
        clock, run, epoch = heapq.heappop(events)
        out.epochs += epoch - reached[run]
        reached[run] = epoch
        if epoch == sweep.epochs:
            out.finished.add(run)
        else:
            recorded[epoch][run] = sweep.values[run][epoch]
            if decide(run, recorded[epoch], True, sweep.eta)["continue"]:
                start(run)
                continue
            paused[epoch].add(run)
        free += 1  # an attempt ended: a run stopped at a rung, or done
        if promote:
            for rung in sweep.rungs:
                for chosen in promotions(recorded[rung], paused[rung], True, sweep.eta):
                    paused[rung].discard(chosen)
                    promoted.append(chosen)
                    out.promoted += 1
        free = fill(free)
    out.makespan = clock
    return out


def digits_sweep() -> Sweep:
    """The digits study's records, from the table in BENCHMARKS.md."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    header = next(
        line for line in text.splitlines() if line.startswith("| run | gamma | temperature | kNN@1")
    )
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = [
        dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in text[text.index(header) :].splitlines()[2:]
        if re.match(r"\| gamma", line)
    ]
    rungs = [int(name.removeprefix("kNN@")) for name in columns if name.startswith("kNN@")]
    values = {row["run"]: {rung: float(row[f"kNN@{rung}"]) for rung in rungs} for row in rows}
    quality = {row["run"]: float(row["full: linear top-1"]) for row in rows}
    return Sweep("digits", values, quality, rungs, epochs=8, eta=2)


def synthetic(n: int, noise: float, rng: random.Random) -> Sweep:
    """n runs of quality 0..n-1, the value at each rung their quality plus noise of sd `noise` x n."""
    rungs = [1, 3, 9]
    values = {f"r{q}": {rung: q + rng.gauss(0, noise * n) for rung in rungs} for q in range(n)}
    quality = {f"r{q}": float(q) for q in range(n)}
    return Sweep(f"{'exact' if noise == 0 else 'noisy'} n={n}", values, quality, rungs, epochs=27, eta=3)


def study(make: callable, orders: int, workers: int, rng: random.Random) -> dict[str, list[float]]:
    """Per setting (`stop`, `promote`): the share of orders whose final best trained to the end, epochs
    and makespan relative to no pruning, and promotions per sweep."""
    found: dict[str, list[float]] = {}
    for _ in range(orders):
        sweep = make()
        order = list(sweep.values)
        rng.shuffle(order)
        speed = {run: rng.uniform(0.8, 1.2) for run in order}
        full = simulate(
            Sweep(sweep.name, sweep.values, sweep.quality, [], sweep.epochs, sweep.eta),
            order,
            speed,
            workers,
            False,
        )
        for label, promote in (("stop", False), ("promote", True)):
            out = simulate(sweep, order, speed, workers, promote)
            found.setdefault(f"{label} best", []).append(bool(sweep.ranked(0) & out.finished))
            found.setdefault(f"{label} second", []).append(bool(sweep.ranked(1) & out.finished))
            found.setdefault(f"{label} epochs", []).append(out.epochs / full.epochs)
            found.setdefault(f"{label} makespan", []).append(out.makespan / full.makespan)
            found.setdefault(f"{label} promotions", []).append(out.promoted)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=2000, help="arrival orders per sweep and setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    digits = digits_sweep()
    cases = [(digits.name, lambda: digits, 2), (digits.name, lambda: digits, 9)]
    for n in (9, 27, 81):
        for noise in (0.0, 1 / 3):
            sweep_rng = random.Random(rng.random())
            cases.append(
                (
                    synthetic(n, noise, sweep_rng).name,
                    lambda n=n, noise=noise, r=sweep_rng: synthetic(n, noise, r),
                    max(2, n // 3),
                )
            )
    print(f"{args.orders} arrival orders each (seed {args.seed}); ratios against the same sweep unpruned\n")
    columns = ["sweep", "runs at once", "rule", "best trained to the end", "second best", "epochs"]
    print("| " + " | ".join([*columns, "makespan", "promotions"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, make, workers in cases:
        found = study(make, args.orders, workers, rng)
        for label in ("stop", "promote"):
            best, second, epochs, makespan, promoted = (
                statistics.mean(found[f"{label} {key}"])
                for key in ("best", "second", "epochs", "makespan", "promotions")
            )
            rule = "on arrival only" if label == "stop" else "with promotion"
            cells = [
                name,
                workers,
                rule,
                f"{best:.1%}",
                f"{second:.1%}",
                f"{epochs:.2f}x",
                f"{makespan:.2f}x",
            ]
            print("| " + " | ".join(map(str, [*cells, f"{promoted:.1f}"])) + " |")


if __name__ == "__main__":
    main()
