"""One run's side of successive halving: at a rung, rank 0 applies the rule of `sogclr.contract.rungs`
and every rank follows its decision (broadcast), so that all ranks stop or continue together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sogclr.contract.config import PruneConfig
from sogclr.contract.rungs import RungRecords
from sogclr.distributed import DistEnv, broadcast_from_main


class Pruner:
    """One run's side of the sweep's successive halving; every rank builds one, rank 0 does the files.

    `stopped` holds the state.json `pruned` object once the run is pruned.
    """

    def __init__(self, cfg: PruneConfig, run_dir: Path, env: DistEnv) -> None:
        self.cfg = cfg
        self.run = Path(run_dir).name
        self.env = env
        self.stopped: dict[str, Any] | None = None

    def at_epoch_end(self, epochs_done: int, values: dict[str, float], step: int) -> bool:
        """After an epoch and its metrics: at a rung, decide; True if the run stops here."""
        if epochs_done not in self.cfg.rungs:
            return False
        decision = None
        if self.env.is_main:
            if self.cfg.metric not in values:  # the config's validation rules this out
                raise RuntimeError(f"prune: {self.cfg.metric} was not computed after epoch {epochs_done}")
            decision = RungRecords(self.cfg.records, epochs_done).decide(
                self.run, self.cfg, values[self.cfg.metric], step
            )
        return self._follow(broadcast_from_main(self.env, decision))

    def decided_before(self, epochs_done: int) -> bool:
        """At resume: True if a rung already passed (a requeue after the decision, before the run could
        record it) decided that this run stops. Every rank gets rank 0's answer."""
        decision = None
        if self.env.is_main:
            passed = [RungRecords(self.cfg.records, rung) for rung in self.cfg.rungs if rung <= epochs_done]
            decisions = [d for rung in passed if (d := rung.decision(self.run)) is not None]
            decision = next((d for d in decisions if not d["continue"]), None)
        return self._follow(broadcast_from_main(self.env, decision))

    def _follow(self, decision: dict[str, Any] | None) -> bool:
        if decision is None or decision["continue"]:
            return False
        path = RungRecords(self.cfg.records, decision["rung"]).decision_path(self.run)
        self.stopped = {
            "epoch": decision["rung"],
            "metric": decision["metric"],
            "value": decision["value"],
            "threshold": decision["threshold"],
            "decision": str(path),
        }
        return True
