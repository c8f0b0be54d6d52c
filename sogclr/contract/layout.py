"""Where a run keeps its files: the one description of a run directory, asked by every layer.

<run_dir>/config.yaml          the resolved run config (written by the launcher)
<run_dir>/state.json           pretraining's outcome record, attempts, requeues
<run_dir>/metrics.jsonl        one record per logged step
<run_dir>/checkpoints/         last.pt, ckpt-<step>.pt, final.pt
<run_dir>/tensorboard/         optional TensorBoard events
<run_dir>/lincls/              linear evaluation: the same files, one checkpoint directory per mode,
                               result.json, and features/ (the cache of extracted features)
<run_dir>/wandb/               optional W&B files (offline-run-* per attempt and phase)
<run_dir>/wandb-id             the id of the run directory's one W&B run
<run_dir>/datasets/            the dataset index, when the run was started without the launcher's
<run_dir>/slurm/, local/       the launcher's logs (submitit's folder; torchrun's output in local mode)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

PHASES = ("pretrain", "lincls")


@dataclass(frozen=True)
class PhaseLayout:
    """The files of one training phase (pretraining or linear evaluation)."""

    directory: Path

    @cached_property  # the login side asks 1,000s of runs for these: each Path built once
    def state(self) -> Path:
        return self.directory / "state.json"

    @cached_property
    def metrics(self) -> Path:
        return self.directory / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.directory / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.directory / "tensorboard"

    @cached_property
    def result(self) -> Path:
        return self.directory / "result.json"

    @property
    def features(self) -> Path:
        """Linear evaluation's cache of extracted features (sogclr/evaluation/features.py)."""
        return self.directory / "features"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @cached_property
    def pretrain(self) -> PhaseLayout:
        return PhaseLayout(self.root)

    @cached_property
    def lincls(self) -> PhaseLayout:
        return PhaseLayout(self.root / "lincls")

    def phase(self, name: str) -> PhaseLayout:
        if name not in PHASES:
            raise ValueError(f"no phase {name!r} (phases: {', '.join(PHASES)})")
        return self.pretrain if name == "pretrain" else self.lincls

    @property
    def wandb(self) -> Path:
        """W&B's own directory: it is given the run directory and writes `wandb/` into it."""
        return self.root / "wandb"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb-id"

    @property
    def datasets(self) -> Path:
        """Dataset indexes built by the run itself (the launcher's are in the sweep's `datasets/`)."""
        return self.root / "datasets"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"

    @property
    def local_logs(self) -> Path:
        return self.root / "local"
