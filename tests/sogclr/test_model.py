"""Backbone, projector, linear classifier and checkpoint loading (tiny 32 px inputs, CPU)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from sogclr.contract.config import PretrainConfig
from sogclr.model import (
    LinearClassifier,
    build_backbone,
    build_linear_classifier,
    build_pretrain_model,
    build_projector,
    load_backbone,
    maybe_sync_batchnorm,
    num_params,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("arch", "feature_dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_pretrain_model_shapes(arch, feature_dim):
    cfg = PretrainConfig(arch=arch, projector_hidden_dim=16, projector_out_dim=8)
    model = build_pretrain_model(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.backbone(x).shape == (2, feature_dim)
        assert model(x).shape == (2, 8)
    assert model.projector[0].in_features == feature_dim


def test_projector_layers():
    projector = build_projector(12, 16, 8)
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert projector[0].bias is None and projector[3].bias is None
    assert projector[1].affine and not projector[4].affine
    assert (projector[0].in_features, projector[0].out_features, projector[3].out_features) == (12, 16, 8)


def _layer1_spatial_size(backbone: nn.Module, image_size: int) -> int:
    sizes = []
    backbone.layer1.register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[-1]))
    with torch.no_grad():
        backbone.eval()(torch.randn(1, 3, image_size, image_size))
    return sizes[0]


def test_small_stem_keeps_resolution_until_layer2():
    small, _ = build_backbone("resnet18", small_stem=True)
    standard, _ = build_backbone("resnet18")
    assert _layer1_spatial_size(small, 32) == 32
    assert _layer1_spatial_size(standard, 32) == 8
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)


@pytest.mark.parametrize(
    ("arch", "block", "last_bn"), [("resnet18", BasicBlock, "bn2"), ("resnet50", Bottleneck, "bn3")]
)
def test_zero_init_residual(arch, block, last_bn):
    backbone, _ = build_backbone(arch)
    blocks = [m for m in backbone.modules() if isinstance(m, block)]
    assert blocks
    for residual_block in blocks:
        assert torch.count_nonzero(getattr(residual_block, last_bn).weight) == 0
        assert torch.all(residual_block.bn1.weight == 1)


@pytest.mark.parametrize(
    ("arch", "block", "last_bn", "expansion"),
    [("resnet18", BasicBlock, "bn2", 1), ("resnet50", Bottleneck, "bn3", 4)],
)
def test_width_scales_every_stage_and_keeps_torchvision_init(arch, block, last_bn, expansion):
    backbone, feature_dim = build_backbone(arch, width=16)
    stock, _ = build_backbone(arch)
    assert feature_dim == 16 * 8 * expansion
    stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    assert [stage[-1].conv1.in_channels for stage in stages] == [16 * 2**k * expansion for k in range(4)]
    stock_stages = [stock.layer1, stock.layer2, stock.layer3, stock.layer4]
    assert [len(stage) for stage in stages] == [len(stage) for stage in stock_stages]
    blocks = [m for m in backbone.modules() if isinstance(m, block)]
    for residual_block in blocks:  # each block starts as the identity, as the stock network's
        assert torch.count_nonzero(getattr(residual_block, last_bn).weight) == 0
    conv = backbone.layer2[0].conv1.weight  # kaiming normal, fan_out: sd sqrt(2 / (out x kh x kw))
    assert conv.std().item() == pytest.approx((2 / conv[0, 0].numel() / conv.shape[0]) ** 0.5, rel=0.1)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, feature_dim)
    assert num_params(backbone) < num_params(stock) / 10


def test_width_reaches_the_linear_classifier():
    cfg = PretrainConfig(arch="resnet18", width=8, small_stem=True)
    pretrained = build_pretrain_model(cfg)
    classifier = build_linear_classifier(cfg, num_classes=10)
    load_backbone(classifier.backbone, pretrained.state_dict())
    assert classifier.backbone.conv1.out_channels == 8 and classifier.fc.in_features == 64


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("vit_tiny")


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in module.named_buffers()}


def test_linear_classifier_keeps_backbone_frozen_in_train_mode():
    classifier = build_linear_classifier(PretrainConfig(arch="resnet18", small_stem=True), num_classes=10)
    classifier.train()
    assert classifier.training and classifier.fc.training
    assert not any(m.training for m in classifier.backbone.modules())
    assert all(not p.requires_grad for p in classifier.backbone.parameters())
    assert num_params(classifier, trainable_only=True) == 512 * 10 + 10

    buffers_before = _bn_buffers(classifier.backbone)
    x = torch.randn(4, 3, 32, 32)
    logits = classifier(x)
    logits.sum().backward()

    for name, buf in classifier.backbone.named_buffers():
        assert torch.equal(buf, buffers_before[name]), name
    frozen = copy.deepcopy(classifier.backbone).eval()
    torch.testing.assert_close(logits, classifier.fc(frozen(x)))
    assert classifier.fc.weight.grad is not None
    assert all(p.grad is None for p in classifier.backbone.parameters())


def test_linear_classifier_init():
    backbone, feature_dim = build_backbone("resnet18")
    classifier = LinearClassifier(backbone, feature_dim, num_classes=100)
    assert torch.count_nonzero(classifier.fc.bias) == 0
    assert classifier.fc.weight.mean().abs() < 1e-3
    assert abs(classifier.fc.weight.std().item() - 0.01) < 5e-4


def _trained_looking_state_dict(cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """A pretraining state_dict whose every entry differs from a fresh model's (buffers included)."""
    model = build_pretrain_model(cfg)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.rand_like(tensor, dtype=torch.float).to(tensor.dtype) + 1)
    return model.state_dict()


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_load_backbone_strips_wrapper_prefixes(prefix):
    cfg = PretrainConfig(arch="resnet18", small_stem=True, projector_hidden_dim=16, projector_out_dim=8)
    state = _trained_looking_state_dict(cfg)
    classifier = build_linear_classifier(cfg, num_classes=10)
    fc_before = copy.deepcopy(classifier.fc.state_dict())

    load_backbone(classifier, {prefix + key: value for key, value in state.items()})

    loaded = classifier.backbone.state_dict()
    assert len(loaded) == sum(key.startswith("backbone.") for key in state)
    for key, value in loaded.items():
        assert torch.equal(value, state["backbone." + key]), key
    for key, value in classifier.fc.state_dict().items():
        assert torch.equal(value, fc_before[key])


