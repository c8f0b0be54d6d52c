"""Process-group setup, stop signals, and the per-step agreement that makes every rank stop together.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) a process group is created: NCCL on GPU, gloo on CPU.
Plain `python` runs a single process without a process group. Control decisions (stop, save) travel over a
separate CPU gloo group, so agreeing on them never waits for the GPU stream.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    control_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 300.0) -> DistEnv:
    """Join torchrun's process group if launched by it; pick this rank's device.

    `timeout_s` bounds every collective: when a peer is gone, the survivors fail after it instead of
    holding the allocation (NCCL's watchdog and gloo both honour it).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return DistEnv(rank, local_rank, world_size, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None
    )
    control_group = (
        dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        if backend != "gloo"
        else dist.group.WORLD
    )
    return DistEnv(rank, local_rank, world_size, device, control_group)


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank, over the CPU control group (no GPU sync)."""
    if env.distributed:
        dist.barrier(group=env.control_group)


def agree(env: DistEnv, *flags: bool) -> tuple[bool, ...]:
    """Each flag becomes True on every rank if it is True on any rank: one small MAX all-reduce."""
    if not env.distributed:
        return tuple(flags)
    votes = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=env.control_group)
    return tuple(bool(vote) for vote in votes.tolist())


def broadcast_from_main(env: DistEnv, value: object) -> object:
    """Rank 0's `value` on every rank (over the control group); unchanged without a process group."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=env.control_group)
    return box[0]


# What gloo raises (a plain RuntimeError, torch 2.14) when a peer is lost, measured with two gloo processes
# (tests/sogclr/test_distributed.py): its TCP transport's "[gloo/transport/tcp/pair.cc:561] Connection closed
# by peer" (the peer died), "pair.cc:545 Read error ...: Connection reset by peer" (the peer aborted), and
# "unbound_buffer.cc:78 Timed out waiting 5000ms for recv operation" (the peer is silent). Errors of the
# call itself, such as "ProcessGroupGloo::allgather: invalid tensor size", also name gloo but are
# deterministic: they come from ProcessGroupGloo, not from the transport.
GLOO_TRANSPORT = "gloo/transport/"


def is_peer_failure(error: BaseException) -> bool:
    """True for errors of the collectives' transport (a peer died, a connection broke, a timeout): what a
    rank sees when another rank or node is lost, as opposed to a bug in training code. NCCL and the
    rendezvous store raise torch's own `DistError`s for these."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and GLOO_TRANSPORT in str(error)
    )


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order), without gradient."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """For helper processes (DataLoader workers, as `worker_init_fn`): ignore SIGTERM and SIGUSR2.

    SLURM signals every process of a job step. PyTorch's loader workers die of a SIGTERM that their
    parent did not send (by design), and the trainer would then fail instead of stopping at the agreed
    step; ignoring it keeps them feeding the trainer until it stops and shuts them down itself.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """Records SIGUSR2 (SLURM's warning) and SIGTERM (preemption) as a flag; the loop acts on it later.

    The handler only records the signal: saving from inside a handler could interrupt a half-written
    checkpoint or a collective. Use as a context manager; the previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # the first one says why; repeats (the job task relays) do not
            self.received = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
