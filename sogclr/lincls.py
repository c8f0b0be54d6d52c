"""Linear evaluation: `python -m sogclr.lincls --config FILE [--set key=value ...]`, also under torchrun.

The backbone of the final pretraining checkpoint (`<run_dir>/checkpoints/final.pt`), or of the file
`lincls.pretrained` names (such as the SogCLR authors' released checkpoints), is frozen in eval mode, BN
statistics included; only a new linear layer (`fc`, N(0, 0.01)) is trained, with momentum SGD and a
per-step cosine learning rate. Two ways to feed it:

- standard: augmented training images (RandomResizedCrop + flip) through the frozen backbone every step;
- features: the un-augmented training images through the backbone once, then the layer trains on the
  stored features (much faster; a common cheaper protocol, not the reference's). They stay sharded: each
  rank holds and caches the rows it encoded and, at each step, takes the rows of the global batch that its
  shard holds; the gradients summed over ranks are the global batch's, as if every rank held them all.

Validation features do not change while the backbone is frozen, so they are computed once (sharded too)
and scored after every epoch. Outputs go under `<run_dir>/lincls/`: checkpoints (one directory per mode),
state.json, metrics.jsonl and result.json. Resuming, stop signals and checkpoint policy are those of
pretraining.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sogclr.contract.cli import run_entry_point
from sogclr.contract.config import RunConfig
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import read_state, update_state, write_json_atomic
from sogclr.data.datasets import (
    IndexedImageFolder,
    ResumableDistributedSampler,
    build_lincls_datasets,
    build_loader,
    build_plain_dataset,
    load_dataset_index,
    set_loader_epoch,
)
from sogclr.distributed import DistEnv, StopSignals
from sogclr.evaluation.features import (
    FeatureCache,
    Features,
    FrozenEncoder,
    extract_shard,
    state_digest,
)
from sogclr.model import autocast_dtype, build_linear_classifier, load_backbone, released_backbone_state_dict
from sogclr.optim import build_optimizer, scaled_lr
from sogclr.schedules import set_lr, warmup_cosine
from sogclr.training.checkpoint import FINAL, CheckpointManager, load_file, seed_everything
from sogclr.training.datacheck import TrainingData
from sogclr.training.loop import (
    Progress,
    Session,
    run_epochs,
    run_process,
    staging_watch,
    stop_agreed,
    stop_signal,
)
from sogclr.training.metrics import DeviceMean, MetricsLogger, cut_metrics

Batches = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def train(cfg: RunConfig) -> str:
    """Linear evaluation (or its resumption) of the run in `cfg.run_dir`; returns the final status."""
    if cfg.lincls is None:
        raise ValueError(f"the config of {cfg.run_dir} has no lincls section")
    lcfg = cfg.lincls
    return run_process(
        RunLayout(cfg.run_dir).lincls.state,
        partial(_evaluate, cfg),
        lcfg.collective_timeout_s,
        lcfg.progress_timeout_minutes,
    )


def _evaluate(cfg: RunConfig, env: DistEnv, signals: StopSignals) -> str:
    pcfg, lcfg = cfg.pretrain, cfg.lincls
    seed_everything(lcfg.seed)  # the classifier's initialisation

    index_path, index = load_dataset_index(
        cfg, env, staging_watch(env, signals, RunLayout(cfg.run_dir).lincls.state)
    )
    train_set, val_set = build_lincls_datasets(pcfg, index, seed=lcfg.seed)
    data = TrainingData(
        index_path, index.splits["train"], pcfg.accept_data_change, content=train_set.identity.get("content")
    )
    classifier = build_linear_classifier(pcfg, num_classes=len(train_set.classes))
    load_backbone(classifier, backbone_weights(cfg))
    classifier.to(env.device)
    if env.device.type == "cuda":
        classifier.to(memory_format=torch.channels_last)
    encode = FrozenEncoder(classifier.backbone, autocast_dtype(pcfg, env.device))
    backbone = state_digest(classifier.backbone.state_dict())

    local_batch = lcfg.batch_size // env.world_size
    files = RunLayout(cfg.run_dir).lincls
    cache = FeatureCache(files.features, env)

    def features(split: str, dataset: IndexedImageFolder) -> Features | None:
        """This rank's shard of the split's plain features: from the cache, or extracted (acting on a stop
        at every batch)."""
        key = {
            "split": split,
            "backbone": backbone,
            "samples": dataset.identity["sha256"],
            # the same names under another root may be other pixels (a resized copy); from shards,
            # the bytes themselves
            "root": dataset.identity.get("content") or dataset.root,
            "transform": repr(dataset.transform),
            "dtype": str(encode.dtype),
        }
        stop = partial(stop_agreed, env, signals)
        return cache.get(key, lambda: extract_shard(encode, dataset, env, local_batch, lcfg.workers, stop))

    if (val_features := features("val", val_set)) is None:
        return stopped(files.state, env, signals)
    sampler = ResumableDistributedSampler(
        len(train_set), lcfg.batch_size, env.rank, env.world_size, lcfg.seed
    )
    modes = ("standard", "features") if lcfg.mode == "both" else (lcfg.mode,)
    results = {}
    for mode in modes:
        if mode == "standard":
            loader = build_loader(train_set, sampler, local_batch, lcfg.workers, env.device.type == "cuda")
            batches = augmented_batches(encode, loader)
        else:
            # The training images with the validation transform: what the features protocol trains on.
            if (train_features := features("train", build_plain_dataset(pcfg, index, "train"))) is None:
                return stopped(files.state, env, signals)
            batches = stored_batches(*train_features, sampler, env)
        # deepcopy: every mode starts from the same initial layer
        fc = copy.deepcopy(classifier.fc)
        result = fit_linear(
            cfg, env, signals, mode, fc, batches, sampler.steps_per_epoch, val_features, backbone, data
        )
        if result is None:
            return "preempted"
        results[mode] = result

    if env.is_main:
        # Top level: the first mode's numbers (standard when both ran); each mode under its own key.
        write_json_atomic(
            files.result, {"mode": lcfg.mode, "epochs": lcfg.epochs, **results[modes[0]], **results}
        )
        update_state(files.state, status="done")
    return "done"


def stopped(state_path: Path, env: DistEnv, signals: StopSignals) -> str:
    """Record a stop between steps (during feature extraction); the next attempt resumes from the cache."""
    if env.is_main:
        update_state(state_path, status="preempted", signal=stop_signal(signals))
    return "preempted"


def backbone_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """What linear evaluation freezes: `lincls.pretrained`'s checkpoint if given, else the run's own."""
    if cfg.lincls.pretrained is None:
        return load_pretrained_weights(cfg.run_dir)
    if not cfg.lincls.pretrained.is_file():
        raise FileNotFoundError(f"lincls.pretrained: no file {cfg.lincls.pretrained}")
    return model_weights(cfg.lincls.pretrained)


def load_pretrained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state_dict of the final pretraining checkpoint; a clear error if there is none."""
    pretrain = RunLayout(run_dir).pretrain
    path = pretrain.checkpoints / FINAL
    if not path.exists():
        status = read_state(pretrain.state).get("status", "not started")
        raise FileNotFoundError(
            f"no final pretraining checkpoint {path} (pretraining status: {status}); "
            "linear evaluation needs a completed pretraining run"
        )
    return model_weights(path)


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The pretraining model's state_dict in a checkpoint file: ours (`model`), or one of the SogCLR
    authors' released checkpoints (`state_dict`, `module.base_encoder.*` keys)."""
    payload = load_file(path)
    if "model" in payload:
        return payload["model"]
    if "state_dict" in payload:
        return released_backbone_state_dict(payload["state_dict"])
    raise ValueError(f"{path} holds no model weights (keys: {sorted(payload)})")