def test_load_backbone_into_bare_backbone():
    cfg = PretrainConfig(arch="resnet18", projector_hidden_dim=16, projector_out_dim=8)
    state = _trained_looking_state_dict(cfg)
    backbone, _ = build_backbone("resnet18")
    load_backbone(backbone, state)
    assert torch.equal(backbone.layer4[1].bn2.running_var, state["backbone.layer4.1.bn2.running_var"])


def test_load_backbone_names_missing_keys():
    cfg = PretrainConfig(arch="resnet18", projector_hidden_dim=16, projector_out_dim=8)
    state = _trained_looking_state_dict(cfg)
    del state["backbone.conv1.weight"], state["backbone.layer4.1.bn2.running_var"]
    classifier = build_linear_classifier(cfg, num_classes=10)
    with pytest.raises(ValueError, match="lacks 2 backbone keys") as error:
        load_backbone(classifier, state)
    assert "conv1.weight" in str(error.value) and "layer4.1.bn2.running_var" in str(error.value)


def test_load_backbone_rejects_other_arch():
    state = build_pretrain_model(PretrainConfig(arch="resnet34", projector_hidden_dim=16)).state_dict()
    with pytest.raises(ValueError, match="has backbone keys this arch lacks: layer1.2.bn1.bias"):
        load_backbone(build_backbone("resnet18")[0], state)


def test_load_backbone_without_backbone_keys_says_so():
    with pytest.raises(ValueError, match="no 'backbone.' keys"):
        load_backbone(build_backbone("resnet18")[0], {"encoder.conv1.weight": torch.zeros(1)})


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_sync_batchnorm_only_for_distributed_cuda():
    model = build_pretrain_model(PretrainConfig(arch="resnet18", projector_hidden_dim=16))
    bn_count = _count(model, nn.modules.batchnorm._BatchNorm)
    assert maybe_sync_batchnorm(model, distributed=False, device=torch.device("cuda")) is model
    assert maybe_sync_batchnorm(model, distributed=True, device=torch.device("cpu")) is model
    # Conversion is structural, so it can be checked without a GPU.
    converted = maybe_sync_batchnorm(copy.deepcopy(model), distributed=True, device="cuda")
    assert _count(converted, nn.SyncBatchNorm) == bn_count


def test_sync_batchnorm_still_unsupported_on_cpu(tmp_path):
    """Canary for maybe_sync_batchnorm's CPU rule: fails once torch supports CPU SyncBatchNorm."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            nn.SyncBatchNorm(4).train()(torch.randn(3, 4))
    finally:
        dist.destroy_process_group()
