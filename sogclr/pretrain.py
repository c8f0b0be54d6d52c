"""SogCLR pretraining: `python -m sogclr.pretrain --config FILE [--set key=value ...]`, also under torchrun.

`train` reads top to bottom: set up the process group, build data, model, loss and optimizer, resume from
the run directory, then loop over epochs and steps. A stop signal (SIGUSR2 or SIGTERM, on any rank) ends
the run at the next step boundary with one checkpoint and `preempted` in state.json; a completed run ends
with `checkpoints/final.pt` and `done`. With a `prune` section, a run that its sweep's successive halving
stops at a rung (sogclr/training/prune.py) ends there with its epoch-end checkpoint and `pruned`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sogclr.contract.cli import run_entry_point
from sogclr.contract.config import PretrainConfig, RunConfig
from sogclr.contract.dataindex import DatasetIndex
from sogclr.contract.layout import RunLayout
from sogclr.data.augment import CropBatch, finish_views
from sogclr.data.datasets import (
    IndexedImageFolder,
    ResumableDistributedSampler,
    build_loader,
    build_pretrain_dataset,
    load_dataset_index,
    set_loader_epoch,
)
from sogclr.data.transforms import PretrainAugment
from sogclr.distributed import DistEnv, StopSignals
from sogclr.evaluation.diagnostics import GlobalObjective
from sogclr.evaluation.knn import KnnMonitor
from sogclr.losses import GlobalContrastiveLoss, SimCLRLoss
from sogclr.model import autocast_dtype, build_pretrain_model, maybe_sync_batchnorm
from sogclr.optim import build_optimizer, scaled_lr
from sogclr.schedules import gamma_at, set_lr, warmup_cosine
from sogclr.training.checkpoint import CheckpointManager, rng_state, seed_everything, set_rng_state
from sogclr.training.datacheck import TrainingData
from sogclr.training.loop import Progress, Session, run_epochs, run_process, staging_watch
from sogclr.training.metrics import DeviceMean, MetricsLogger, Throughput, cut_metrics, estimator_stats
from sogclr.training.prune import Pruner


def train(cfg: RunConfig) -> str:
    """Pretrain (or resume pretraining) the run in `cfg.run_dir`; returns the final status."""
    files = RunLayout(cfg.run_dir).pretrain
    pcfg = cfg.pretrain
    return run_process(
        files.state, partial(_pretrain, cfg), pcfg.collective_timeout_s, pcfg.progress_timeout_minutes
    )


def _pretrain(cfg: RunConfig, env: DistEnv, signals: StopSignals) -> str:
    pcfg = cfg.pretrain
    # The same seed on every rank: identical initial weights (augmentations are seeded per sample).
    seed_everything(pcfg.seed)
    set_determinism(pcfg.deterministic, env.device)

    index_path, index = load_dataset_index(
        cfg, env, staging_watch(env, signals, RunLayout(cfg.run_dir).pretrain.state)
    )
    dataset = build_pretrain_dataset(pcfg, index)
    sampler = ResumableDistributedSampler(len(dataset), pcfg.batch_size, env.rank, env.world_size, pcfg.seed)
    loader = build_loader(dataset, sampler, sampler.local_batch, pcfg.workers, env.device.type == "cuda")
    total_steps = pcfg.epochs * sampler.steps_per_epoch

    model = build_pretrain_model(pcfg).to(env.device)
    model = maybe_sync_batchnorm(model, env.distributed, env.device)
    if env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(pcfg, num_samples=len(dataset)).to(env.device)
    peak_lr = scaled_lr(pcfg.lr, pcfg.batch_size, pcfg.lr_scaling)
    optimizer = build_optimizer(
        model, pcfg.optimizer, peak_lr, pcfg.weight_decay, pcfg.momentum, pcfg.trust_coefficient
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=autocast_dtype(pcfg, env.device) == torch.float16)

    files = RunLayout(cfg.run_dir).pretrain
    session = Session(
        env,
        signals,
        CheckpointManager(files.checkpoints, pcfg.checkpoint, env.is_main),
        files.state,
        stateful={"model": model, "optimizer": optimizer, "criterion": criterion, "scaler": scaler},
        progress=Progress(sampler.steps_per_epoch),
        total_steps=total_steps,
        config=cfg.model_dump(mode="json"),
        phase="pretrain",
        data=TrainingData(
            index_path,
            index.splits["train"],
            pcfg.accept_data_change,
            ("criterion", "log_u"),
            dataset.identity.get("content"),
        ),
    )
    progress = session.resume()
    if env.is_main:
        cut_metrics(files.metrics, progress.global_step)
    fresh = progress.global_step == 0  # no checkpoint: a new training, with a new identity at the rungs
    pruner = Pruner(cfg, env, fresh) if cfg.prune is not None else None
    if pruner is not None and pruner.decided_before(progress.epoch):
        return stop_pruned(session, pruner)

    step = PretrainStep(
        wrap_model(model, pcfg, env), criterion, optimizer, scaler, pcfg, total_steps, sampler.steps_per_epoch
    )
    tensorboard = files.tensorboard if pcfg.tensorboard else None
    with MetricsLogger(files.metrics, total_steps, env.is_main, tensorboard, "pretrain", cfg) as logger:
        monitor = PretrainMonitor(logger, criterion, pcfg, step)
        metrics = epoch_end_metrics(pcfg, index, dataset, sampler.local_batch, env)
        evaluation = EpochEndEvaluation(model, metrics, logger, progress)

        def end_of_epoch(epoch: int) -> bool:
            values = evaluation(epoch)
            return pruner is not None and pruner.at_epoch_end(epoch + 1, values, progress.global_step)

        def one_step(batch: tuple) -> None:
            views, _, index = batch
            loss = step(views, index, progress.global_step)
            monitor.after_step(loss, progress)

        def epoch_batches(epoch: int, start_step: int) -> torch.utils.data.DataLoader:
            set_loader_epoch(loader, epoch, start_step)
            return loader

        if not run_epochs(session, pcfg.epochs, epoch_batches, one_step, end_of_epoch):
            return "preempted"
    if pruner is not None and pruner.stopped is not None:
        return stop_pruned(session, pruner)
    session.finish()
    session.record(status="done")
    return "done"


def stop_pruned(session: Session, pruner: Pruner) -> str:
    """End a run that its sweep pruned at a rung: the checkpoint of that epoch end is saved (it is the
    one a later continuation resumes from); state.json says `pruned`, and where and why."""
    session.save()
    session.record(status="pruned", pruned=pruner.stopped)
    return "pruned"


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """`pretrain.deterministic`: deterministic algorithms only, or cuDNN's autotuned convolutions on GPU
    (the fastest each start, but not always the same one: another summation order after a resume).

    Of the operations PyTorch 2.14 lists as failing under deterministic algorithms, a ResNet would meet
    AdaptiveAvgPool2d's CUDA backward; at output size 1 the pool is computed as a mean, whose backward
    is deterministic (tests/sogclr/test_model.py checks the graph)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic


