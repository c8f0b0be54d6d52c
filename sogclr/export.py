"""The pretrained backbone of a run for other code: `python -m sogclr.export RUN_DIR OUT.pt --format F`.

OUT.pt is a plain state_dict (tensors only) of the final pretraining checkpoint's backbone, keyed as the
stock ResNet of the chosen library without its classifier (`fc.*`; the projector is left out):

    model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()      # --format torchvision
    model = timm.create_model("resnet50", num_classes=0)                       # --format timm
    model.load_state_dict(torch.load("OUT.pt"), strict=True)

Both libraries name a ResNet's modules alike (conv1, bn1, layer1..4, fc), so the two formats hold the same
keys today; the format names the model the file is checked against before it is written. A run with
`small_stem` has a 3x3 stride-1 conv1 and no max-pool, which neither stock model has: it is exported
only with `--small-stem`, and the model must then be built with that stem (see SMALL_STEM_HINT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from sogclr.contract.config import PretrainConfig, load_run_config
from sogclr.lincls import load_pretrained_weights
from sogclr.model import build_backbone, load_backbone
from sogclr.training.checkpoint import save_atomic

FORMATS = ("torchvision", "timm")
SMALL_STEM_HINT = (
    "conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False) and maxpool = nn.Identity()"
)


def stock_backbone(arch: str, library: str) -> nn.Module:
    """The library's own `arch` without a classifier (weights random): what the export must load into."""
    if library == "timm":
        try:
            import timm  # optional: only this format needs it
        except ImportError as error:
            raise ValueError("--format timm needs timm installed (pip install timm)") from error
        return timm.create_model(arch, pretrained=False, num_classes=0)
    model = getattr(torchvision.models, arch)()
    model.fc = nn.Identity()
    return model


def with_small_stem(model: nn.Module) -> nn.Module:
    """`model` with the CIFAR-sized stem that `small_stem` runs were trained with (SMALL_STEM_HINT)."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def exported_state_dict(cfg: PretrainConfig, run_dir: Path, library: str) -> dict[str, torch.Tensor]:
    """The run's pretrained backbone, keyed for `library`'s `cfg.arch`, checked by a strict load into it."""
    backbone, _ = build_backbone(cfg.arch, cfg.small_stem, cfg.width)
    load_backbone(backbone, load_pretrained_weights(run_dir))
    state = {key: value.clone() for key, value in backbone.state_dict().items()}
    target = stock_backbone(cfg.arch, library)
    if cfg.small_stem:
        target = with_small_stem(target)
    target.load_state_dict(state, strict=True)
    return state


def export(run_dir: Path, out: Path, library: str, small_stem_ok: bool = False) -> None:
    """Write `run_dir`'s pretrained backbone to `out` for `library` (see the module docstring)."""
    if library not in FORMATS:
        raise ValueError(f"--format {library!r}: expected one of {', '.join(FORMATS)}")
    cfg = load_run_config(Path(run_dir) / "config.yaml").pretrain
    if cfg.width != 64:
        raise ValueError(
            f"{run_dir} was pretrained with pretrain.width {cfg.width}; a stock {cfg.arch} has 64"
        )
    if cfg.small_stem and not small_stem_ok:
        raise ValueError(
            f"{run_dir} was pretrained with pretrain.small_stem (3x3 stride-1 conv1, no max-pool), which "
            f"a stock {library} {cfg.arch} does not have: pass --small-stem to export it anyway, and build "
            f"the model with {SMALL_STEM_HINT} before loading"
        )
    save_atomic(exported_state_dict(cfg, Path(run_dir), library), Path(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a run directory whose pretraining has finished")
    parser.add_argument("out", type=Path, help="the state_dict file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchvision", help="the model it loads into")
    parser.add_argument(
        "--small-stem", action="store_true", help="export a small_stem run (the model needs that stem)"
    )
    args = parser.parse_args(argv)
    try:
        export(args.run_dir, args.out, args.format, args.small_stem)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the {args.format} backbone of {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
