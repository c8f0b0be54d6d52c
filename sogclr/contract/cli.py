"""The command line shared by the entry points: `--config FILE [--set key=value ...]`."""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable

from sogclr.contract.config import RunConfig, load_run_config


def parse_run_config(argv: list[str] | None, description: str) -> RunConfig:
    """Read the run config named on the command line, with `--set a.b=value` overrides applied."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", required=True, help="resolved run config (YAML), e.g. <run_dir>/config.yaml"
    )
    add_override_argument(parser)
    args = parser.parse_args(argv)
    return load_run_config(args.config, args.overrides)


def run_entry_point(train: Callable[[RunConfig], str], argv: list[str] | None, description: str) -> int:
    """`train` the run config named on the command line; 0 unless it raises.

    A failure's frames are let go before the exception ends the process: kept by the traceback, they
    would keep a DataLoader, whose persistent workers ignore SIGTERM (sogclr/distributed.py), alive until
    interpreter exit, where multiprocessing terminates and joins them and waits for ever (measured: a
    worker's exception left the process waiting, state.json already `failed`, until killed 10 min later).
    """
    try:
        train(parse_run_config(argv, description))
    except Exception as error:
        traceback.clear_frames(error.__traceback__)
        raise
    return 0


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`--set a.b=value` (repeatable), collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set pretrain.gamma=0.5 (repeatable)",
    )
