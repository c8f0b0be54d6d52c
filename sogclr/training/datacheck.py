"""The data a checkpoint was trained on, checked when a run resumes.

Every checkpoint records its training split's identity (count and sha256 of the index's relative paths,
sogclr/contract/dataindex.py) and the index file it came from. A resume on other data (images added, removed
or replaced, even with the count unchanged) would silently give each dataset index, and so each of SogCLR's
per-image estimators `u[i]`, to another image: it fails at once, naming the counts and the first path that
differs. Moving the tree (another `data_dir`, the same files) changes nothing: paths are relative.

When the user says the change is intended (`pretrain.accept_data_change`), per-sample state is carried
over by path: an image that stayed keeps its `u`, a new image starts unseen, as at the start of training.
The position in training is kept (epoch, step in it), the rest of the interrupted epoch drawn from the new
data's shuffle; an epoch now shorter than the step reached continues with the next epoch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sogclr.contract.dataindex import DatasetError, SplitIndex, read_index

IDENTITY = ("count", "sha256")


class DataChanged(ValueError):
    """A resume on other training data than the checkpoint's, not accepted."""


@dataclass(frozen=True)
class TrainingData:
    """The training split a phase trains on. `per_sample` names the state indexed by dataset index
    (stateful key, state_dict entry), carried over by path when a change of data is accepted."""

    index_path: Path
    split: SplitIndex
    accept_change: bool = False
    per_sample: tuple[str, str] | None = None
    content: str | None = None  # the sha256 of the images' bytes, where known (read from shards)

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores of it."""
        content = {"content": self.content} if self.content is not None else {}
        return {**self.split.identity, "index": str(self.index_path), **content}

    def same_as(self, recorded: dict[str, Any]) -> bool:
        """The same images in the same order: paths always; bytes where both sides know them (a tree
        and its shards are the same data)."""
        contents = {recorded.get("content"), self.content} - {None}
        return {key: recorded[key] for key in IDENTITY} == self.split.identity and len(contents) < 2

    def reconcile(
        self, payload: dict[str, Any], stateful: dict[str, Any], steps_per_epoch: int
    ) -> dict[str, Any]:
        """`payload` if it was trained on this data (or predates data records), else DataChanged, or
        with an accepted change the payload carried over to this data (`stateful`: the fresh objects)."""
        recorded = payload.get("data")
        if recorded is None or self.same_as(recorded):
            return payload
        old = recorded_split(recorded)
        change = describe_change(recorded, old, self.split, self.content)
        if not self.accept_change:
            raise DataChanged(
                f"the training data differ from the checkpoint's: {change}. If the change is intended, "
                "set pretrain.accept_data_change=true (SogCLR's u is then carried over by path for the "
                "images that stayed)"
            )
        if old is None and self.per_sample is not None:
            raise DataChanged(
                f"the training data differ from the checkpoint's ({change}): nothing to carry u over by"
            )
        return carried_over(payload, old, self.split, stateful, self.per_sample, steps_per_epoch)


def recorded_split(recorded: dict[str, Any]) -> SplitIndex | None:
    """The training split the checkpoint names, if its index file is still there and still it."""
    try:
        split = read_index(recorded["index"]).splits["train"]
    except DatasetError:
        return None
    return split if split.identity == {key: recorded[key] for key in IDENTITY} else None


def describe_change(
    recorded: dict[str, Any], old: SplitIndex | None, new: SplitIndex, content: str | None = None
) -> str:
    """`N images in the checkpoint's, M now; first differing path: ...` (what can be said without the old
    index, when it is gone), or that the same paths hold other bytes."""
    counts = f"{recorded['count']} images in the checkpoint's, {new.count} now"
    if recorded["sha256"] == new.sha256:
        return (
            f"the same {new.count} paths, but other image bytes (content sha256 "
            f"{recorded['content'][:16]}... in the checkpoint's, {content[:16]}... now)"
        )
    if old is None:
        return f"{counts}; its index {recorded['index']} is gone, so no path can be named"
    pairs = itertools.zip_longest(old.relative_paths(), new.relative_paths())
    position, (before, after) = next((i, pair) for i, pair in enumerate(pairs) if pair[0] != pair[1])
    return f"{counts}; first differing path (index {position}): {before} in the checkpoint's, {after} now"


def kept_rows(old: SplitIndex, new: SplitIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows in `old`, rows in `new`) of the images both have, matched by relative path."""
    old_row = {path: row for row, path in enumerate(old.relative_paths())}
    pairs = [(old_row[path], row) for row, path in enumerate(new.relative_paths()) if path in old_row]
    rows = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def carried_over(
    payload: dict[str, Any],
    old: SplitIndex | None,
    new: SplitIndex,
    stateful: dict[str, Any],
    per_sample: tuple[str, str] | None,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """`payload` moved onto the new data: per-sample state by path (new images keep the fresh object's
    initial value), the position clamped to the new epoch length."""
    payload = dict(payload)
    if per_sample is not None:
        key, name = per_sample
        carried = stateful[key].state_dict()[name].detach().cpu().clone()
        old_rows, new_rows = kept_rows(old, new)
        carried[new_rows] = payload[key][name][old_rows]
        payload[key] = {**payload[key], name: carried}
    epoch, step = payload["epoch"], payload["step_in_epoch"]
    if step >= steps_per_epoch:
        epoch, step = epoch + 1, 0
    payload.update(epoch=epoch, step_in_epoch=step, steps_per_epoch=steps_per_epoch)
    return payload
