"""The resumable training loop shared by pretraining and linear evaluation.

A `Session` owns what every training process does at a step boundary: it agrees with the other ranks
on whether a stop signal arrived anywhere and whether a checkpoint is due, saves, and keeps `state.json`
current. `run_epochs` walks (epoch, step) from the resume position; callers supply batches and the step.

Everything numeric in a checkpoint is a function of the step counter or saved state, so when and how often
checkpoints are written never changes the result: a resumed run continues bit for bit (on GPU with
`pretrain.deterministic`, else up to the float rounding of the convolutions cuDNN picks at each start).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sogclr.contract.config import recipe_differences
from sogclr.contract.state import read_state, update_state
from sogclr.data.staging import StoppedWhileStaging, Watch, report_staging
from sogclr.distributed import (
    DistEnv,
    StopSignals,
    agree,
    broadcast_from_main,
    cleanup,
    init_distributed,
    is_peer_failure,
)
from sogclr.training.checkpoint import CheckpointManager, load_file, rng_state, set_rng_state
from sogclr.training.datacheck import TrainingData
from sogclr.training.watchdog import Watchdog, progressed


@dataclass
class Progress:
    """Position in training: epoch and step inside it; `global_step` counts optimizer steps taken."""

    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def advance(self) -> None:
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


class Session:
    """Checkpoints, stop signals and `state.json` of one training process (all ranks build one).

    `stateful` maps checkpoint keys to objects with `state_dict`/`load_state_dict` (the bare model, not
    its DDP wrapper; the optimizer; the loss with its u buffer; the grad scaler). `phase` names whose recipe
    (sogclr/contract/config.py) a resume must find unchanged; `identity` holds what else a checkpoint must
    match, name -> digest (linear evaluation's backbone). `data`, the training split, is recorded in every
    checkpoint and checked at resume (sogclr/training/datacheck.py)."""

    def __init__(
        self,
        env: DistEnv,
        signals: StopSignals,
        checkpoints: CheckpointManager,
        state_path: Path,
        stateful: dict[str, Any],
        progress: Progress,
        total_steps: int,
        config: dict[str, Any],
        phase: str,
        identity: dict[str, str] | None = None,
        data: TrainingData | None = None,
    ) -> None:
        self.env = env
        self.signals = signals
        self.checkpoints = checkpoints
        self.state_path = state_path
        self.stateful = stateful
        self.progress = progress
        self.total_steps = total_steps
        self.config = config
        self.phase = phase
        self.identity = identity or {}
        self.data = data
        self.saved_step: int | None = None

    def resume(self) -> Progress:
        """Load the newest readable checkpoint, if any, into the stateful objects and the RNGs.

        Rank 0 chooses the file and every rank loads exactly that one: a rank that cannot read it fails
        the run rather than resuming from another step than its peers.
        """
        payload = self._load_resume_point()
        if payload is not None:
            if self.data is not None:
                payload = self.data.reconcile(payload, self.stateful, self.progress.steps_per_epoch)
            if payload["steps_per_epoch"] != self.progress.steps_per_epoch:
                raise ValueError(
                    f"checkpoint has {payload['steps_per_epoch']} steps per epoch, this run "
                    f"{self.progress.steps_per_epoch}: the dataset or global batch size changed"
                )
            if differences := self._differences(payload):
                # continuing would mix two schedules (epochs, lr, gamma) in one run without a word
                raise ValueError(
                    f"checkpoint's recipe differs from this run's config: {'; '.join(differences)}"
                )
            for key, obj in self.stateful.items():
                obj.load_state_dict(payload[key])
            set_rng_state(payload["rng"])
            self.progress.epoch, self.progress.step_in_epoch = payload["epoch"], payload["step_in_epoch"]
            self.saved_step = self.progress.global_step
        self.record(status="running", total_steps=self.total_steps, error=None, failure=None, signal=None)
        return self.progress

    def _differences(self, payload: dict[str, Any]) -> list[str]:
        """What the checkpoint's training trajectory and this run's differ in: the phase's recipe fields,
        and the identities both record (a checkpoint from before one was recorded is not held to it)."""
        saved = payload.get("identity", {})
        return recipe_differences(payload["config"], self.config, [self.phase]) + [
            f"{name}: {saved[name]} -> {digest}"
            for name, digest in self.identity.items()
            if name in saved and saved[name] != digest
        ]

    def _load_resume_point(self) -> dict[str, Any] | None:
        chosen, payload = None, None
        if self.env.is_main:
            self.checkpoints.remove_temporary_files()
            if (latest := self.checkpoints.load_latest()) is not None:
                chosen, payload = latest
        chosen = broadcast_from_main(self.env, chosen and str(chosen))
        if chosen is None or self.env.is_main:
            return payload
        try:
            return load_file(Path(chosen))
        except Exception as error:
            raise RuntimeError(
                f"rank {self.env.rank} cannot read the checkpoint rank 0 resumes from, {chosen}: "
                f"{type(error).__name__}: {error}"
            ) from error

    def save(self) -> None:
        """Checkpoint the current position (once per step: a second call at the same step is a no-op)."""
        progress = self.progress
        if self.saved_step == progress.global_step:
            return
        started = time.monotonic()
        payload = {key: obj.state_dict() for key, obj in self.stateful.items()}
        payload.update(
            epoch=progress.epoch,
            step_in_epoch=progress.step_in_epoch,
            global_step=progress.global_step,
            steps_per_epoch=progress.steps_per_epoch,
            world_size=self.env.world_size,
            rng=rng_state(),
            config=self.config,
            identity=self.identity,
            data=self.data and self.data.record(),
        )
        self.checkpoints.save(payload, progress.global_step)
        self.saved_step = progress.global_step
        # What a stop on a signal costs: it must fit in the warning lead and the cluster's grace time.
        self.record(status="running", last_save_s=round(time.monotonic() - started, 3))

    def boundary(self, epoch_end: bool) -> bool:
        """At a step boundary: save if due; on a stop signal (any rank) save and return True."""
        progressed()
        stop, time_due = agree(
            self.env, self.signals.received is not None, self.env.is_main and self.checkpoints.time_due()
        )
        if stop:
            # `preempted` before the save: a stop killed mid-save (grace time too short) is still a stop,
            # resumed from the previous checkpoint, not a transient failure against max_failures
            self.record(status="preempted", signal=stop_signal(self.signals))
        if stop or time_due or epoch_end or self.checkpoints.step_due(self.progress.global_step):
            self.save()
        if stop:
            self.record(status="preempted", signal=stop_signal(self.signals))
        return stop

    def finish(self) -> None:
        """Save the end state and keep it as the final checkpoint."""
        self.save()
        self.checkpoints.mark_final()

    def record(self, **fields: Any) -> None:
        """Update state.json (rank 0) with `fields` and the current position."""
        if self.env.is_main:
            update_state(
                self.state_path,
                epoch=self.progress.epoch,
                step=self.saved_step or 0,
                **fields,
            )


def stop_agreed(env: DistEnv, signals: StopSignals) -> bool:
    """Whether a stop signal reached any rank: a collective, every rank calls it at the same point."""
    return agree(env, signals.received is not None)[0]


def stop_signal(signals: StopSignals) -> str:
    """The stop signal's name as state.json records it (`peer`: another rank got it)."""
    return getattr(signals.received, "name", "peer")


def run_epochs(
    session: Session,
    epochs: int,
    batches: Callable[[int, int], Iterable[Any]],
    step: Callable[[Any], None],
    end_of_epoch: Callable[[int], bool | None] | None = None,
) -> bool:
    """Train from the session's position to the end of `epochs`, or to an epoch after which
    `end_of_epoch` says to end (True: a pruned run); False if stopped by a signal.

    `batches(epoch, start_step)` yields the epoch's batches from `start_step` on; `step(batch)` takes one
    optimizer step at `session.progress` (before it advances); `end_of_epoch(epoch)` runs after an
    epoch's last step, before the checkpoint that closes the epoch. An end it asks for wins over a stop
    signal at the same boundary: the checkpoint is saved either way, and the run is over.
    """
    progress = session.progress
    for epoch in range(progress.epoch, epochs):
        for batch in batches(epoch, progress.step_in_epoch):
            step(batch)
            progress.advance()
            epoch_end = progress.step_in_epoch == 0
            ends_here = epoch_end and end_of_epoch is not None and bool(end_of_epoch(epoch))
            if session.boundary(epoch_end) and not ends_here:
                return False
            if ends_here:
                return True
    return True


def run_process(
    state_path: Path,
    body: Callable[[DistEnv, StopSignals], str],
    collective_timeout_s: float = 300.0,
    progress_timeout_minutes: float | None = None,
) -> str:
    """Run `body(env, signals)` inside this process's distributed context, stop-signal handlers and
    progress watchdog (sogclr/training/watchdog.py).

    An exception is recorded as `failed` in `state_path` (by every rank that raises: only the failing rank
    knows the message; writes are atomic replaces), then propagates. The process group is always torn down.
    """
    # signals before joining the group: a warning during start-up is kept
    with StopSignals() as signals, Watchdog(state_path, progress_timeout_minutes):
        env = init_distributed(collective_timeout_s)
        try:
            with _recording_failure(state_path):
                try:
                    return body(env, signals)
                except StoppedWhileStaging:  # nothing trained yet this attempt: nothing to save
                    if env.is_main:
                        update_state(
                            state_path, status="preempted", signal=stop_signal(signals), staging=None
                        )
                    return "preempted"
        finally:
            cleanup(env)


def staging_watch(env: DistEnv, signals: StopSignals, state_path: Path) -> Watch:
    """How copying shards to the node (sogclr/data/staging.py) hears this process's stop flag, keeps its
    watchdog quiet while bytes move, and (rank 0) shows its progress in state.json."""
    report = partial(report_staging, state_path) if env.is_main else Watch().report
    return Watch(lambda: signals.received is not None, progressed, report)


@contextmanager
def _recording_failure(state_path: Path) -> Iterator[None]:
    """Record an exception as `failed`, saying whether it was the collectives' (`failure: peer`: a
    rank or node was lost, which the job layer retries) or the training code's (`exception`: a bug).

    A peer failure never overwrites another rank's record: the rank that really failed records first,
    before its exit breaks the others' connections.
    """
    try:
        yield
    except Exception as error:
        kind = "peer" if is_peer_failure(error) else "exception"
        # (nor a stop: a rank stopped while staging leaves its peers in their first collective)
        if kind == "exception" or read_state(state_path).get("status") not in ("failed", "preempted"):
            update_state(state_path, status="failed", failure=kind, error=f"{type(error).__name__}: {error}")
        raise
