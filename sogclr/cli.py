"""The command line shared by the entry points: `--config FILE [--set key=value ...]`."""

from __future__ import annotations

import argparse

from sogclr.config import RunConfig, load_run_config


def parse_run_config(argv: list[str] | None, description: str) -> RunConfig:
    """Read the run config named on the command line, with `--set a.b=value` overrides applied."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", required=True, help="resolved run config (YAML), e.g. <run_dir>/config.yaml"
    )
    add_override_argument(parser)
    args = parser.parse_args(argv)
    return load_run_config(args.config, args.overrides)


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
