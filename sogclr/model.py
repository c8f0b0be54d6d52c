"""Networks: the ResNet backbone, the SogCLR projector, and the frozen-backbone linear classifier.

Pretraining trains `ContrastiveModel` (backbone + projector); linear evaluation loads the backbone part of
its state_dict into a `LinearClassifier` and trains only the new `fc` layer on top of frozen features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from sogclr.contract.config import PretrainConfig

_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
# Prefixes that wrappers add in front of every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE_PREFIX = "backbone."
_RELEASED_PREFIX = "module.base_encoder."


def build_backbone(arch: str, small_stem: bool = False, width: int = 64) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier; returns (backbone, feature_dim).

    `small_stem` replaces the 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv (CIFAR-sized images),
    so a 32 px image keeps its resolution until the first strided stage. `width` is the channels of the
    first stage (torchvision's 64); the later stages double it as usual.
    """
    if arch not in _RESNETS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_RESNETS)}")
    # Zero-init of the last BN in each residual branch makes every block start as the identity.
    backbone = _RESNETS[arch](weights=None, zero_init_residual=True)
    if width != 64:
        _set_width(backbone, width)
    if small_stem:
        backbone.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        # Same init as torchvision gives every other conv of the network.
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone, feature_dim


def _set_width(net: torchvision.models.ResNet, width: int) -> None:
    """Rebuild `net`'s stem and stages with `width` channels in the first stage, initialised as
    torchvision initialises them (its constructor has the stage widths 64..512 written in)."""
    block = type(net.layer1[0])
    depths = [len(stage) for stage in (net.layer1, net.layer2, net.layer3, net.layer4)]
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.inplanes = width  # torchvision's _make_layer chains the stages through it
    for stage, depth in enumerate(depths):
        layer = net._make_layer(block, width * 2**stage, depth, stride=1 if stage == 0 else 2)
        setattr(net, f"layer{stage + 1}", layer)
    net.fc = nn.Linear(width * 8 * block.expansion, net.fc.out_features)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in net.modules():
        last_bn = getattr(module, "bn3", None) if block.expansion > 1 else getattr(module, "bn2", None)
        if isinstance(module, block) and last_bn is not None:
            nn.init.zeros_(last_bn.weight)


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The reference two-layer MLP head; the final BN has no affine parameters (as in SimCLR/MoCo v3)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim, affine=False),
    )


class ContrastiveModel(nn.Module):
    """Backbone followed by the projector; the loss normalises the projections itself."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def build_pretrain_model(cfg: PretrainConfig) -> ContrastiveModel:
    backbone, feature_dim = build_backbone(cfg.arch, cfg.small_stem, cfg.width)
    projector = build_projector(feature_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
    return ContrastiveModel(backbone, projector)


class LinearClassifier(nn.Module):
    """A trainable linear layer on a frozen backbone whose BN statistics stay frozen too.

    `train()` never puts the backbone in training mode: linear evaluation measures the pretrained features,
    so BN must keep normalising with the statistics learned during pretraining.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.train()

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def build_linear_classifier(cfg: PretrainConfig, num_classes: int) -> LinearClassifier:
    """The classifier for a backbone pretrained with `cfg` (same arch and stem)."""
    backbone, feature_dim = build_backbone(cfg.arch, cfg.small_stem, cfg.width)
    return LinearClassifier(backbone, feature_dim, num_classes)


def _strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def backbone_state_dict(pretrain_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of a `ContrastiveModel` state_dict, keyed as in the bare backbone."""
    stripped = {_strip_wrapper_prefixes(key): value for key, value in pretrain_state_dict.items()}
    return {
        key.removeprefix(_BACKBONE_PREFIX): value
        for key, value in stripped.items()
        if key.startswith(_BACKBONE_PREFIX)
    }


def released_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SogCLR authors' released checkpoints (MoCo v3 layout: `module.base_encoder` is the ResNet, its
    `fc` the projector) keyed as a `ContrastiveModel`'s backbone, which `load_backbone` takes."""
    return {
        _BACKBONE_PREFIX + key.removeprefix(_RELEASED_PREFIX): value
        for key, value in state_dict.items()
        if key.startswith(_RELEASED_PREFIX) and not key.startswith(f"{_RELEASED_PREFIX}fc.")
    }


def _some(keys: list[str], shown: int = 10) -> str:
    more = f" ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_backbone(model: nn.Module, pretrain_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a pretraining checkpoint's backbone weights into a `LinearClassifier` or a bare backbone.

    Keys may carry DDP (`module.`) or torch.compile (`_orig_mod.`) prefixes; projector keys are ignored.
    Every backbone weight must be present: a missing key raises ValueError naming it, rather than
    silently evaluating a partly random network. The classifier's `fc` is never loaded. Call it before
    wrapping `model` in DDP.
    """
    backbone = model.backbone if isinstance(model, LinearClassifier) else model
    state = backbone_state_dict(pretrain_state_dict)
    expected = backbone.state_dict().keys()
    missing = sorted(expected - state.keys())
    if missing:
        hint = "" if state else f" (no '{_BACKBONE_PREFIX}' keys at all; got {list(pretrain_state_dict)[:3]})"
        raise ValueError(f"pretraining state_dict lacks {len(missing)} backbone keys{hint}: {_some(missing)}")
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        raise ValueError(f"pretraining state_dict has backbone keys this arch lacks: {_some(unexpected)}")
    backbone.load_state_dict(state, strict=True)


def maybe_sync_batchnorm(model: nn.Module, distributed: bool, device: torch.device | str) -> nn.Module:
    """Convert BN to SyncBatchNorm when training with several CUDA ranks; otherwise return `model` as is.

    On CPU (gloo) plain BN is kept, so each rank normalises with its own batch statistics: torch 2.14's
    SyncBatchNorm raises ValueError in training mode for CPU inputs once a process group is initialised.
    """
    if distributed and torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements, optionally only those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast on GPU; None (full fp32) on CPU or when fp32 is asked for."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float16
