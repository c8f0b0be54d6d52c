"""One run's side of successive halving: at a rung, rank 0 applies the rule of `sogclr.contract.rungs`
and every rank follows its decision (broadcast), so that all ranks stop or continue together."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from sogclr.contract.config import RunConfig, recipe, yardstick
from sogclr.contract.layout import RunLayout
from sogclr.contract.rungs import Contender, RungRecords
from sogclr.contract.state import read_state, update_state
from sogclr.distributed import DistEnv, broadcast_from_main


class Pruner:
    """One run's side of the sweep's successive halving; every rank builds one, rank 0 does the files.

    `fresh`: the run starts from scratch (no checkpoint): a new training identity, and the run's records
    of an earlier training are removed first. `stopped` holds the state.json `pruned` object once the run
    is pruned.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, fresh: bool) -> None:
        self.cfg = cfg.prune
        self.env = env
        self.stopped: dict[str, Any] | None = None
        self.who: Contender | None = None
        if env.is_main:
            name = cfg.run_dir.name
            training = training_identity(cfg, fresh)
            self.who = Contender(name, training, yardstick(cfg.pretrain, self.cfg.metric))

    def at_epoch_end(self, epochs_done: int, values: dict[str, float], step: int) -> bool:
        """After an epoch and its metrics: at a rung, decide; True if the run stops here."""
        if epochs_done not in self.cfg.rungs:
            return False
        decision = None
        if self.env.is_main:
            if self.cfg.metric not in values:  # the config's validation rules this out
                raise RuntimeError(f"prune: {self.cfg.metric} was not computed after epoch {epochs_done}")
            rung = RungRecords(self.cfg.records, epochs_done)
            decision = rung.decide(self.who, self.cfg, values[self.cfg.metric], step)
        return self._follow(broadcast_from_main(self.env, decision))

    def decided_before(self, epochs_done: int) -> bool:
        """At resume: True if a rung already passed (a requeue after the decision, before the run could
        record it) decided that this run stops, and no promotion has continued it since. Every rank gets
        rank 0's answer."""
        decision = None
        if self.env.is_main:
            passed = [RungRecords(self.cfg.records, rung) for rung in self.cfg.rungs if rung <= epochs_done]
            decisions = [d for rung in passed if (d := rung.standing(self.who, self.cfg)) is not None]
            decision = next((d for d in decisions if not d["continue"]), None)
        return self._follow(broadcast_from_main(self.env, decision))

    def _follow(self, decision: dict[str, Any] | None) -> bool:
        if decision is None or decision["continue"]:
            return False
        path = RungRecords(self.cfg.records, decision["rung"]).decision_path(decision["run"])
        self.stopped = {
            "epoch": decision["rung"],
            "metric": decision["metric"],
            "value": decision["value"],
            "threshold": decision["threshold"],
            "decision": str(path),
        }
        return True


def training_identity(cfg: RunConfig, fresh: bool) -> str:
    """The identity of the run's current training, kept in state.json (`training`): the digest of its
    pretraining recipe and a random part, new at each start from scratch, when the run's records,
    decisions and verdicts of an earlier training are removed from every rung (review 2026-12-05, N1)."""
    state_path = RunLayout(cfg.run_dir).pretrain.state
    known = read_state(state_path).get("training")
    if known is not None and not fresh:
        return known
    for rung in cfg.prune.rungs:
        RungRecords(cfg.prune.records, rung).forget(cfg.run_dir.name)
    digest = hashlib.sha256(
        json.dumps(recipe(cfg.model_dump(mode="json"), ["pretrain"]), sort_keys=True).encode()
    )
    training = f"{digest.hexdigest()[:12]}-{secrets.token_hex(4)}"
    update_state(state_path, training=training)
    return training
