"""Node-local copies of a dataset's shards (`pretrain.stage_dir`), made at the start of each attempt.

Cluster guides ask jobs to read datasets from the node's own disk, copied there at the job's start,
not from the shared file system. Every training process of a node calls `stage_shards`; the first to
take the node's lock (a `flock` on the local disk, so also across jobs sharing the node) copies each
shard and checks its sha256 against shards.json while copying, the others wait on the lock. A shard is
renamed into the copy only once verified, and the copy's directory is renamed to its final name only
once every shard is there (`sogclr-shards-<digest of the shard set>`): a directory with that name is
a complete, verified copy, and is reused by later attempts on the same node (its shard sizes checked);
a partial copy is never read, and the next attempt continues it. A damaged copy (a size that differs)
is removed and made again.

While copying or waiting, the stop flag is polled between chunks (a stop signal ends the attempt as
`preempted`: `StoppedWhileStaging`), the watchdog is told of every chunk (a copy that stalls is what it
is for), and rank 0 writes the progress into state.json (`staging`), which `status` shows.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sogclr.contract.dataindex import DatasetError
from sogclr.contract.shards import SHARD_INDEX, ShardFile, ShardIndex, read_shard_index
from sogclr.contract.state import now, update_state

STAGED_PREFIX = "sogclr-shards-"
CHUNK_BYTES = 16 << 20
POLL_S = 1.0
REPORT_EVERY_S = 5.0


class StoppedWhileStaging(Exception):
    """A stop signal arrived while this process copied shards or waited for them."""


@dataclass(frozen=True)
class Watch:
    """What staging polls and tells: the trainer's stop flag, its watchdog, and its progress record."""

    stop_requested: Callable[[], bool] = lambda: False
    progressed: Callable[[], None] = lambda: None
    report: Callable[[dict[str, Any] | None], None] = lambda progress: None


def expanded_stage_dir(text: str) -> Path:
    """`pretrain.stage_dir` with this node's environment variables and `~` expanded."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    if "$" in expanded:
        raise DatasetError(
            f"pretrain.stage_dir {text}: a variable in it is not set on {socket.gethostname()}"
        )
    return Path(expanded).absolute()


def report_staging(state_path: Path, progress: dict[str, Any] | None) -> None:
    """state.json's `staging`: `phase` copying (bytes of total), waiting (for another process's copy,
    at bytes), or done (copied bytes, in seconds); `at` when (`status` shows it during its attempt only)."""
    update_state(state_path, staging=progress and {**progress, "at": now()})


def stage_shards(shards: ShardIndex, stage_dir: Path, watch: Watch = Watch()) -> ShardIndex:
    """The shard index of a complete, verified copy of `shards` in `stage_dir` (made now if needed)."""
    started, copied = time.monotonic(), 0
    target = stage_dir / f"{STAGED_PREFIX}{shards.digest[:16]}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    with NodeLock(stage_dir / f".{target.name}.lock", partial_dir(target), watch):
        if not is_complete(target, shards):
            shutil.rmtree(target, ignore_errors=True)
            copied = copy_verified(shards, target, watch)
    seconds = round(time.monotonic() - started, 1)
    watch.report({"phase": "done", "host": socket.gethostname(), "copied": copied, "seconds": seconds})
    return read_shard_index(target)


def partial_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def is_complete(target: Path, shards: ShardIndex) -> bool:
    """Whether `target` is a copy of `shards` whose files all have their sizes (else it is made again)."""
    try:
        staged = read_shard_index(target)
        staged.check_sizes()
    except (DatasetError, OSError):
        return False
    return staged.digest == shards.digest


class NodeLock:
    """The node's lock on one copy: `flock` polled, so that waiting still hears the stop flag, and
    tells the watchdog while the copy it waits for grows."""

    def __init__(self, path: Path, growing: Path, watch: Watch) -> None:
        self.path, self.growing, self.watch = path, growing, watch

    def __enter__(self) -> NodeLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        seen = -1
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                pass
            if self.watch.stop_requested():
                os.close(self.fd)
                raise StoppedWhileStaging("a stop signal arrived while waiting for another process's copy")
            size = directory_bytes(self.growing)
            if size != seen:
                self.watch.progressed()
                self.watch.report({"phase": "waiting", "host": socket.gethostname(), "bytes": size})
                seen = size
            time.sleep(POLL_S)

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)  # releases the lock


def directory_bytes(directory: Path) -> int:
    try:
        return sum(entry.stat().st_size for entry in os.scandir(directory))
    except OSError:
        return 0


def copy_verified(shards: ShardIndex, target: Path, watch: Watch) -> int:
    """Copy every shard into `target`'s partial directory (keeping the verified shards an earlier
    attempt left there), then rename it to `target`; the bytes copied."""
    partial = partial_dir(target)
    partial.mkdir(exist_ok=True)
    todo = [s for s in shards.shard_files if not _already_there(partial / s.name, s)]
    total = shards.total_bytes
    done = total - sum(shard.bytes for shard in todo)
    free = shutil.disk_usage(partial).free
    if sum(shard.bytes for shard in todo) > free:
        raise DatasetError(
            f"pretrain.stage_dir {target.parent}: the shards need {sum(s.bytes for s in todo) / 1e9:.1f} GB "
            f"more, {free / 1e9:.1f} GB are free on {socket.gethostname()}"
        )
    progress = Progress(total, done, watch)
    for shard in todo:
        copy_shard(shards.directory / shard.name, partial / shard.name, shard, progress, watch)
    shutil.copyfile(shards.directory / SHARD_INDEX, partial / SHARD_INDEX)
    partial.rename(target)
    return progress.done - done


def _already_there(path: Path, shard: ShardFile) -> bool:
    return path.is_file() and path.stat().st_size == shard.bytes  # renamed there only once verified


@dataclass
class Progress:
    """Bytes copied so far; reported at most every REPORT_EVERY_S."""

    total: int
    done: int
    watch: Watch
    last_report: float = 0.0

    def add(self, count: int) -> None:
        self.done += count
        self.watch.progressed()
        if time.monotonic() - self.last_report >= REPORT_EVERY_S:
            progress = {"phase": "copying", "bytes": self.done, "total": self.total}
            self.watch.report({**progress, "host": socket.gethostname()})
            self.last_report = time.monotonic()


def copy_shard(source: Path, destination: Path, shard: ShardFile, progress: Progress, watch: Watch) -> None:
    """`source` to `destination`, its sha256 checked on the bytes written; renamed into place last."""
    temporary = destination.with_name(f"{destination.name}.tmp")
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(temporary, "wb") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            if watch.stop_requested():
                raise StoppedWhileStaging(f"a stop signal arrived while copying {source}")
            writer.write(chunk)
            digest.update(chunk)
            progress.add(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())  # renamed only once on disk: a node that crashes leaves no bad shard
    if digest.hexdigest() != shard.sha256:
        temporary.unlink()
        raise DatasetError(
            f"{source}: its bytes have sha256 {digest.hexdigest()[:16]}..., shards.json says "
            f"{shard.sha256[:16]}...: the shard is damaged (not staged)"
        )
    temporary.rename(destination)
