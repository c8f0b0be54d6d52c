"""Encoders out and in: `sogclr.export` writes a run's backbone so that torchvision's and timm's stock
ResNets load it strictly and compute the same features; linear evaluation starts from a checkpoint in the
SogCLR authors' released layout (`module.base_encoder.*`) through `lincls.pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from sogclr import lincls
from sogclr.contract.config import PretrainConfig, load_run_config
from sogclr.export import main as export_main
from sogclr.export import with_small_stem
from sogclr.model import build_backbone, build_pretrain_model, build_projector, load_backbone
from testkit.runs import tiny_pretrain, write_config

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
STOCK = {"width": 64}  # the stock ResNets' width (the tiny runs' is 8): exports and releases have it


def trained_looking(model: nn.Module) -> nn.Module:
    """`model` with every weight moved off its initialisation and BN statistics off 0 and 1."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.train()(torch.randn(8, 3, 32, 32))  # updates the running statistics
    return model.eval()


def finished_run(run_dir: Path, data_dir: Path, **pretrain: object) -> tuple[nn.Module, PretrainConfig]:
    """A run directory whose pretraining has ended: config.yaml and checkpoints/final.pt."""
    config = write_config(run_dir, tiny_pretrain(data_dir, **{**STOCK, **pretrain}))
    cfg = load_run_config(config).pretrain
    model = trained_looking(build_pretrain_model(cfg))
    (run_dir / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, run_dir / "checkpoints" / "final.pt")
    return model, cfg


def stock(library: str) -> nn.Module:
    if library == "timm":
        return timm.create_model("resnet18", pretrained=False, num_classes=0)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_exported_backbone_loads_strictly_and_gives_the_same_features(
    tmp_path: Path, data_dir: Path, library: str
) -> None:
    model, _ = finished_run(tmp_path / "run", data_dir)
    out = tmp_path / "backbone.pt"
    assert export_main([str(tmp_path / "run"), str(out), "--format", library]) == 0
    exported = stock(library).eval()
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        ours, theirs = model.backbone(IMAGES), exported(IMAGES)
    assert ours.shape == (4, 512)
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)  # timm pools with a mean: rounding


def test_a_small_stem_run_is_refused_unless_asked_and_then_loads_with_that_stem(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    model, _ = finished_run(tmp_path / "run", data_dir, small_stem=True)
    out = tmp_path / "backbone.pt"
    assert export_main([str(tmp_path / "run"), str(out)]) == 2
    error = capsys.readouterr().err
    assert "pretrain.small_stem" in error and "--small-stem" in error and "kernel_size=3" in error
    assert not out.exists()

    assert export_main([str(tmp_path / "run"), str(out), "--small-stem"]) == 0
    exported = with_small_stem(stock("torchvision")).eval()
    exported.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(exported(IMAGES), model.backbone(IMAGES))


def test_a_narrow_run_is_refused(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    finished_run(tmp_path / "run", data_dir, width=16)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out.pt")]) == 2
    assert "pretrain.width 16; a stock resnet18 has 64" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_a_run_without_final_checkpoint_is_a_clear_error(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_config(tmp_path, tiny_pretrain(data_dir, **STOCK))
    assert export_main([str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "no final pretraining checkpoint" in capsys.readouterr().err


def released_checkpoint(path: Path, cfg: PretrainConfig) -> nn.Module:
    """A file laid out as the SogCLR authors' releases (MoCo v3's): the ResNet as `module.base_encoder`,
    the projector as its `fc`, under `state_dict`, with the epoch and optimizer state beside it."""
    encoder, feature_dim = build_backbone(cfg.arch)
    encoder.fc = build_projector(feature_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
    encoder = trained_looking(encoder)
    state = {f"module.base_encoder.{key}": value for key, value in encoder.state_dict().items()}
    torch.save({"epoch": 800, "arch": cfg.arch, "state_dict": state, "optimizer": {"state": {}}}, path)
    encoder.fc = nn.Identity()
    return encoder


def test_linear_evaluation_starts_from_a_released_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"  # no pretraining at all
    lincls_fields = {"epochs": 1, "batch_size": 64, "mode": "features", "workers": 0}
    config = write_config(
        run_dir, tiny_pretrain(data_dir, **STOCK), lincls_fields | {"pretrained": "missing.pth"}
    )
    with pytest.raises(FileNotFoundError, match="lincls.pretrained: no file missing.pth"):
        lincls.train(load_run_config(config))

    released = tmp_path / "sogclr_r18.pth.tar"
    cfg = load_run_config(config, [f"lincls.pretrained={released}"])
    encoder = released_checkpoint(released, cfg.pretrain)
    backbone, _ = build_backbone(cfg.pretrain.arch)
    load_backbone(backbone, lincls.backbone_weights(cfg))
    with torch.no_grad():
        assert torch.equal(backbone.eval()(IMAGES), encoder(IMAGES))

    config = write_config(
        run_dir, tiny_pretrain(data_dir, **STOCK), lincls_fields | {"pretrained": str(released)}
    )
    assert lincls.train(load_run_config(config)) == "done"
    result = json.loads((run_dir / "lincls" / "result.json").read_text())
    assert 0 <= result["top1"] <= result["top5"] <= 100