def augmented_batches(encode: FrozenEncoder, loader: torch.utils.data.DataLoader) -> Batches:
    """Standard protocol: each step encodes this rank's augmented images."""

    def batches(epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        set_loader_epoch(loader, epoch, start_step)
        for images, targets, _ in loader:
            yield encode(images), targets.to(encode.device, non_blocking=True)

    return batches


def stored_batches(
    features: torch.Tensor, targets: torch.Tensor, sampler: ResumableDistributedSampler, env: DistEnv
) -> Batches:
    """Features protocol: the standard protocol's global batches, each rank taking the rows of its shard
    (dataset rows rank, rank + world, ...): a share that varies from step to step."""

    def batches(epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler.set_epoch(epoch, start_step)
        for step in sampler.global_batches():  # picked on the host: no device sync per step
            rows = torch.from_numpy(step[step % env.world_size == env.rank] // env.world_size)
            rows = rows.to(features.device, non_blocking=True)
            yield features[rows], targets[rows]

    return batches


def fit_linear(
    cfg: RunConfig,
    env: DistEnv,
    signals: StopSignals,
    mode: str,
    fc: nn.Linear,
    batches: Batches,
    steps_per_epoch: int,
    val_features: tuple[torch.Tensor, torch.Tensor],
    backbone: str,
    data: TrainingData,
) -> dict[str, float] | None:
    """Train `fc` for `lincls.epochs` (resuming if checkpointed) on the frozen backbone whose weights'
    digest is `backbone`; final accuracy, or None if stopped."""
    lcfg = cfg.lincls
    files = RunLayout(cfg.run_dir).lincls
    peak_lr = scaled_lr(lcfg.lr, lcfg.batch_size, lcfg.lr_scaling)
    optimizer = build_optimizer(fc, "sgd", peak_lr, lcfg.weight_decay, lcfg.momentum)
    total_steps = lcfg.epochs * steps_per_epoch
    session = Session(
        env,
        signals,
        CheckpointManager(files.checkpoints / mode, lcfg.checkpoint, env.is_main),
        files.state,
        stateful={"fc": fc, "optimizer": optimizer},
        progress=Progress(steps_per_epoch),
        total_steps=total_steps,
        config=cfg.model_dump(mode="json"),
        phase="lincls",
        identity={"backbone": backbone},  # another backbone is another trajectory, whatever the config
        data=data,
    )
    progress = session.resume()
    session.record(mode=mode)
    if env.is_main:
        cut_metrics(files.metrics, progress.global_step, mode=mode)
    model = DistributedDataParallel(fc) if env.distributed else fc
    local_batch = lcfg.batch_size // env.world_size
    loss_mean = DeviceMean()

    description = f"lincls {mode}"
    with MetricsLogger(files.metrics, total_steps, env.is_main, description=description, run=cfg) as logger:

        def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
            features, targets = batch
            lr = warmup_cosine(progress.global_step, total_steps, 0, peak_lr)
            set_lr(optimizer, lr)
            # A sum over the rank's share over the mean share: as DDP averages over ranks, the gradient is
            # the global batch's mean however the batch is shared (unevenly in features mode).
            loss = F.cross_entropy(model(features), targets, reduction="sum") / local_batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_mean.add(loss)
            taken = progress.global_step + 1
            if logger.enabled and taken % lcfg.log_every_steps == 0:
                logger.log(taken, mode=mode, epoch=progress.epoch, loss=loss_mean.pop(), lr=lr)

        def end_of_epoch(epoch: int) -> None:
            logger.log(progress.global_step, mode=mode, epoch=epoch, **accuracy(fc, *val_features, env))

        if not run_epochs(session, lcfg.epochs, batches, step, end_of_epoch):
            return None
    session.finish()
    return accuracy(fc, *val_features, env)


@torch.no_grad()
def accuracy(
    fc: nn.Module, features: torch.Tensor, targets: torch.Tensor, env: DistEnv, chunk: int = 8192
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of `fc` on stored features, summed over every rank's shard."""
    k = min(5, fc.out_features)
    counts = torch.tensor([0.0, 0.0, len(features)], device=features.device)  # top-1, top-5, rows
    for start in range(0, len(features), chunk):
        top = fc(features[start : start + chunk]).topk(k, dim=1).indices
        match = top == targets[start : start + chunk, None]
        counts[:2] += torch.stack([match[:, 0].sum(), match.any(dim=1).sum()])
    if env.distributed:
        dist.all_reduce(counts)
    top1, top5 = (100.0 * counts[:2] / counts[2]).tolist()
    return {"top1": top1, "top5": top5}


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(train, argv, "SogCLR linear evaluation")


if __name__ == "__main__":
    sys.exit(main())