def build_criterion(cfg: PretrainConfig, num_samples: int) -> nn.Module:
    if cfg.loss == "sogclr":
        return GlobalContrastiveLoss(num_samples, cfg.temperature, cfg.gamma)
    return SimCLRLoss(cfg.temperature)


class TwoViews(nn.Module):
    """Both views through one network in a single call, so DDP sees one forward per backward.

    The views go through separately (not concatenated): BN normalises each view with its own statistics,
    as in the reference.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x1), self.model(x2)


def wrap_model(model: nn.Module, cfg: PretrainConfig, env: DistEnv) -> nn.Module:
    """Compile (optional) and wrap for DDP; the bare `model` stays what checkpoints hold."""
    if cfg.compile:
        model.compile()
    two_views = TwoViews(model)
    if not env.distributed:
        return two_views
    device_ids = [env.device] if env.device.type == "cuda" else None
    return DistributedDataParallel(two_views, device_ids=device_ids)


@dataclass
class PretrainStep:
    """One optimizer step at a given global step: schedules, forward of both views, loss, update.

    `model` maps (view1, view2) to their projections (`TwoViews`, maybe inside DDP); the loss gathers
    across ranks itself. Nothing here reads a value back to the host.
    """

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: PretrainConfig
    total_steps: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device
        self.dtype = autocast_dtype(self.cfg, self.device)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.peak_lr = scaled_lr(self.cfg.lr, self.cfg.batch_size, self.cfg.lr_scaling)
        self.warmup_steps = round(self.cfg.warmup_epochs * self.steps_per_epoch)

    def lr(self, global_step: int) -> float:
        return warmup_cosine(global_step, self.total_steps, self.warmup_steps, self.peak_lr)

    def gamma(self, global_step: int) -> float:
        cfg = self.cfg
        return gamma_at(
            global_step, self.total_steps, cfg.gamma, cfg.gamma_schedule, cfg.gamma_decay_fraction
        )

    def __call__(
        self, views: list[torch.Tensor | CropBatch], index: torch.Tensor, global_step: int
    ) -> torch.Tensor:
        set_lr(self.optimizer, self.lr(global_step))
        if isinstance(self.criterion, GlobalContrastiveLoss):
            self.criterion.gamma = self.gamma(global_step)
        x1, x2 = (self.model_input(v) for v in views)
        index = index.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            z1, z2 = self.model(x1, x2)
            loss = self.criterion(z1, z2, index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def model_input(self, view: torch.Tensor | CropBatch) -> torch.Tensor:
        """A batch of views on the device, in the model's memory format; crops (`augment_on: device`) are
        moved as uint8 and finished there."""
        if isinstance(view, CropBatch):
            view = finish_views(view.to(self.device, non_blocking=True))
        return view.to(self.device, non_blocking=True, memory_format=self.memory_format)


class PretrainMonitor:
    """Accumulates loss and objective on the device; every `log_every_steps` writes one record (rank 0)."""

    def __init__(self, logger: MetricsLogger, criterion: nn.Module, cfg: PretrainConfig, step: PretrainStep):
        self.logger = logger
        self.criterion = criterion
        self.cfg = cfg
        self.step = step
        self.loss, self.objective, self.throughput = DeviceMean(), DeviceMean(), Throughput()

    def after_step(self, loss: torch.Tensor, progress: Progress) -> None:
        if not self.logger.enabled:
            return
        self.loss.add(loss)
        self.objective.add(self.criterion.objective)
        self.throughput.add(self.cfg.batch_size)
        taken = progress.global_step + 1  # the step just taken, counted from 1
        if taken % self.cfg.log_every_steps:
            return
        log_u = getattr(self.criterion, "log_u", None)
        self.logger.log(
            taken,
            epoch=progress.epoch,
            loss=self.loss.pop(),
            objective=self.objective.pop(),
            lr=self.step.lr(progress.global_step),
            gamma=self.step.gamma(progress.global_step),
            images_per_s=self.throughput.pop(),
            **(estimator_stats(log_u) if log_u is not None else {}),
        )


@dataclass(frozen=True)
class ScheduledMetric:
    """A metric of the model (name -> value) computed after every `every_epochs` epochs."""

    every_epochs: int
    compute: Callable[[nn.Module], dict[str, float]]


def epoch_end_metrics(
    cfg: PretrainConfig, index: DatasetIndex, dataset: IndexedImageFolder, local_batch: int, env: DistEnv
) -> list[ScheduledMetric]:
    """The metrics the config asks for after epochs (by default the kNN monitor)."""
    metrics = []
    dtype = autocast_dtype(cfg, env.device)
    if cfg.objective_every_epochs is not None:
        augment = PretrainAugment(cfg.image_size, cfg.crop_min)
        objective = GlobalObjective(
            dataset, augment, cfg.objective_subset, cfg.temperature, local_batch, cfg.workers, dtype
        )
        metrics.append(ScheduledMetric(cfg.objective_every_epochs, objective))
    if cfg.knn_every_epochs is not None:
        metrics.append(ScheduledMetric(cfg.knn_every_epochs, KnnMonitor(cfg, index, env, local_batch, dtype)))
    return metrics


class EpochEndEvaluation:
    """After an epoch, the metrics that are due, in one metrics.jsonl record (rank 0; every rank computes,
    as metrics may gather across ranks). Training never notices: see `evaluating`."""

    def __init__(
        self, model: nn.Module, metrics: list[ScheduledMetric], logger: MetricsLogger, progress: Progress
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.logger = logger
        self.progress = progress

    def __call__(self, epoch: int) -> dict[str, float]:
        """The metrics due after `epoch` (zero-based), logged and returned (every rank has them)."""
        due = [metric for metric in self.metrics if (epoch + 1) % metric.every_epochs == 0]
        if not due:
            return {}
        with evaluating(self.model):
            values = {name: value for metric in due for name, value in metric.compute(self.model).items()}
        self.logger.log(self.progress.global_step, epoch=epoch, **values)
        return values


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, then the model's mode and every global RNG state as they were: a
    train-mode forward would update BN running statistics (state), and a draw from a global generator
    would change what training draws next. So weights end the same with metrics on or off."""
    was_training, rng = model.training, rng_state()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        set_rng_state(rng)


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(train, argv, "SogCLR pretraining")


if __name__ == "__main__":
    sys.exit(main())
