"""Optional Weights & Biases logging (the `wandb` extra): one W&B run per run directory.

Its id is made at the run directory's first start and kept there (`RunLayout.wandb_id`), so every attempt
(requeues included) and linear evaluation after pretraining log into that one W&B run, each phase against
its own step axis (`pretrain/step`, `lincls/<mode>/step`). Offline, W&B writes one
`<run_dir>/wandb/offline-run-*` folder per attempt and phase, all with that id; `wandb sync` uploads them
in order as the one run.

W&B never stops training: a failure (no network online, its service process gone, as after SLURM's SIGTERM
at preemption, which reaches every process of the job) is warned about once and W&B is off for the rest of
the process. metrics.jsonl stays the complete record.
"""

from __future__ import annotations

import re
import secrets
import warnings
from typing import Any

from sogclr.contract.atomic import write_atomic
from sogclr.contract.config import RunConfig
from sogclr.contract.layout import RunLayout


def wandb_run_id(cfg: RunConfig) -> str:
    """The run directory's W&B run id: `<run name>-<8 random hex digits>`, made and stored the first time."""
    path = RunLayout(cfg.run_dir).wandb_id
    if path.is_file():
        return path.read_text().strip()
    # W&B ids allow letters, digits, '-' and '_'; the random part keeps equally named runs apart.
    run_id = f"{re.sub(r'[^A-Za-z0-9_-]+', '-', run_name(cfg))[:48]}-{secrets.token_hex(4)}"
    write_atomic(path, lambda f: f.write(f"{run_id}\n".encode()))
    return run_id


def run_name(cfg: RunConfig) -> str:
    return str(cfg.meta.get("run") or cfg.run_dir.name)


class WandbRun:
    """The W&B run of `cfg`'s run directory, opened for one phase; records go under `<phase>/`."""

    def __init__(self, cfg: RunConfig, phase: str) -> None:
        self.phase = phase
        self.run: Any = None
        settings = cfg.wandb
        try:
            import wandb  # optional dependency: import only if asked

            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                group=settings.group or cfg.meta.get("sweep"),
                tags=settings.tags,
                name=run_name(cfg),
                id=wandb_run_id(cfg),
                resume="allow",
                mode=settings.mode,
                dir=str(RunLayout(cfg.run_dir).wandb.parent),  # W&B writes into <dir>/wandb/
                config=cfg.model_dump(mode="json"),
                settings=wandb.Settings(console="off"),  # the console stays ours (rich, SLURM logs)
            )
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        except Exception as error:
            self._give_up("start", error)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record's numbers at `step` of this phase."""
        if self.run is None:
            return
        numbers = {f"{self.phase}/{key}": value for key, value in values.items() if _is_number(value)}
        try:
            self.run.log({f"{self.phase}/step": step, **numbers})
        except Exception as error:
            self._give_up("log", error)

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as error:
            self._give_up("finish", error)
        self.run = None

    def _give_up(self, action: str, error: Exception) -> None:
        warnings.warn(
            f"W&B could not {action} ({type(error).__name__}: {error}); W&B logging is off for the rest "
            "of this process (metrics.jsonl has every record)",
            stacklevel=3,
        )
        self.run = None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
