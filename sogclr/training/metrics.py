"""Training metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard, and a console line.

Reading a value off the GPU is a device sync, so per-step values are accumulated on the device
(`DeviceMean`) and read only when a line is logged. Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sogclr.contract.atomic import write_atomic
from sogclr.contract.config import RunConfig


class DeviceMean:
    """Mean of detached scalar tensors, summed on their device; `pop` reads it (one sync) and resets."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def pop(self) -> float:
        if self.total is None:
            return float("nan")
        mean = self.total.item() / self.count
        self.total, self.count = None, 0
        return mean


class Throughput:
    """Items per second since the previous `pop`, on this process's clock."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items = 0

    def add(self, items: int) -> None:
        self.items += items

    def pop(self) -> float:
        now = time.perf_counter()
        rate = self.items / max(now - self.start, 1e-9)
        self.start, self.items = now, 0
        return rate


def estimator_stats(log_u: torch.Tensor) -> dict[str, float]:
    """Mean, min and max of SogCLR's u over the samples seen so far, from its log (-inf: never seen).

    In float64, so that u itself is representable even where float32 would overflow (tiny temperatures).
    """
    seen = log_u[torch.isfinite(log_u)].double().exp()
    if seen.numel() == 0:
        return {}
    stats = torch.stack([seen.mean(), seen.min(), seen.max()]).tolist()
    return dict(zip(("u_mean", "u_min", "u_max"), stats, strict=True))


def cut_metrics(path: Path, step: int, **match: Any) -> int:
    """Drop the records of `path` logged after `step` (of those whose fields include `match`, as
    `mode="features"`), and any line a crash cut short: a run resumed from `step` logs them again, and a
    report must not show a step twice. Returns how many lines went."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not _past(line, step, match)]
    if len(kept) < len(lines):
        write_atomic(path, lambda f: f.write("".join(kept).encode()))
    return len(lines) - len(kept)


def _past(line: str, step: int, match: dict[str, Any]) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True
    if not line.endswith("\n"):
        return True
    return record.get("step", 0) > step and all(record.get(k) == v for k, v in match.items())


class MetricsLogger:
    """Appends records to `metrics.jsonl`; mirrors them to TensorBoard, to W&B and to the console on rank 0.

    On a terminal the console shows a rich progress bar with the latest values; otherwise (SLURM logs)
    one plain line per record. W&B: when `run`'s config has a `wandb` section, records go to the run
    directory's W&B run under `description` (spaces become `/`: `pretrain/loss`, `lincls/features/top1`).
    """

    def __init__(
        self,
        path: str | Path,
        total_steps: int,
        enabled: bool = True,
        tensorboard_dir: str | Path | None = None,
        description: str = "train",
        run: RunConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        self.progress = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: import only if asked

            self.writer = SummaryWriter(str(tensorboard_dir))
        if run is not None and run.wandb is not None:
            from sogclr.training.tracking import WandbRun

            self.wandb = WandbRun(run, description.replace(" ", "/"))
        if sys.stdout.isatty():
            self.progress = _RichProgress(description, total_steps)

    def log(self, step: int, **values: Any) -> None:
        """Record `values` at global `step` (rank 0 only; a no-op elsewhere)."""
        if not self.enabled:
            return
        record = {"step": step, **values, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)
        if self.progress is not None:
            self.progress.update(step, values)
        else:
            print(f"step={step} " + _format(values), flush=True)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.progress is not None:
            self.progress.stop()


def _format(values: dict[str, Any]) -> str:
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
    )


class _RichProgress:
    def __init__(self, description: str, total_steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[values]}"),
        )
        self.task = self.bar.add_task(description, total=total_steps, values="")
        self.bar.start()

    def update(self, step: int, values: dict[str, Any]) -> None:
        self.bar.update(self.task, completed=step, values=_format(values))

    def stop(self) -> None:
        self.bar.stop()
