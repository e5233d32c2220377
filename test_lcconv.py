"""Tests for lcconv.py (the layer, models, analysis) and train.py / experiments.sh (CPU only)."""
import copy
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import venv
from pathlib import Path

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lcconv
import train
from lcconv import LCConv2d, PreconditionedConv2d


def assert_close(a, b, atol=1e-5, rtol=1e-4):
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs difference {(a - b).abs().max():.3g}"


def lc_resnet(depth=8, width=4, kernel_size=3, expansion=0, frozen=False, init="kaiming_uniform",
              intermediate="none", form="block", **kw):
    return lcconv.convert(lcconv.resnet(depth, width, kernel_size=kernel_size, **kw), expansion, frozen, init,
                          intermediate, form)


def lc_convmixer(dim=8, depth=2, kernel_size=5, expansion=0, frozen=False, init="kaiming_uniform",
                 intermediate="none", form="block", **kw):
    return lcconv.convert(lcconv.convmixer(dim, depth, kernel_size, **kw), expansion, frozen, init, intermediate, form)


# -----------------------------------------------------------------------------
# LCConv2d: the folded conv computes the paper's two-conv block; to_conv2d and fold keep it


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("in_channels, out_channels, groups", [(4, 6, 1), (6, 4, 2), (8, 8, 8)])
@pytest.mark.parametrize("expansion", [1, 3])
def test_folded_block_equals_the_two_convs_and_to_conv2d(kernel_size, stride, in_channels, out_channels,
                                                         groups, expansion):
    torch.manual_seed(0)
    block = LCConv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=True,
                     expansion=expansion)
    nn.init.normal_(block.combine.bias)
    x = torch.randn(2, in_channels, 11, 11)
    folded = block(x)
    maps = F.conv2d(x, block.spatial.weight, None, stride, kernel_size // 2, 1, groups)  # the paper's block
    assert_close(folded, F.conv2d(maps, block.combine.weight, block.combine.bias, groups=groups))
    assert_close(folded, block.to_conv2d()(x))
    assert block.combined_weight.shape == (out_channels, in_channels // groups, kernel_size, kernel_size)
    assert folded.shape == (2, out_channels, math.ceil(11 / stride), math.ceil(11 / stride))


def test_depthwise_lc_block_folds_into_a_depthwise_conv():
    block = LCConv2d(16, 16, 5, groups=16, expansion=8)
    conv = block.to_conv2d()
    assert conv.groups == 16 and conv.weight.shape == (16, 1, 5, 5)
    x = torch.randn(2, 16, 9, 9)
    # channel 3 of the output depends on channel 3 of the input only
    x2 = x.clone()
    x2[:, 4:] = torch.randn_like(x2[:, 4:])
    assert_close(block(x)[:, :4], block(x2)[:, :4])


@pytest.mark.parametrize("intermediate", ["relu", "bn", "bn_relu"])
def test_intermediate_op_sits_between_the_two_convs(intermediate):
    torch.manual_seed(0)
    block = LCConv2d(4, 4, 3, expansion=2, intermediate=intermediate)
    x = torch.randn(8, 4, 6, 6)
    maps = F.conv2d(x, block.spatial.weight, padding=1)
    if "bn" in intermediate:  # training mode: normalised with the batch's statistics
        maps = (maps - maps.mean((0, 2, 3), keepdim=True)) / (maps.var((0, 2, 3), unbiased=False, keepdim=True)
                                                              + 1e-5).sqrt()
    if "relu" in intermediate:
        maps = maps.relu()
    assert_close(block(x), F.conv2d(maps, block.combine.weight))
    assert not torch.allclose(block(x), F.conv2d(x, block.combined_weight, padding=1), atol=1e-3)
    with pytest.raises(RuntimeError, match="not linear"):
        block.to_conv2d()


@pytest.mark.parametrize("build", [
    lambda: lc_resnet(expansion=4, frozen=True), lambda: lc_resnet(kernel_size=5, expansion=2),
    lambda: lc_convmixer(expansion=3, frozen=True), lambda: lc_resnet(expansion=4, frozen=True, form="preconditioned"),
    lambda: lc_resnet(expansion=2, intermediate="bn")])
def test_fold_replaces_linear_blocks_by_convs_with_equal_outputs(build):
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():  # BN statistics away from the identity, so they matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    nonlinear = [n for n, m in lcconv.spatial_layers(model) if isinstance(m, LCConv2d) and not m.linear]
    folded = lcconv.fold(model)
    assert folded is model
    assert_close(model(x), before)
    for name, layer in lcconv.spatial_layers(model):
        assert isinstance(layer, LCConv2d) == (name in nonlinear), name
        assert type(layer) in (LCConv2d, nn.Conv2d), name
    assert lcconv.count_parameters(model)[1] <= lcconv.count_parameters(build())[1]


def test_fold_and_convert_return_a_block_that_is_the_whole_model():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    block = lcconv.convert(conv, expansion=2)
    assert isinstance(block, LCConv2d)
    assert isinstance(lcconv.fold(block), nn.Conv2d)


def test_convert_keeps_a_conv_shared_by_two_parents_shared():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    lcconv.convert(model, expansion=2)
    assert isinstance(model[0][0], LCConv2d) and model[0][0] is model[1][0]


# -----------------------------------------------------------------------------
# Frozen means frozen: no gradient, so weight decay and momentum leave the filters alone


@pytest.mark.parametrize("expansion", [0, 4])
def test_frozen_filters_are_bit_identical_after_training_steps(expansion):
    torch.manual_seed(0)
    model = lc_resnet(expansion=expansion, frozen=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # all parameters on purpose, frozen ones included: they get no gradient, so SGD skips them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    spatial = [k for k in before if k.endswith(".spatial.weight") or (expansion == 0 and before[k].dim() == 4
                                                                       and before[k].shape[-1] == 3)]
    learnable = [k for k in before if k.endswith("combine.weight") or k == "fc.weight"]
    assert len(spatial) == 7 and learnable
    for k in spatial:
        assert torch.equal(before[k], after[k]), k
    for k in learnable:
        assert not torch.equal(before[k], after[k]), k


def test_learnable_filters_change():
    torch.manual_seed(0)
    block = LCConv2d(3, 4, 3, expansion=2, frozen=False)
    before = block.spatial.weight.clone()
    block(torch.randn(2, 3, 8, 8)).square().sum().backward()
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    assert not block.frozen and not torch.equal(before, block.spatial.weight)


def test_fused_sgd_gives_the_default_sgds_updates():
    """train.py's optimizer is fused for speed: over steps of train_step it tracks the plain SGD."""
    torch.manual_seed(0)
    models = [lc_resnet(expansion=4), lc_resnet(expansion=4)]
    models[1].load_state_dict(models[0].state_dict())
    fused = train.make_optimizer(models[0], 0.1, 0.9, 0.01)
    params = [p for p in models[1].parameters() if p.requires_grad]
    plain = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        for model, optimizer in zip(models, (fused, plain)):
            train.train_step(model, optimizer, x, y, 0.1, "fp32")
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5), f"{name}: {(a - b).abs().max():.2e}"


# -----------------------------------------------------------------------------
# Parameter counts: the paper's 272,474 and closed forms for ResNet-LC-D-WxE


def resnet_parameters(depth, width, kernel_size, expansion, num_classes=10, in_channels=3):
    """(learnable, total) of ResNet(-LC)-{depth}-{width}(x{expansion}), frozen spatial convs."""
    n = (depth - 2) // 6
    convs, other = [(in_channels, width)], 2 * width  # (c_in, c_out) of spatial convs; stem BN
    c = width
    for stage in range(3):
        for i in range(n):
            c_out = width * 2**stage
            convs += [(c, c_out), (c_out, c_out)]
            other += 4 * c_out + (c * c_out + 2 * c_out if c != c_out else 0)
            c = c_out
    other += c * num_classes + num_classes
    k2 = kernel_size**2
    if expansion == 0:
        return other, other + sum(i * o * k2 for i, o in convs)
    return (other + sum(o * o * expansion for i, o in convs),
            other + sum(o * o * expansion + o * expansion * i * k2 for i, o in convs))


def test_resnet20_16_has_the_papers_parameter_count():
    assert lcconv.count_parameters(lcconv.resnet()) == (272_474, 272_474)


@pytest.mark.parametrize("depth, width, kernel_size, expansion", [
    (20, 16, 3, 0), (20, 16, 3, 1), (20, 16, 3, 128), (8, 8, 5, 4), (14, 32, 9, 2), (260, 4, 3, 0)])
def test_parameter_counts_match_closed_form(depth, width, kernel_size, expansion):
    model = lc_resnet(depth, width, kernel_size, expansion=expansion, frozen=True)
    assert lcconv.count_parameters(model) == resnet_parameters(depth, width, kernel_size, expansion)


def test_convmixer_parameter_count():
    dim, depth, k, p, e = 32, 3, 5, 2, 4
    model = lc_convmixer(dim, depth, k, expansion=e, frozen=True, patch_size=p, num_classes=10)
    stem = dim * e * 3 * p * p, dim * e * dim + dim  # (frozen, learnable): spatial; 1×1 + bias
    depthwise = dim * e * k * k, dim * e + dim  # grouped 1×1: each channel combines its own E maps
    other = 2 * dim + depth * (2 * dim + dim * dim + dim + 2 * dim) + dim * 10 + 10
    learnable = stem[1] + depth * depthwise[1] + other
    assert lcconv.count_parameters(model) == (learnable, learnable + stem[0] + depth * depthwise[0])


# -----------------------------------------------------------------------------
# Random filter inits


def test_default_init_is_pytorchs():
    torch.manual_seed(0)
    block = LCConv2d(64, 32, 3, expansion=4)
    w, fan_in = block.spatial.weight, 64 * 9
    assert w.abs().max() <= 1 / math.sqrt(fan_in)
    assert w.abs().max() > 0.99 / math.sqrt(fan_in)
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    reference = nn.Conv2d(64, 128, 3)  # PyTorch's own default, same bound
    assert reference.weight.abs().max() <= 1 / math.sqrt(fan_in)


def random_filters(c_in, c_out, kernel_size, init="kaiming_uniform"):
    return lcconv.convert(nn.Conv2d(c_in, c_out, kernel_size), init=init).weight


@pytest.mark.parametrize("init", ["kaiming_normal", "center"])
@pytest.mark.parametrize("kernel_size", [3, 9])
def test_other_inits_keep_the_default_std(init, kernel_size):
    torch.manual_seed(0)
    w = random_filters(32, 64, kernel_size, init)
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * 32 * kernel_size**2), rel=0.03)
    assert w.mean().abs() < 0.05 * w.std()


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_center_init_puts_variance_in_the_centre(kernel_size):
    torch.manual_seed(0)
    w = random_filters(128, 128, kernel_size, "center").reshape(-1, kernel_size, kernel_size)
    variance = w.var(0)
    c, sigma = kernel_size // 2, kernel_size / 4
    expected = math.exp((2 * c**2) / sigma**2)  # centre / corner = exp(r² / σ²)
    assert (variance[c, c] / variance[0, 0]).item() == pytest.approx(expected, rel=0.1)
    assert variance[c, c] == variance.max()
    uniform = random_filters(128, 128, kernel_size).reshape(-1, kernel_size, kernel_size).var(0)
    assert (uniform.max() / uniform.min()).item() < 1.1


# -----------------------------------------------------------------------------
# Filter analysis


def fve_direct(weight):
    """H from the eigenvalues of the kernels' covariance matrix (= s² of the centred matrix)."""
    kernels = weight.double().reshape(-1, weight.shape[-1] * weight.shape[-2])
    eigenvalues = torch.linalg.eigvalsh(torch.cov(kernels.T)).clamp(min=0)
    r = eigenvalues / eigenvalues.sum()
    return -sum(x * math.log10(x) for x in r.tolist() if x > 0)


@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (64, 32, 3, 3), (8, 3, 7, 7)])
def test_fve_matches_direct_computation_and_is_high_for_random_filters(shape):
    torch.manual_seed(0)
    w = torch.rand(shape) - 0.5
    raw, normalised = lcconv.filter_variance_entropy(w)
    assert raw == pytest.approx(fve_direct(w), rel=1e-6)
    assert raw == pytest.approx(normalised * lcconv.fve_threshold(shape[0] * shape[1]))
    assert raw <= math.log10(shape[-1] ** 2) + 1e-9
    if shape[-1] == 3:
        assert normalised > 0.95


def test_fve_is_zero_for_one_repeated_pattern():
    pattern = torch.randn(3, 3)
    assert lcconv.filter_variance_entropy(pattern.expand(32, 16, 3, 3)) == (0.0, 0.0)
    scaled = pattern * torch.randn(32, 16, 1, 1)  # one pattern at different scales: rank 1
    assert lcconv.filter_variance_entropy(scaled)[0] < 1e-6


def test_fve_threshold_values():
    assert lcconv.fve_threshold(256) == pytest.approx(0.9433, abs=1e-3)
    assert lcconv.fve_threshold(2**20) == pytest.approx(1.2618047 - 0.31050834, abs=1e-3)


def test_combined_filters_in_forward_order():
    model = lc_resnet(expansion=2)
    filters = lcconv.combined_filters(model)
    assert list(filters) == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                             "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    assert_close(filters["layer2.0.conv1"], model.layer2[0].conv1.combined_weight)
    assert filters["layer3.0.conv2"].shape == (16, 16, 3, 3)


def test_spatial_variance_is_uniform_for_iid_filters_and_centred_for_center_init():
    torch.manual_seed(0)
    for model in [lcconv.resnet(kernel_size=5), lc_resnet(20, 16, 5, expansion=4, frozen=True),
                  lc_convmixer(256, 4, 7, expansion=2)]:
        variance = lcconv.spatial_variance(model)
        assert variance.shape == (model_kernel(model),) * 2
        assert (variance.std() / variance.mean()).item() < 0.06  # sampling noise only
    centred = lcconv.spatial_variance(lc_resnet(20, 16, 5, init="center"))
    assert (centred[2, 2] / centred[0, 0]).item() > 10


def model_kernel(model):
    return max(m.kernel_size[0] for _, m in lcconv.spatial_layers(model))


# -----------------------------------------------------------------------------
# convert: frozen random / LC spatial convs in any model (the paper's Fig. 1)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("expansion", [0, 2])
def test_convert_torchvision_models(arch, expansion):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    before = {name: conv for name, conv in lcconv.spatial_layers(model)}
    pointwise = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
                 and m.kernel_size == (1, 1)}
    lcconv.convert(model, expansion=expansion, frozen=True)
    after = dict(lcconv.spatial_layers(model))
    assert list(after) == list(before)
    for name, old in before.items():
        new = after[name]
        assert isinstance(new, LCConv2d if expansion else nn.Conv2d) and new is not old
        for attr in ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"]:
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
        weight = new.spatial.weight if expansion else new.weight
        assert not weight.requires_grad
        assert weight.abs().max() <= 1 / math.sqrt(weight[0].numel())  # fresh default init
    for name, weight in pointwise.items():  # 1×1 convs are kept, learnable
        assert model.get_submodule(name).weight is weight and weight.requires_grad
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    learnable, total = lcconv.count_parameters(model)
    frozen = sum((m.spatial.weight if expansion else m.weight).numel() for m in after.values())
    assert total - learnable == frozen


# -----------------------------------------------------------------------------
# Every model, mode and kernel size builds, trains a step and keeps frozen filters gradient-free

# -----------------------------------------------------------------------------
# convert replaces plain convs only: a conv subclass with its own forward is refused, whole


class SameConv2d(nn.Conv2d):
    """timm-style TF 'same' padding, computed in forward from the input's size."""

    def forward(self, x):
        pads = [max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0) for size, k, s, d in
                zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (BiT's StdConv2d)."""

    def standardised(self):
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                            training=True, eps=1e-6).reshape_as(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.standardised(), self.bias)


class ScaledStdConv2d(StdConv2d):
    """Weight standardisation with a learned gain per filter (NF-Nets' ScaledStdConv2d)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * self.gain, bias)


class InitOnlyConv2d(nn.Conv2d):
    """Changes __init__ only (a default padding): computes as nn.Conv2d."""

    def __init__(self, in_channels, out_channels, kernel_size=3, **kw):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, **kw)


def small_model(conv):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Conv2d(4, 2, 1))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, type(m)) for name, m in model.named_modules()])


def assert_unchanged(model, before):
    state, types = snapshot(model)
    assert types == before[1]
    assert state.keys() == before[0].keys() and all(torch.equal(v, before[0][k]) for k, v in state.items())


@pytest.mark.parametrize("expansion", [0, 4])
@pytest.mark.parametrize("cls", [SameConv2d, StdConv2d, ScaledStdConv2d])
def test_a_conv_subclass_with_its_own_forward_is_refused_and_nothing_replaced(cls, expansion):
    model = small_model(cls(4, 4, 3, padding=1))
    before = snapshot(model)
    with pytest.raises(ValueError) as refused:
        lcconv.convert(model, expansion=expansion)
    assert f"3.0 is a {cls.__name__}, an nn.Conv2d subclass with its own forward" in str(refused.value)
    assert_unchanged(model, before)


def test_a_subclass_refused_as_the_whole_model_names_its_class():
    with pytest.raises(ValueError, match="StdConv2d is a StdConv2d"):
        lcconv.convert(StdConv2d(3, 4, 3), expansion=2)


@pytest.mark.parametrize("expansion", [0, 4])
def test_a_subclass_that_only_changes_init_converts_and_folds(expansion):
    torch.manual_seed(0)
    model = lcconv.convert(small_model(InitOnlyConv2d(4, 4)).double(), expansion=expansion)
    assert type(model[3][0]) is (lcconv.LCConv2d if expansion else nn.Conv2d)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(lcconv.fold(model)(x), y)
    assert all(type(m) is nn.Conv2d for _, m in lcconv.spatial_layers(model))


@pytest.mark.parametrize("expansion", [0, 4])
def test_bad_padding_in_the_second_conv_is_refused_before_the_first_is_replaced(expansion):
    model = small_model(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    before = snapshot(model)
    with pytest.raises(ValueError) as refused:
        lcconv.convert(model, expansion=expansion)
    assert "only numeric zero padding is supported; 3.0 has" in str(refused.value)
    assert_unchanged(model, before)


MODES = {"learnable": dict(), "frozen": dict(frozen=True), "lc": dict(expansion=2),
         "lc_frozen": dict(expansion=2, frozen=True), "lc_bn_relu": dict(expansion=2, intermediate="bn_relu"),
         "center": dict(expansion=2, frozen=True, init="center"),
         "preconditioned": dict(expansion=2, frozen=True, form="preconditioned"),
         "limit": dict(expansion=2, frozen=True, init="center", form="limit")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("arch", ["resnet", "convmixer"])
def test_every_model_mode_and_kernel_size_runs(arch, kernel_size, mode):
    torch.manual_seed(0)
    build = lc_resnet if arch == "resnet" else lc_convmixer
    model = build(kernel_size=kernel_size, num_classes=7, in_channels=1, **MODES[mode])
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7)
    out.sum().backward()
    kinds = {"block": LCConv2d, "preconditioned": PreconditionedConv2d, "limit": PreconditionedConv2d}
    for name, layer in lcconv.spatial_layers(model):
        weight = layer.spatial.weight if isinstance(layer, LCConv2d) else layer.weight
        frozen = MODES[mode].get("frozen", False) and MODES[mode].get("form", "block") == "block"
        assert (weight.grad is None) == frozen, name
        expected = kinds[MODES[mode].get("form", "block")] if "expansion" in MODES[mode] else nn.Conv2d
        assert type(layer) is expected, name


def test_jit_script_compiles_every_model():
    for model in [lcconv.resnet(8, 4), lcconv.convmixer(8, 2), lc_resnet(expansion=2, frozen=True),
                  lc_convmixer(expansion=2, frozen=True)]:
        scripted = torch.jit.script(model.eval())
        x = torch.randn(2, 3, 16, 16)
        assert_close(scripted(x), model(x))


def test_state_dict_round_trips():
    torch.manual_seed(0)
    a = lc_resnet(expansion=3, frozen=True, intermediate="bn")
    torch.manual_seed(1)
    b = lc_resnet(expansion=3, frozen=True, intermediate="bn")
    x = torch.randn(2, 3, 16, 16)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(a(x), b(x))
    assert all(k in a.state_dict() for k in ["stem.spatial.weight", "stem.combine.weight",
                                             "stem.intermediate.running_mean"])
    assert b.stem.frozen


# -----------------------------------------------------------------------------
# Why it trains: a frozen LC-Block trains exactly as its preconditioned conv (lcconv.py, "Why it trains")

# (in, out, kernel, stride, padding, dilation, groups, bias, E): m = E·out/groups vs d = in/groups·k²
BLOCKS = {"grouped, m < d": (8, 8, 3, 1, 1, 1, 4, False, 4), "depthwise, m > d": (6, 6, 3, 1, 1, 1, 6, True, 16),
          "strided, m > d": (4, 6, 3, 2, 1, 1, 1, False, 8), "m < d": (16, 4, 3, 1, 1, 1, 1, True, 1),
          "m >> d": (2, 4, 3, 1, 1, 1, 1, False, 32), "dilated, unpadded 5×5": (3, 4, 5, 1, 0, 2, 1, True, 4)}


@pytest.mark.parametrize("lr", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("shape", BLOCKS)
def test_frozen_block_and_preconditioned_conv_train_identically(shape, lr):
    """Train.py's optimizer (SGD, Nesterov momentum, weight decay), float64, same batches: the
    combined filters of the LC-Block and the weight of its preconditioned form stay equal."""
    in_channels, out_channels, k, stride, padding, dilation, groups, bias, expansion = BLOCKS[shape]
    torch.manual_seed(0)
    block = LCConv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias, expansion).double()
    conv = block.to_preconditioned()
    d = conv.weight[0].numel()
    assert isinstance(conv, PreconditionedConv2d) and conv.preconditioner.shape == (groups, d, d)
    start = conv.weight.clone()
    optimizers = [train.make_optimizer(m, lr, momentum=0.9, weight_decay=0.01) for m in (block, conv)]
    for step in range(25):
        x = torch.randn(4, in_channels, 9, 9, dtype=torch.float64)
        target = torch.randn_like(block(x))
        for model, optimizer in zip((block, conv), optimizers):
            optimizer.zero_grad()
            F.mse_loss(model(x), target).backward()
            optimizer.step()
    difference = (block.combined_weight - conv.weight).norm() / conv.weight.norm()
    assert difference < 1e-10, f"relative difference {difference:.3g}"
    assert (conv.weight - start).norm() > 1e-3 * start.norm()  # and they did train
    if bias:
        assert_close(conv.bias, block.combine.bias, atol=1e-12, rtol=1e-10)


# (in, out, kernel, groups): a dense and a depthwise conv
DRAWN = {"dense": (16, 32, 3, 1), "depthwise": (8, 8, 3, 8)}


@pytest.mark.parametrize("init", lcconv.INITS)
@pytest.mark.parametrize("expansion", [1, 64])
@pytest.mark.parametrize("shape", DRAWN)
def test_preconditioned_form_is_drawn_from_the_blocks_distribution(shape, expansion, init):
    """convert(form="preconditioned") draws P and K₀ without the filters S (m < d: S itself;
    m ≥ d: Bartlett). Over 8 draws: P's mean is the block's m·diag(init_std²), its spectrum
    spreads as Marchenko-Pastur says, and K₀ has the block's variance init_std²/3."""
    in_channels, out_channels, k, groups = DRAWN[shape]
    conv = nn.Conv2d(in_channels, out_channels, k, padding=1, groups=groups, bias=False)
    m, d = out_channels * expansion // groups, in_channels // groups * k * k
    torch.manual_seed(0)
    drawn = [lcconv.convert(conv, expansion, frozen=True, init=init, form="preconditioned") for _ in range(64)]
    assert all(isinstance(c, PreconditionedConv2d) and c.preconditioner.shape == (groups, d, d) for c in drawn)
    variance = (lcconv.init_std(conv.weight.shape, init) ** 2).expand(conv.weight.shape[1:]).reshape(-1)
    mean = torch.cat([c.preconditioner for c in drawn]).double().mean(0)
    assert_close(mean.diagonal(), m * variance, atol=0, rtol=0.2)
    assert (mean - mean.diagonal().diag()).abs().mean() < 0.1 * mean.diagonal().mean()
    k0 = torch.cat([c.weight.reshape(-1, d) for c in drawn]).double()
    assert_close(k0.pow(2).mean(0), variance / 3, atol=0, rtol=0.3)
    [summary] = lcconv.basis_summary(drawn[0])
    assert summary["rank"] == pytest.approx(min(m, d) / d)
    if init != "center" and min(m, d) >= 8:  # i.i.d. filters, not too few: Marchenko-Pastur
        assert summary["spread"] == pytest.approx(summary["spread_mp"], rel=0.35)


@pytest.mark.parametrize("form", ["preconditioned", "limit"])
def test_converting_again_keeps_every_lc_layer_as_it_is(form):
    """convert replaces plain convs only: LC-Blocks and the preconditioned and limit forms
    already in a model keep their trained weights and P, whatever the second convert asks for."""
    torch.manual_seed(0)
    model = lc_resnet(expansion=4, frozen=True, form=form)
    model.layer1[0].conv1 = LCConv2d(4, 4, 3, expansion=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)  # as if trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = dict(lcconv.spatial_layers(model))
    for again in [dict(expansion=0), dict(expansion=8, frozen=True, form="preconditioned"), dict(expansion=2)]:
        assert lcconv.convert(model, **again) is model
        assert dict(lcconv.spatial_layers(model)) == layers
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_preconditioner_mean_eigenvalue_is_alpha_and_spectrum_marchenko_pastur():
    torch.manual_seed(0)
    block = LCConv2d(16, 32, 3, expansion=64)  # m = 2048 filters of d = 144 entries
    [summary] = lcconv.basis_summary(block)
    alpha = 64 * 32 / (3 * 16 * 9)  # E·c_out / (3·c_in·k²)
    eigenvalues = torch.linalg.eigvalsh(block.preconditioner().double())[0]
    assert eigenvalues.mean().item() == pytest.approx(alpha, rel=0.01)  # sampling error ≈ 0.2 %
    q = 144 / 2048
    assert alpha * (1 - q**0.5) ** 2 * 0.9 < eigenvalues.min() and eigenvalues.max() < alpha * (1 + q**0.5) ** 2 * 1.1
    assert summary["m"] == 2048 and summary["d"] == 144 and summary["rank"] == 1
    assert summary["alpha"] == pytest.approx(alpha, rel=0.01) and summary["alpha_iid"] == pytest.approx(alpha)
    assert summary["spread"] == pytest.approx(summary["spread_mp"], rel=0.2)
    [few] = lcconv.basis_summary(LCConv2d(16, 4, 3, expansion=2))  # m = 8 < d = 144
    assert few["rank"] == pytest.approx(8 / 144)


@pytest.mark.parametrize("init", lcconv.INITS)
def test_limit_form_is_the_expected_preconditioner(init):
    torch.manual_seed(0)
    model = lc_resnet(20, 16, 5, expansion=128, frozen=True, init=init, form="limit")
    stride2 = model.layer2[0].conv1  # 16 -> 32 channels
    alpha = 128 * 32 / (3 * 16 * 25)
    std = lcconv.init_std(stride2.weight.shape, init)
    expected = torch.diag((128 * 32 * std**2).expand(16, 5, 5).reshape(-1))
    assert_close(stride2.preconditioner[0].double(), expected)
    assert stride2.preconditioner.diagonal(dim1=1, dim2=2).mean().item() == pytest.approx(alpha, rel=1e-5)
    weights = torch.cat([m.weight.reshape(-1, 5, 5) / lcconv.init_std(m.weight.shape, init).float()
                         for _, m in lcconv.spatial_layers(model)])
    assert weights.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)  # K₀ = C₀·S has std s/√3


def train_side_by_side(nets, steps, in_channels=3, lr=0.05):
    """train.py's optimizer and step (SGD, Nesterov momentum, weight decay, label smoothing),
    float64, the same batches for every net."""
    optimizers = [train.make_optimizer(net, lr, momentum=0.9, weight_decay=0.01) for net in nets]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, in_channels, 16, 16, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        for net, optimizer in zip(nets, optimizers):
            train.train_step(net, optimizer, x, y, 0.1, "fp32")


def limit_and_init_pair(build, expansion, init):
    """The limit form and the init form of one plain model, from one seed, float64, BN eps 1e-30."""
    pair = []
    for form in ("limit", "init"):
        torch.manual_seed(0)
        net = lcconv.convert(build().double(), expansion, frozen=True, init=init, form=form)
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eps = 1e-30  # BN's scale invariance is exact only as eps -> 0
        pair.append(net)
    return pair


def scaled_difference(limit, plain, expansion):
    """max over layers of |K_limit/√α - K_init| / |K_init|."""
    return max(((a.weight / math.sqrt(lcconv.alpha(a, expansion)) - b.weight).norm() / b.weight.norm()).item()
               for (_, a), (_, b) in zip(lcconv.spatial_layers(limit), lcconv.spatial_layers(plain)))


@pytest.mark.parametrize("init", ["kaiming_uniform", "kaiming_normal"])
@pytest.mark.parametrize("expansion", [16, 2048])
def test_under_batchnorm_the_limit_is_the_plain_net_from_a_smaller_init(expansion, init):
    """The identity: where every spatial conv feeds a BatchNorm (our ResNet), the limit of frozen
    LC xE (P = α·I) and the plain net started at K₀/√α, std 1/√(3m), trained with the same
    recipe, keep K_limit = √α·K_init at every step, and compute the same function (with batch
    statistics: BN's running variance starts at 1 in both, which eval mode sees for a while)."""
    limit, plain = limit_and_init_pair(lambda: lcconv.resnet(8, 4), expansion, init)
    assert all(type(m) is nn.Conv2d and m.weight.requires_grad for _, m in lcconv.spatial_layers(plain))
    m = 4 * expansion  # the stem: 4 output channels
    assert plain.stem.weight.std().item() == pytest.approx(1 / math.sqrt(3 * m), rel=0.3)
    start = plain.stem.weight.clone()
    assert scaled_difference(limit, plain, expansion) < 1e-12
    train_side_by_side([limit, plain], steps=30)
    difference = scaled_difference(limit, plain, expansion)
    assert difference < 1e-10, f"relative difference {difference:.3g}"
    assert (plain.stem.weight - start).norm() > 0.1 * start.norm()  # and they did train
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert_close(limit(x), plain(x), atol=1e-9, rtol=1e-9)


def test_the_identity_breaks_where_a_conv_does_not_feed_a_batchnorm():
    """ConvMixer: a conv bias and a GELU sit between each depthwise conv and its BN, so the loss
    sees the filters' scale, and the limit and the init form part at once."""
    limit, plain = limit_and_init_pair(lambda: lcconv.convmixer(dim=8, depth=2, kernel_size=5), 64, "kaiming_uniform")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert (limit.eval()(x) - plain.eval()(x)).abs().max() > 1e-3
    train_side_by_side([limit.train(), plain.train()], steps=30)
    assert scaled_difference(limit, plain, 64) > 1e-2


# -----------------------------------------------------------------------------
# Bad arguments say what is allowed


@pytest.mark.parametrize("build, message", [
    (lambda: LCConv2d(4, 4, 3, expansion=0), "expansion must be an integer >= 1"),
    (lambda: LCConv2d(4, 4, 3, expansion=2.5), "expansion must be an integer >= 1"),
    (lambda: lcconv.convert(lcconv.resnet(), expansion=-2), "expansion must be an integer >= 1"),
    (lambda: LCConv2d(4, 4, 0), "kernel_size must be >= 1"),
    (lambda: lcconv.resnet(kernel_size=0), "kernel_size must be >= 1"),
    (lambda: LCConv2d(4, 4, 4), "odd kernel_size"),
    (lambda: lcconv.convmixer(kernel_size=6), "odd kernel_size"),
    (lambda: LCConv2d(6, 4, 3, groups=4), "divisible by groups"),
    (lambda: LCConv2d(4, 4, 3, groups=0), "groups must be a positive integer"),
    (lambda: LCConv2d(0, 4, 3), "in_channels must be an integer >= 1"),
    (lambda: LCConv2d(4, 0, 3), "out_channels must be an integer >= 1"),
    (lambda: lcconv.resnet(width=0), "out_channels must be an integer >= 1"),
    (lambda: lcconv.convmixer(dim=0), "out_channels must be an integer >= 1"),
    (lambda: lcconv.convmixer(patch_size=0), "patch_size must be in 1..32"),
    (lambda: lcconv.convmixer(depth=-3), "depth must be >= 1"),
    (lambda: LCConv2d(4, 4, 3, init="xavier"), "init must be one of kaiming_uniform, kaiming_normal, center"),
    (lambda: lc_resnet(init="orthogonal"), "init must be one of"),
    (lambda: LCConv2d(4, 4, 3, intermediate="gelu"), "intermediate must be one of none, relu, bn, bn_relu"),
    (lambda: lc_resnet(intermediate="relu"), "needs an LC-Block"),
    (lambda: lc_resnet(expansion=2, form="limit"), "needs a frozen LC-Block"),
    (lambda: lc_resnet(expansion=2, frozen=True, intermediate="relu", form="preconditioned"), "needs a frozen"),
    (lambda: lc_resnet(expansion=2, frozen=True, form="folded"), "form must be one of"),
    (lambda: lc_resnet(expansion=2, frozen=True, init="center", form="init"), "form='init' needs an i.i.d. init"),
    (lambda: lc_resnet(expansion=2, form="init"), "needs a frozen LC-Block"),
    (lambda: lcconv.resnet(depth=21), r"depth must be 6n\+2"),
    (lambda: lcconv.resnet(depth=2), r"depth must be 6n\+2"),
    (lambda: lcconv.convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"))), "numeric zero padding"),
])
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -----------------------------------------------------------------------------
# train.py: end to end on a tiny synthetic dataset, on real Fashion-MNIST, resume, bad input


RESULT_KEYS = ["test_acc", "train_acc", "fgsm_acc", "pgd_acc", "params_learnable", "params_total", "fve_first",
               "fve_last", "fve_first_raw", "fve_last_raw", "epoch_time_median_s", "peak_mem_mb", "spatial_variance",
               "train_loss", "device", "torch", "dataset", "model", "expansion", "frozen", "seed", "epochs",
               "preconditioned", "basis", "precision", "hardware", "code", "first_filters"]
METRICS = ["test_acc", "train_acc", "fgsm_acc", "train_loss", "fve_first", "fve_last", "spatial_variance", "basis"]


def write_idx(path, array):
    """An uint8 IDX file, the format of (Fashion-)MNIST."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny learnable stand-in for Fashion-MNIST: class c is a bright 6×6 square at spot c."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in [("train", 384), ("t10k", 128)]:
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, c in enumerate(labels.tolist()):
            y, x = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
            images[i, y:y + 6, x:x + 6] += 150
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images.to(torch.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def tiny_args(data_dir, tmp_path, *extra, out="results.jsonl"):
    return ["--dataset", "fashionmnist", "--data-dir", str(data_dir), "--depth", "8", "--width", "4",
            "--batch-size", "64", "--epochs", "2", "--out", str(tmp_path / out), *extra]


def results(tmp_path, out="results.jsonl"):
    path = tmp_path / out
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_end_to_end_run_writes_one_complete_result(tiny_data, tmp_path):
    argv = tiny_args(tiny_data, tmp_path, "--expansion", "4", "--frozen", "--pgd-steps", "2",
                     "--checkpoint", str(tmp_path / "run.pt"), "--save-figures", str(tmp_path / "figs"))
    train.main(argv)
    [result] = results(tmp_path)
    for key in RESULT_KEYS:
        assert result.get(key) is not None, key
    assert (result["params_learnable"], result["params_total"]) == resnet_parameters(8, 4, 3, 4, in_channels=1)
    assert 0 <= result["fgsm_acc"] <= 100 and 0 <= result["pgd_acc"] <= result["fgsm_acc"] + 5
    assert len(result["spatial_variance"]) == 3 and len(result["basis"]) == 7
    assert (tmp_path / "figs" / "filters.png").stat().st_size > 100
    assert (tmp_path / "figs" / "spatial_variance.png").stat().st_size > 50
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 2
    # a finished run is finished: --skip-finished, or the same command again, adds nothing
    train.main(argv + ["--skip-finished"])
    train.main(argv)
    assert len(results(tmp_path)) == 1


def test_frozen_lc_runs_in_every_form_and_reports_its_parameter_counts(tiny_data, tmp_path):
    """A frozen LC x16 ResNet, folded and preconditioned (drawn apart, so like another seed), its
    limit and the init form: each learns, and the plain-cost forms count the block they stand for."""
    lc = tiny_args(tiny_data, tmp_path, "--expansion", "16", "--frozen", "--lr", "0.1", "--epochs", "3")
    train.main(lc)
    train.main(lc + ["--preconditioned"])
    for form in ("--lc-limit", "--lc-init"):
        train.main(tiny_args(tiny_data, tmp_path, form, "16", "--lr", "0.1", "--epochs", "3"))
    folded, preconditioned, limit, init = results(tmp_path)
    assert preconditioned["preconditioned"] and limit["lc_limit"] == init["lc_init"] == 16
    assert limit["expansion"] == init["expansion"] == 0 and limit["lc_init"] is None and init["lc_limit"] is None
    assert (preconditioned["lc_params_learnable"], preconditioned["lc_params_total"]) == (
        folded["params_learnable"], folded["params_total"])
    plain = resnet_parameters(8, 4, 3, 0, in_channels=1)
    assert preconditioned["params_learnable"] == limit["params_learnable"] == init["params_learnable"] == plain[1]
    assert max(r["train_loss"] for r in (folded, preconditioned, limit, init)) < 2.1  # they learned (chance: 2.3)
    assert [b["rank"] for b in limit["basis"]] == [1.0] * 7 and limit["basis"][0]["alpha"] == pytest.approx(
        16 * 4 / (3 * 1 * 9), rel=1e-3)
    assert init["basis"] is None  # plain learnable convs


@pytest.mark.parametrize("flags, warned", [(["--lc-limit", "1000000000"], True), (["--lc-init", "2000000"], True),
                                           (["--expansion", "2000000", "--frozen", "--preconditioned"], True),
                                           (["--lc-limit", "32768"], False), (["--expansion", "2000000"], False)])
def test_a_learning_rate_factor_past_any_sweep_is_warned(flags, warned, capsys):
    with torch.device("meta"):
        train.build_net(train.parse_args(["--dataset", "fashionmnist", "--depth", "8", *flags]))
    err = capsys.readouterr().err
    assert ("warning: frozen LC x" in err) == warned and err.count("\n") == warned


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    argv = tiny_args(tiny_data, tmp_path, "--epochs", "3", "--expansion", "2", "--frozen")
    train.main(argv + ["--out", str(tmp_path / "uninterrupted.jsonl")])
    [uninterrupted] = results(tmp_path, "uninterrupted.jsonl")

    checkpoint = str(tmp_path / "run.pt")
    train_epoch = train.train_epoch

    def interrupted(model, optimizer, scheduler, data, args, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(model, optimizer, scheduler, data, args, epoch)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(SystemExit, match="resume from --checkpoint"):
        train.main(argv + ["--checkpoint", checkpoint])
    assert not results(tmp_path) and torch.load(checkpoint, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "train_epoch", train_epoch)
    train.main(argv + ["--checkpoint", checkpoint])
    [resumed] = results(tmp_path)
    for key in METRICS:
        assert resumed[key] == uninterrupted[key], key


@pytest.mark.skipif(not train.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="real Fashion-MNIST is missing: `apt-get install dataset-fashion-mnist` (.ci/run does)")
def test_real_fashion_mnist_subset_learns(tmp_path):
    train.main(["--dataset", "fashionmnist", "--data-dir", str(tmp_path / "data"), "--train-subset", "4000",
                "--epochs", "2", "--batch-size", "64", "--width", "8", "--expansion", "8", "--frozen",
                "--out", str(tmp_path / "results.jsonl")])
    [result] = results(tmp_path)
    assert result["test_acc"] > 60, result["test_acc"]  # chance is 10%
    assert result["train_acc"] > 60


def test_augmentation_is_a_padded_crop_and_maybe_a_flip():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = train.augment(images, torch.Generator().manual_seed(0))
    padded = F.pad(images, (4, 4, 4, 4))
    flips = 0
    for image, source in zip(out, padded):
        crops = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                 if torch.equal(image, source[:, dy:dy + 8, dx:dx + 8].flip(2) if flip else source[:, dy:dy + 8, dx:dx + 8])}
        assert crops, "not a crop of the padded image"
        flips += min(crops)[2]
    assert 4 <= flips <= 28  # about half flipped


def test_channel_stats():
    images = torch.randint(0, 256, (100, 3, 5, 5), dtype=torch.uint8)
    mean, std = train.channel_stats(images)
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert_close(mean, x.mean(1).float())
    assert_close(std, x.std(1, unbiased=False).float())


def test_figures_use_a_fixed_scale_so_uniform_variance_looks_uniform(tmp_path):
    import numpy
    from PIL import Image
    read = lambda path: torch.from_numpy(numpy.array(Image.open(path).convert("L"))).float()
    torch.manual_seed(0)
    for name, model in [("uniform", lc_resnet(20, 16, 3, expansion=32, frozen=True)),
                        ("centre", lc_resnet(20, 16, 5, init="center"))]:
        train.save_figures(model, tmp_path / name)
    uniform, centre = (read(tmp_path / name / "spatial_variance.png") for name in ("uniform", "centre"))
    assert 100 < uniform.min() and uniform.max() < 155  # grey all over (±4% is a few grey levels)
    assert centre[80, 80] > 250 and centre[10, 10] < 60  # white centre, dark corner
    grid = read(tmp_path / "uniform" / "filters.png")  # the stem's 16 RGB filters, 48 px tiles, 8 a row
    assert grid.shape == (2 * 50 + 2, 8 * 50 + 2)


def test_nan_loss_stops_the_run_with_a_message(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(tiny_args(tiny_data, tmp_path, "--lr", "1e30"))
    assert "loss became" in str(exit.value.code) and "--lr" in str(exit.value.code)
    assert not (tmp_path / "results.jsonl").exists()


def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


class Planted:
    """A pickle that would create a file when loaded: what a planted checkpoint could do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "--dataset: invalid choice: 'imagenet'"),
    (["--model", "vgg16"], "--model: invalid choice: 'vgg16'"),
    (["--expansion", "-1"], "--expansion"),
    (["--kernel-size", "0"], "--kernel-size"),
    (["--kernel-size", "4"], "--kernel-size"),
    (["--epochs", "0"], "--epochs"),
    (["--depth", "21"], r"--model resnet: depth must be 6n\+2"),
    (["--model", "resnet18", "--width", "4"], "--width does not apply to --model resnet18"),
    (["--model", "convmixer", "--width", "4"], "--width does not apply to --model convmixer"),
    (["--intermediate", "relu"], "needs an LC-Block"),
    (["--lr", "-1"], "--lr"), (["--momentum", "-1"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--label-smoothing", "2"], "--label-smoothing"), (["--width", "0"], "--width"),
    (["--model", "convmixer", "--depth", "-3"], "convmixer: depth must be >= 1"),
    (["--model", "convmixer", "--dim", "0"], "--dim"),
    (["--model", "convmixer", "--patch-size", "64"], "patch_size must be in 1..32"),
    (["--model", "convmixer", "--patch-size", "0"], "patch_size must be in 1..32"),
    (["--device", "foo"], "--device"), (["--device", "cuda:7"], "--device cuda:7"),
    (["--fgsm-eps", "-1"], "--fgsm-eps"), (["--fgsm-eps", "1e9"], "--fgsm-eps"),
    (["--train-subset", "60001"], "--train-subset must be in 1..60000"),
    (["--seed", str(2**64)], "--seed must be in 0..4294967295"),
    (["--preconditioned", "--expansion", "4"], "--preconditioned needs --frozen"),
    (["--lc-limit", "8", "--frozen"], "--lc-limit"), (["--lc-limit", "0"], "--lc-limit"),
    (["--lc-init", "8", "--expansion", "8"], "--lc-init"), (["--lc-init", "8", "--lc-limit", "8"], "--lc-init"),
    (["--lc-init", "0"], "--lc-init"), (["--lc-init", "8", "--init", "center"], "form='init' needs an i.i.d. init"),
    (["--out", "/dev/full"], "--out /dev/full: is not a regular file"),
    (["--out", "FILE/results.jsonl"], "--out .*FILE is not a directory"),
    (["--save-figures", "FILE/figures"], "--save-figures .*FILE is not a directory"),
    (["--checkpoint", "FILE/run.pt"], "--checkpoint .*FILE is not a directory"),
    (["--out", "DIR"], "--out .*is a directory"),
    (["--dataset", "cifar10"], "cannot load cifar10 .* connect to the internet"),
    (["--data-dir", "CORRUPT_DATA"], "cannot load fashionmnist .* corrupt"),
    (["--checkpoint", "CORRUPT"], "cannot read checkpoint"),
    (["--checkpoint", "PLANTED"], "cannot read checkpoint"),
    (["--checkpoint", "OTHER", "--seed", "1"], "differs in seed"),
])
def test_bad_input_one_line_and_nothing_written(tiny_data, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "_check_integrity", lambda self: False)
    (tmp_path / "CORRUPT").write_bytes(b"not a checkpoint")
    (tmp_path / "PLANTED").write_bytes(pickle.dumps({"config": Planted(tmp_path / "PWNED")}))
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "DIR").mkdir()
    raw = tmp_path / "CORRUPT_DATA" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (tiny_data / "FashionMNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes()[:100])  # cut short
    other = tmp_path / "OTHER"
    torch.save({"config": train.recipe(train.parse_args(tiny_args(tiny_data, tmp_path))), "epoch": 1}, other)
    before = other.read_bytes()
    extra = [str(tmp_path / a) if a.split("/")[0] in ("CORRUPT", "PLANTED", "OTHER", "DIR", "FILE", "CORRUPT_DATA")
             else a for a in extra]
    data_dir = tmp_path / "empty" if "cifar10" in extra else tiny_data
    argv = tiny_args(data_dir, tmp_path, *extra)
    if "--model" in extra:  # no ResNet flags
        argv = argv[:4] + argv[8:]
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    error = str(exit.value.code) if isinstance(exit.value.code, str) else capsys.readouterr().err
    assert exit.value.code != 0 and error.count("\n") <= 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert not (tmp_path / "results.jsonl").exists() and other.read_bytes() == before
    assert not (tmp_path / "PWNED").exists()  # the planted pickle never ran


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--epochs", "0", "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "--epochs" in run.stderr and not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("extra, refused", [
    (["--kernel-size", "1", "--expansion", "8", "--frozen", "--preconditioned"],
     "--expansion, --frozen, --preconditioned"),
    (["--kernel-size", "1", "--lc-limit", "8"], "--lc-limit"),
    (["--kernel-size", "1", "--init", "center", "--save-figures", "figures"], "--init"),
    (["--kernel-size", "1", "--lc-init", "8"], "--lc-init"),
    (["--model", "convmixer", "--patch-size", "1", "--kernel-size", "1", "--intermediate", "relu", "--expansion", "2"],
     "--expansion, --intermediate"),
    (["--model", "convmixer", "--patch-size", "2", "--kernel-size", "1", "--expansion", "2", "--frozen"], None),
    (["--kernel-size", "1"], None),
])
def test_lc_flags_on_a_model_without_spatial_conv_are_one_line_before_any_work(capsys, extra, refused):
    """Every conv 1×1: the LC flags would do nothing, so they are refused up front (a 2×2
    patch stem is a spatial conv, so that ConvMixer takes them)."""
    if refused is None:
        train.parse_args(extra)
        return
    with pytest.raises(SystemExit) as exit:
        train.parse_args(extra)
    error = capsys.readouterr().err
    assert exit.value.code == 2 and error.count("\n") == 1, error
    assert "has no spatial conv" in error and f"nothing for {refused} to act on" in error, error


def test_a_plain_run_without_spatial_conv_records_empty_filter_metrics(tiny_data, tmp_path):
    """...and draws no figures (a sweep passes --save-figures to every run)."""
    train.main(tiny_args(tiny_data, tmp_path, "--kernel-size", "1", "--epochs", "1", "--save-figures",
                         str(tmp_path / "figures")))
    [result] = results(tmp_path)
    assert not (tmp_path / "figures").exists()
    assert result["test_acc"] is not None and result["kernel_size"] == 1
    for key in ("fve_first", "fve_last", "fve_first_raw", "fve_last_raw", "spatial_variance", "basis"):
        assert result[key] is None, key


@pytest.mark.parametrize("checkpoint", [False, True])
def test_an_interrupted_run_says_to_resume_only_with_a_checkpoint(tmp_path, monkeypatch, checkpoint):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "run", interrupted)
    argv = ["--out", str(tmp_path / "r.jsonl")] + (["--checkpoint", str(tmp_path / "run.pt")] if checkpoint else [])
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    message = str(exit.value.code)
    assert message.startswith("train.py: interrupted") and message.count("\n") == 0
    assert ("resume from --checkpoint" in message) == checkpoint, message


@pytest.mark.parametrize("extra", [["--depth", "21"], ["--model", "convmixer", "--depth", "0"],
                                   ["--model", "convmixer", "--patch-size", "33"]])
def test_lcconvs_own_checks_stop_a_run_before_anything_is_written(tmp_path, capsys, extra):
    """The model sizes train.py leaves to lcconv: still refused by parse_args (experiments.sh
    validates its runs with it), before a lock, a checkpoint or a result is written."""
    argv = [*extra, "--out", str(tmp_path / "out" / "r.jsonl"), "--checkpoint", str(tmp_path / "run.pt"),
            "--skip-finished"]
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    error = capsys.readouterr().err
    assert exit.value.code == 2 and error.count("\n") == 1 and "Traceback" not in error, error
    assert list(tmp_path.iterdir()) == []


# train.py's bf16 path (autocast, channels_last), on the CPU and, where there is one, CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def fast_path_batch(device, generator=None, batch_size=8):
    images = torch.randint(0, 256, (batch_size, 3, 16, 16), dtype=torch.uint8, device=device, generator=generator)
    return train.to_input(images), torch.randint(0, 10, (batch_size,), device=device, generator=generator)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["plain", "block", "preconditioned", "limit"])
def test_training_steps_in_bf16_and_channels_last(device, form):
    """train.py's own step on the plain ResNet and on frozen LC x8 in each form: finite loss,
    bf16 logits, channels_last weights, and what is fixed (the random filters S, P) bit-identical."""
    device = torch.device(device)
    torch.manual_seed(0)
    net = lc_resnet() if form == "plain" else lc_resnet(expansion=8, frozen=True, form=form)
    model = train.to_device(net, device)
    optimizer = train.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    fixed = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
             if not t.requires_grad and (n.endswith(".spatial.weight") or n.endswith("preconditioner"))}
    learnable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(fixed) == (0 if form == "plain" else 7)
    for _ in range(3):
        x, y = fast_path_batch(device)
        assert x.is_contiguous(memory_format=torch.channels_last)
        loss, logits = train.train_step(model, optimizer, x, y, 0.1, "bf16")
        assert logits.dtype == torch.bfloat16 and torch.isfinite(loss), loss
    state = dict([*model.named_parameters(), *model.named_buffers()])
    for name, before in fixed.items():
        assert torch.equal(state[name], before), name
    for name, before in learnable.items():
        assert not torch.equal(state[name], before), name
        if state[name].dim() == 4:
            assert state[name].is_contiguous(memory_format=torch.channels_last), name


def combined_filter_changes(model, device, precision, steps=3):
    """Train model with train.py's step (on the batches every call gets) -> how much all its
    combined filters changed, flattened."""
    optimizer = train.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    start = torch.cat([f.flatten() for f in lcconv.combined_filters(model).values()])
    generator = torch.Generator(device).manual_seed(1)
    for _ in range(steps):
        loss, _ = train.train_step(model, optimizer, *fast_path_batch(device, generator), 0.1, precision)
        assert torch.isfinite(loss), loss
    return torch.cat([f.flatten() for f in lcconv.combined_filters(model).values()]) - start


@pytest.mark.parametrize("device", DEVICES)
def test_preconditioned_form_tracks_the_frozen_block_in_bf16_and_channels_last(device):
    """From equal weights (LCConv2d.to_preconditioned) and on equal batches, frozen LC x8 and its
    preconditioned form in bf16 change their combined filters alike: they
    differ by no more than bf16 makes the block differ from its own float32 run (times 2).
    bf16 alone moves these steps by about 40% here (the plain ResNet's too: at initialisation
    the weight gradients are small sums of large terms); replacing P by its mean α·I (the
    limit form) moved them 2.3-3× that in our trials."""
    device = torch.device(device)
    torch.manual_seed(0)
    blocks = lc_resnet(expansion=8, frozen=True)
    preconditioned, float32 = copy.deepcopy(blocks), copy.deepcopy(blocks)
    for name, block in list(lcconv.spatial_layers(preconditioned)):
        parent, _, attr = name.rpartition(".")
        setattr(preconditioned.get_submodule(parent), attr, block.to_preconditioned())
    assert all(map(torch.equal, lcconv.combined_filters(blocks).values(),
                   lcconv.combined_filters(preconditioned).values()))
    reference = combined_filter_changes(train.to_device(float32, device), device, "fp32")
    block, conv = (combined_filter_changes(train.to_device(m, device), device, "bf16") for m in (blocks, preconditioned))
    bf16 = (block - reference).norm() / reference.norm()
    difference = (block - conv).norm() / conv.norm()
    assert difference < 2 * bf16, f"the forms differ by {difference:.3g}, bf16 moves the block by {bf16:.3g}"


# -----------------------------------------------------------------------------
# Results are never lost, glued or duplicated


def test_append_never_glues_onto_an_unfinished_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"seed": 0}\n{"seed": 1, "test_a')  # a crash cut the last line short
    train.append_result(path, {"seed": 2})
    train.append_result(path, {"seed": 3})
    assert [r["seed"] for r in train.read_results(path)] == [0, 2, 3]


def test_a_short_write_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    train.append_result(path, {"seed": 0})
    before = path.read_bytes()
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[:len(data) // 2]))
    with pytest.raises(OSError, match="short write"):
        train.append_result(path, {"seed": 1, "test_acc": 90.0})
    assert path.read_bytes() == before


def test_lines_that_are_not_json_objects_are_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'[1]\n"text"\nnull\n{"seed": 4}\nnot json\n\xff\xfe{"seed": 5}\n{"seed": 1' + b"0" * 5000 + b"}\n")
    assert train.read_results(path) == [{"seed": 4}]
    assert not train.has_result(train.read_results(path), train.recipe(train.parse_args([])))


def test_old_result_lines_match_with_the_new_flags_at_their_defaults():
    config = train.recipe(train.parse_args(["--precision", "fp32"]))
    old = {k: v for k, v in config.items() if k not in ("preconditioned", "lc_limit", "lc_init", "precision")}
    gpu = "NVIDIA H100 80GB HBM3"
    assert train.has_result([dict(old, device="cpu")], config)  # before --precision: fp32 on the CPU,
    assert not train.has_result([dict(old, device=gpu)], config)  # bf16 on CUDA
    assert train.has_result([dict(old, device=gpu)], dict(config, precision="bf16"))
    assert not train.has_result([dict(old, device="cpu", preconditioned=True)], config)


@pytest.mark.parametrize("cpu, precision, units", [
    (dict(cpu_name="AMD EPYC 9B14", avx512_bf16=True, amx_bf16=False), "bf16", "AVX512_BF16"),
    (dict(cpu_name="Intel Xeon", avx512_bf16=True, amx_bf16=True), "bf16", "AMX"),
    (dict(cpu_name="Intel Xeon", avx512_bf16=True, amx_bf16=False), "fp32", "AVX512_BF16"),  # measured slower
    (dict(cpu_name="AMD EPYC 7B13", avx512_bf16=False, amx_bf16=False), "fp32", None),  # bf16 emulated
    (None, "fp32", None)])  # a torch without the check
def test_precision_auto_is_bf16_only_where_it_is_faster(monkeypatch, cpu, precision, units):
    if cpu is None:
        monkeypatch.delattr(torch.cpu, "get_capabilities")
    else:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    args = train.parse_args(["--device", "cpu"])
    assert args.precision == precision and train.recipe(args)["precision"] == precision
    assert train.parse_args(["--device", "cpu", "--precision", "bf16"]).precision == "bf16"
    assert train.parse_args(["--device", "cpu", "--precision", "fp32"]).precision == "fp32"
    # the result line's hardware names the units that decided, since CPU model names can hide them
    hardware = train.hardware(torch.device("cpu"))
    assert f"({units}), " in hardware if units else not any(u in hardware for u in ("AMX", "BF16"))


def run_train(argv, **kwargs):
    return subprocess.Popen([sys.executable, "train.py", *argv], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_a_run_killed_while_saving_its_checkpoint_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    argv = tiny_args(tiny_data, tmp_path, "--epochs", "3", "--expansion", "2", "--frozen")
    train.main(argv + ["--out", str(tmp_path / "uninterrupted.jsonl")])
    checkpoint = tmp_path / "run.pt"
    # SIGKILL in the middle of writing the second epoch's checkpoint
    killer = ("import os, signal, sys, torch, train\n"
              "save, calls = torch.save, []\n"
              "def dying_save(state, path):\n"
              "    calls.append(path)\n"
              "    if len(calls) == 2:\n"
              "        open(path, 'wb').write(b'half a checkpoint')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(state, path)\n"
              "torch.save = dying_save\n"
              "train.main(sys.argv[1:])\n")
    killed = subprocess.run([sys.executable, "-c", killer, *argv, "--checkpoint", str(checkpoint)],
                            cwd=Path(__file__).parent, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1 and not results(tmp_path)
    train.main(argv + ["--checkpoint", str(checkpoint)])
    [result] = results(tmp_path)
    [uninterrupted] = results(tmp_path, "uninterrupted.jsonl")
    assert all(result[k] == uninterrupted[k] for k in METRICS)


def test_a_short_write_of_the_result_then_a_rerun_gives_exactly_one_result(tiny_data, tmp_path, monkeypatch):
    argv = tiny_args(tiny_data, tmp_path, "--checkpoint", str(tmp_path / "run.pt"))
    train.main(argv[:-2] + ["--out", str(tmp_path / "uninterrupted.jsonl")])
    write = os.write  # the result line's write() stops after 50 bytes, as on a full disk
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[:50] if b'"test_acc"' in data else data))
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    assert "short write" in str(exit.value.code)
    assert (tmp_path / "results.jsonl").read_text() == ""
    monkeypatch.setattr(os, "write", write)
    train.main(argv)
    [result] = results(tmp_path)
    [uninterrupted] = results(tmp_path, "uninterrupted.jsonl")
    assert all(result[k] == uninterrupted[k] for k in METRICS)


def test_benchmark_prints_paired_ratios_and_flags_a_noisy_row(monkeypatch, capsys):
    configs = [("ResNet-20-16", "—", 0), ("LC-x8 frozen", "preconditioned", 8), ("LC-x2 frozen", "two convs", 2)]
    monkeypatch.setattr(train, "BENCH_CONFIGS", configs)
    # per round, fp32 then bf16 of each: baseline; preconditioned (a steady 1.02x, bf16 half of fp32);
    # two convs (2x to 3x: noisy). In round 3 a neighbour slows the fp32 baseline 5x: no row is flagged for it
    times = []
    for base, two in [(100, 200), (100, 300), (500, 200), (100, 300), (100, 250)]:
        times += [base, 50.0, 102.0, 51.0, two, two / 2]
    times = iter(times)
    monkeypatch.setattr(train, "time_steps", lambda run, precision, device, seconds: next(times))
    train.benchmark(train.parse_args(["--batch-size", "4"]), torch.device("cpu"), rounds=5)
    out = capsys.readouterr().out
    rows = {tuple(line.split(" | ")[1:3]): line.split(" | ") for line in out.splitlines() if line.startswith("| LC-")}
    assert rows["preconditioned", "fp32"][4] == "1.02 [1.02–1.02]" and rows["preconditioned", "fp32"][5] == "—"
    assert rows["preconditioned", "bf16"][4] == "1.02 [1.02–1.02]" and rows["preconditioned", "bf16"][5] == "0.50 [0.50–0.50]"
    assert rows["two convs", "fp32"][4] == "2.50 [2.00–3.00] (noisy)"
    assert "Do not trust them" in out
    for row in rows.values():  # every row measured its memory in its own process
        assert float(row[6]) > 0


# -----------------------------------------------------------------------------
# experiments.sh: every group lists valid train.py commands; bad settings stop it in one line; a
# tiny sweep writes one results file per training setting, reports, skips finished runs and survives
# a failing one; the report reads every line it can of every results file, one part per setting
# and precision

GROUPS = ["table1", "expansion", "width", "depth", "kernel", "ablation", "offtheshelf", "convmixer", "init",
          "mechanism", "recipe", "length"]
HERE = Path(__file__).parent
# a clean environment: the caller's SEEDS, EPOCHS, QUICK, PYTHON, ... must not reach the sweep
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the report's plots need it; the rest does not


def experiments(*args, **env):
    """bash experiments.sh ARGS with only PATH, HOME and env in its environment."""
    return subprocess.run(["bash", "experiments.sh", *args], capture_output=True, text=True, cwd=HERE,
                          env={**CLEAN_ENV, **env})


@pytest.fixture(scope="module")
def sweep():
    """experiments.sh loaded as a module (bash only hands it to Python), to call main() in-process."""
    loader = importlib.machinery.SourceFileLoader("experiments", str(HERE / "experiments.sh"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def listed(sweep, capsys, *groups, **env):
    """The lines of `experiments.sh --list GROUPS` in a clean environment, in-process (no torch start-up)."""
    assert sweep.main(["--list", *groups], {**CLEAN_ENV, **env}) == 0
    return capsys.readouterr().out.splitlines()


def made_up(command, test_acc, **extra):
    """A result line for a listed train.py command, shaped like train.py's, with made-up metrics; -> (its --out, it)."""
    args = train.parse_args(shlex.split(command)[2:])
    k = args.kernel_size or 3
    line = dict(vars(args), test_acc=test_acc, train_acc=90.0, fgsm_acc=test_acc - 10, pgd_acc=None, fve_first=1.0,
                fve_last=0.9, params_learnable=1000, params_total=2000, device="cpu", precision="fp32",
                spatial_variance=[[1.0 + (y == x == k // 2) for x in range(k)] for y in range(k)],
                basis=[dict(rank=1.0, alpha=4.7, spread=2.0, spread_mp=2.1), dict(rank=0.5, alpha=25.0, spread=3.0,
                                                                                  spread_mp=1.5)] if args.frozen else None)
    return args.out, dict(line, **extra)


def write_lines(lines):
    """Appends each (path, line) to its file, as the runs would."""
    for path, line in lines:
        with open(path, "a") as f:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def tables(report):
    """{(part heading, table title): {row label: {column header: cell}}} of a REPORT.md; a repeated header (the
    paper's column beside each of ours) gets its place added: "paper", "paper 2", ..."""
    found, part, title, header = {}, None, None, None
    for line in report.splitlines():
        if line.startswith("# "):
            part = line[2:]
        elif line.startswith("## "):
            title, header = line[3:], None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = [h if cells[:i].count(h) == 0 else f"{h} {cells[:i].count(h) + 1}" for i, h in enumerate(cells)]
                found[part, title] = {}
            else:
                found[part, title][cells[0]] = dict(zip(header, cells))
    return found


def table(report, title, part=""):
    """The rows of the first table whose title starts with title, in the first part whose heading has part."""
    matches = [rows for (p, t), rows in tables(report).items() if t.startswith(title) and part in p]
    assert matches, f"no table {title!r} in a part with {part!r}"
    return matches[0]


def summary(values):
    """The cell the report writes for these values."""
    if len(values) == 1:
        return f"{values[0]:.2f} (1)"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f} ({len(values)})"


# -----------------------------------------------------------------------------
# --list and the settings


@pytest.mark.parametrize("group", GROUPS)
def test_list_prints_valid_train_commands_for_every_group(sweep, capsys, group, monkeypatch):
    monkeypatch.setenv("EPOCHS", "3")  # the caller's settings do not leak in
    commands = listed(sweep, capsys, group)
    assert len(commands) >= 8 and len(set(commands)) == len(commands)
    configs = set()
    for command in commands:
        program, script, *argv = command.split()
        assert (program, script) == ("python", "train.py")
        args = train.parse_args(argv)  # exits on any flag train.py would reject
        assert args.skip_finished and args.checkpoint and args.seed in (0, 1, 2, 3)
        assert args.epochs == 75 or (group in ("length", "recipe") and args.epochs in (5, 15))  # their schedules
        assert args.out == f"results/{args.dataset}-{args.epochs}ep.jsonl"  # one results file per setting
        configs.add(json.dumps(train.recipe(args), sort_keys=True))
    assert len(configs) == len(commands)  # no run listed twice


def test_list_default_quick_recipe_and_names(sweep, capsys):
    everything = experiments("--list", EPOCHS="")  # via bash, as users run it; empty is unset, as ${EPOCHS:-75} is
    assert everything.returncode == 0, everything.stderr
    def configs(commands):  # the flags of each command, paths aside, as argparse reads them
        return [json.dumps({k: v for k, v in vars(train.PARSER.parse_args(shlex.split(c)[2:])).items()
                            if k not in ("out", "checkpoint", "save_figures")}) for c in commands]
    assert len(set(configs(everything.stdout.splitlines()))) == len(everything.stdout.splitlines())  # each config once
    assert set(configs(everything.stdout.splitlines())) == set(configs(sum((listed(sweep, capsys, g) for g in GROUPS), [])))
    # names as the bash version made them (md5sum of the recipe's text), so checkpoints and logs carry over
    assert "results/checkpoints/dataset_cifar10_expansion_128_frozen_seed_3-9d7fec4b.pt" in everything.stdout
    quick = listed(sweep, capsys, QUICK="1")
    assert quick == list(dict.fromkeys(sum((listed(sweep, capsys, g, QUICK="1")  # shared configs are written alike
                                            for g in ["table1", "expansion", "mechanism"]), [])))
    assert all("--dataset fashionmnist" in c and "--seed 0 --epochs 5 --train-subset 5000" in c
               and "--out results-quick/fashionmnist-5ep-5000.jsonl" in c for c in quick)

    # QUICK length: exactly the 100-step comparison, once per seed
    length = [train.parse_args(c.split()[2:]) for c in listed(sweep, capsys, "length", QUICK="1", SEEDS="0 1 2")]
    assert len(length) == 12 and {(a.epochs, a.train_subset) for a in length} == {(5, 5000)}
    assert {(a.expansion, a.frozen, a.preconditioned, a.lc_init) for a in length} == {
        (0, False, False, None), (128, True, False, None), (128, True, True, None), (0, False, False, 128)}

    # recipe: its own schedules on all images, whatever EPOCHS and TRAIN_SUBSET say; DATASETS still filters
    recipe = [train.parse_args(c.split()[2:])
              for c in listed(sweep, capsys, "recipe", SEEDS="0", EPOCHS="3", TRAIN_SUBSET="5000")]
    assert [(a.epochs, a.expansion, a.frozen, a.lc_init) for a in recipe] == [
        (75, 0, False, None), (75, 128, True, None), (75, 128, False, None), (75, 0, False, 128),
        (5, 0, False, None), (5, 128, True, None), (5, 128, False, None), (5, 0, False, 128),
        (15, 0, False, None), (15, 128, True, None), (15, 128, False, None), (15, 0, False, 128)]
    assert all(a.dataset == "fashionmnist" and a.train_subset is None for a in recipe)
    assert [a.out for a in recipe[3:5]] == ["results/fashionmnist-75ep.jsonl", "results/fashionmnist-5ep.jsonl"]
    assert listed(sweep, capsys, "recipe", DATASETS="cifar10") == []

    bad = experiments("--list", "kernels")
    assert bad.returncode == 2 and "'kernels'" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("setting, value, message", [
    ("RESULTS", "A_FILE", "RESULTS="), ("DATASETS", "cifar", "DATASETS"), ("TRAIN_ARGS", "--bogus", "--bogus"),
    ("TRAIN_ARGS", "'unclosed", "TRAIN_ARGS="), ("SEEDS", "x", "--seed"), ("EPOCHS", "0", "--epochs")])
def test_bad_setting_is_one_line_before_any_work(sweep, capsys, tmp_path, setting, value, message):
    (tmp_path / "A_FILE").write_text("not a folder")
    env = dict(CLEAN_ENV, RESULTS=str(tmp_path / "results"))
    env[setting] = str(tmp_path / value) if value == "A_FILE" else value
    with pytest.raises(SystemExit) as stop:
        sweep.main(["ablation"], env)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "results").exists() and "[1/" not in out


def test_without_torch_help_works_and_the_rest_says_what_to_install(tmp_path):
    venv.create(tmp_path / "venv", with_pip=False)  # a Python without the site-packages that hold torch
    python = str(tmp_path / "venv" / "bin" / "python")
    usage = experiments("--help", PYTHON=python)
    assert usage.returncode == 0 and "QUICK=1" in usage.stdout and "recipe" in usage.stdout, usage.stderr
    for args in (["--list"], ["report"], ["table1"], []):  # [] = the whole sweep
        run = experiments(*args, PYTHON=python, RESULTS=str(tmp_path / "results"))
        assert run.returncode != 0 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert python in run.stderr and "'torch'" in run.stderr and "pip install -r requirements.txt" in run.stderr
        assert not run.stdout
    assert not (tmp_path / "results").exists()


# -----------------------------------------------------------------------------
# Sweeps: tiny runs on the stand-in data


def test_tiny_sweep_reports_skips_finished_runs_and_survives_a_failure(sweep, capsys, tiny_data, tmp_path,
                                                                       monkeypatch):
    results = tmp_path / "results"
    env = dict(CLEAN_ENV, DATASETS="fashionmnist", SEEDS="0", EPOCHS="1", TRAIN_SUBSET="256", DATA_DIR=str(tiny_data),
               RESULTS=str(results), PYTHON=sys.executable)
    commands = listed(sweep, capsys, "table1", **env)
    assert len(commands) == 3
    broken = Path(commands[1].split("--checkpoint ")[1].split()[0])  # a corrupt checkpoint fails this run
    broken.parent.mkdir(parents=True)
    broken.write_text("garbage")

    monkeypatch.chdir(HERE)
    assert sweep.main(["table1"], env) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and out.count("done:") == 2 and "1 run(s) failed" in err
    out_file = results / "fashionmnist-1ep-256.jsonl"
    assert [p.name for p in results.glob("*.jsonl")] == [out_file.name]  # one file per training setting
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 2  # the other two ran
    baseline = next(r for r in lines if r["expansion"] == 0)
    row = table((results / "REPORT.md").read_text(), "Table 1:")["fashionmnist"]
    assert row["baseline"] == f"{baseline['test_acc']:.2f} (1)" and row["paper"] == "93.65 ± 0.18"

    broken.unlink()
    assert sweep.main(["table1"], env) == 0
    assert "[1/1]" in capsys.readouterr().out  # the failed one again
    assert sweep.main(["table1"], env) == 0
    assert "[1/" not in capsys.readouterr().out  # nothing new
    assert len(out_file.read_text().splitlines()) == 3
    report = (results / "REPORT.md").read_text()
    assert "3 finished runs in 1 results file(s)" in report and "(plots/filters_fashionmnist.png)" in report
    grid = train.filter_grid(torch.zeros(16, 1, 3, 3))  # ResNet-20-16's first layer: 16 filters
    image = PIL.Image.open(results / "plots" / "filters_fashionmnist.png")
    assert image.size == (2 * grid.shape[2] + 24, grid.shape[1])  # two grids and a white gap


def test_two_sweeps_and_four_runs_on_one_results_folder_run_each_config_once(tiny_data, tmp_path):
    """Load: 2 sweeps and 4 train.py commands (two of them the same) on one RESULTS at once."""
    env = dict(CLEAN_ENV, DATASETS="fashionmnist", SEEDS="0", EPOCHS="1", DATA_DIR=str(tiny_data),
               RESULTS=str(tmp_path), TRAIN_ARGS="--train-subset 64 --depth 8 --width 4 --batch-size 64",
               PYTHON=sys.executable)
    commands = experiments("--list", "table1", **env).stdout.splitlines()
    assert len(commands) == 3
    start = lambda argv: subprocess.Popen(argv, cwd=HERE, env=env, text=True, stdout=subprocess.PIPE,  # noqa: E731
                                          stderr=subprocess.STDOUT)
    everything = [start(["bash", "experiments.sh", "table1"]) for _ in range(2)]
    everything += [start(shlex.split(commands[i])) for i in (0, 0, 1, 2)]
    outputs = [p.communicate()[0] for p in everything]
    assert [p.returncode for p in everything] == [0] * 6, outputs  # a run that finds its result waited for counts as done
    lines = (tmp_path / "fashionmnist-1ep-64.jsonl").read_text().splitlines()  # --train-subset from TRAIN_ARGS
    results = [json.loads(line) for line in lines]  # every line whole
    assert len(results) == 3 and len({json.dumps(train.recipe(r), sort_keys=True) for r in results}) == 3
    assert "3 finished runs in 1 results file(s)" in (tmp_path / "REPORT.md").read_text()  # (no table: --width 4)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_a_failing_report_in_a_sweep_is_one_line_and_the_later_groups_still_run(sweep, capsys, tmp_path,
                                                                                monkeypatch):
    ran = []
    monkeypatch.setattr(sweep, "run_one", lambda run, s: ran.append(run.group) or True)  # trains nothing

    def broken(folder):
        raise KeyError("spatial_variance")

    monkeypatch.setattr(sweep, "write_report", broken)
    assert sweep.main(["table1", "expansion"], dict(CLEAN_ENV, QUICK="1", RESULTS=str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert set(ran) == {"table1", "expansion"}
    assert err.count("\n") == 2 and err.count("the report failed") == 2 and "KeyError" in err, err


# -----------------------------------------------------------------------------
# The report, from made-up result lines


def test_report_has_every_table_with_the_numbers_of_its_runs(sweep, capsys, tmp_path):
    """Made-up results of every group, two seeds, each line written twice, some without the newer keys: every table
    shows, and its cells are the mean ± std of exactly its runs."""
    env = dict(SEEDS="0 1", RESULTS=str(tmp_path))
    lines = []
    for command in listed(sweep, capsys, **env):
        path, r = made_up(command, 80.0 + int(command.split("--seed ")[1].split()[0]) + 2 * ("--frozen" in command))
        if not r["preconditioned"] and not r["lc_limit"]:  # a line from before these keys
            del r["preconditioned"], r["lc_limit"], r["precision"]
        lines += [(path, r)] * 2
    write_lines(lines)
    assert sweep.main(["report"], {**CLEAN_ENV, **env}) == 0
    report = (tmp_path / "REPORT.md").read_text()
    for title in ["Table 1:", "Fig. 4 and 5", "Fig. 6a", "Fig. 6b", "Fig. 8a", "Beyond the paper: kernel",
                  "Table 3", "Fig. 1", "Beyond the paper: ConvMixer", "Beyond the paper: a centre-weighted init for "
                  "ResNet", "Beyond the paper: a centre-weighted init for ConvMixer", "Why it works: frozen LC xE",
                  "The random basis", "The length axis on cifar10: frozen LC x128", "Table 1, Fashion-MNIST",
                  "The length axis on fashionmnist"]:
        assert table(report, title), title
    learnable, frozen = summary([80.0, 81.0]), summary([82.0, 83.0])  # "80.50 ± 0.71 (2)": each run once
    part = "75 epoch(s) on the full training set"
    assert table(report, "Table 1:", part)["cifar10"] == {"dataset": "cifar10", "baseline": learnable,
                                                          "paper": "91.60 ± 0.23", "LC learnable": learnable,
                                                          "paper 2": "91.39 ± 0.29", "LC frozen": frozen,
                                                          "paper 3": "91.89 ± 0.10"}
    fig4 = table(report, "Fig. 4 and 5", part)
    assert fig4["512"]["test acc, frozen"] == frozen and fig4["0"]["test acc, learnable"] == learnable
    assert fig4["512"]["FGSM, frozen"] == summary([72.0, 73.0]) and fig4["2"]["params, learnable"] == "1,000 ± 0 (2)"
    table3 = table(report, "Table 3", part)["bn_relu"]  # learnable, then frozen, each with the paper's beside
    assert (table3["learnable"], table3["paper"], table3["frozen"], table3["paper 2"]) == (
        learnable, "94.72 ± 0.16", frozen, "93.26 ± 0.18")
    assert table(report, "Fig. 1", part)["mobilenet_v2"]["drop"] == "-2.00 (2)"
    mechanism = table(report, "Why it works: frozen LC xE", part)
    assert mechanism["32768"]["limit"] == learnable and mechanism["8192"]["preconditioned"] == frozen
    basis = table(report, "The random basis", part)["128"]  # pooled: folded and preconditioned, two seeds each
    assert basis["rank/d, smallest"] == "0.50 ± 0.00 (4)" and basis["α, largest"] == "25.00 ± 0.00 (4)"
    init = table(report, "Beyond the paper: a centre-weighted init for ResNet", part)
    assert init["learned, no LC"]["centre/ring, kaiming_uniform"] == "2.00 ± 0.00 (2)"  # the centre over the ring
    assert init["frozen LC x512"]["its limit, center"] == learnable and init["frozen LC x8"]["test acc, center"] == frozen
    length = table(report, "The length axis on cifar10: frozen LC x2048", "across training lengths")
    assert [row["SGD steps"] for row in length.values()] == ["980", "2,940", "14,700"]  # 5, 15, 75 epochs
    assert all(row["gain, frozen LC x2048"] == "+2.00 (2)" for row in length.values())
    for (_, title), rows in tables(report).items():  # each run once (the basis pools two forms of two seeds)
        assert title.startswith("The random basis") or not any(c.endswith("(4)") for r in rows.values() for c in r.values())
    assert (tmp_path / "plots" / "expansion_cifar10.png").exists() == HAS_MATPLOTLIB
    assert ("(plots/expansion_cifar10.png)" in report) == HAS_MATPLOTLIB


def test_report_skips_and_counts_the_lines_it_cannot_use_in_any_file(sweep, capsys, tmp_path):
    env = dict(QUICK="1", RESULTS=str(tmp_path))
    good = [made_up(c, 80.0) for c in listed(sweep, capsys, "table1", **env)]
    path, baseline = good[0]
    odd = [dict(baseline, test_acc="81.5"), dict(baseline, expansion="4"), dict(baseline, test_acc=math.nan), {},
           dict(baseline, frozen=None), "not json", "", "[1]", '{"test_acc": 1' + "0" * 5000 + "}",
           dict(baseline, dataset="imagenet"), dict(baseline, batch_size=0)]
    malformed = dict(good[2][1], fgsm_acc="x", spatial_variance=[[1.0, 2.0], [3.0]], basis="x", first_filters=[[1]])
    write_lines([(path, line) for line in odd] + good[:2] + [(path, malformed)])
    cifar = listed(sweep, capsys, "table1", DATASETS="cifar10", SEEDS="0", RESULTS=str(tmp_path))[0]
    write_lines([(tmp_path / "cifar10-75ep.jsonl", "{"),  # another file, its own odd line, and an alpha below 0
                 made_up(cifar, 70.0, first_filters=[[[[1.0]]]], basis=[dict(alpha=-1.0)])])
    assert sweep.main(["report"], {**CLEAN_ENV, **env}) == 0
    assert "11 line(s) of the results files not used" in capsys.readouterr().out
    report = (tmp_path / "REPORT.md").read_text()
    for reason in ["11 line(s) not used: cifar10-75ep.jsonl line 1: not a JSON object",
                   "fashionmnist-5ep-5000.jsonl line 1: test_acc is '81.5', not a finite number",
                   "fashionmnist-5ep-5000.jsonl line 2: expansion is '4', not int",
                   "fashionmnist-5ep-5000.jsonl line 3: test_acc is nan, not a finite number",
                   "fashionmnist-5ep-5000.jsonl line 4: no test_acc", "line 5: frozen is None, not bool",
                   "line 6: not a JSON object", "line 8: not a JSON object", "line 9: not a JSON object",
                   "line 10: dataset is 'imagenet', not a value train.py takes", "; and 1 more."]:  # 10 named
        assert reason in report, reason
    assert "4 finished runs in 2 results file(s) (cifar10-75ep.jsonl, fashionmnist-5ep-5000.jsonl)" in report
    quick = table(report, "Table 1:", "5 epoch(s) on the first 5,000 training images")
    assert quick["fashionmnist"]["baseline"] == "80.00 (1)" and quick["fashionmnist"]["LC frozen"] == "80.00 (1)"
    assert table(report, "Table 1:", "75 epoch(s)")["cifar10"]["baseline"] == "70.00 (1)"
    assert not (tmp_path / "plots" / "filters_fashionmnist.png").exists()  # a malformed first_filters draws nothing


def test_lines_without_precision_read_as_their_device_did_and_precisions_stay_apart(sweep, capsys, tmp_path):
    env = dict(QUICK="1", SEEDS="0 1", RESULTS=str(tmp_path))
    baselines = listed(sweep, capsys, "table1", **env)[:2]  # seed 0 and 1 of the baseline
    lines = []
    for command, fp32, bf16 in zip(baselines, (80.0, 81.0), (70.0, 72.0)):
        path, r = made_up(command, fp32)
        lines += [(path, {k: v for k, v in r.items() if k != "precision"}),  # from before --precision, on the CPU
                  (path, dict(r, precision="bf16", test_acc=bf16, device="NVIDIA H100"))]
    lines[3][1].pop("precision")  # seed 1 on the GPU, from before --precision: bf16 too
    write_lines(lines)
    assert sweep.main(["report"], {**CLEAN_ENV, **env}) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert table(report, "Table 1:", "images, batch 256, lr 0.01, weight decay 0.01, fp32")["fashionmnist"][
        "baseline"] == summary([80.0, 81.0])
    assert table(report, "Table 1:", "weight decay 0.01, bf16")["fashionmnist"]["baseline"] == summary([70.0, 72.0])


@pytest.mark.parametrize("flag, other", [(dict(type=float, default=0.0), 1.0), (dict(type=int, metavar="E"), 64)])
def test_runs_with_a_flag_added_to_train_py_stay_out_of_the_existing_tables(sweep, capsys, tmp_path, monkeypatch,
                                                                             flag, other):
    """A train.py flag that experiments.sh never heard of (added here, as one is added later), and runs with another
    value of it: Table 1 and Fig. 4 show only the runs at its default."""
    parser = copy.deepcopy(train.PARSER)
    parser.add_argument("--flag-from-later", **flag)
    monkeypatch.setattr(train, "PARSER", parser)
    monkeypatch.setattr(train, "CONFIG_KEYS", train.CONFIG_KEYS + ["flag_from_later"])
    env = dict(SEEDS="0", DATASETS="cifar10", RESULTS=str(tmp_path))
    good = [made_up(c, 80.0) for c in listed(sweep, capsys, "table1", "expansion", **env)]
    for _, r in good[::2]:  # half of them from before the flag
        del r["flag_from_later"]
    write_lines(good + [(path, dict(r, flag_from_later=other, test_acc=20.0)) for path, r in good])
    assert sweep.main(["report"], {**CLEAN_ENV, **env}) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert f"{2 * len(good)} finished runs" in report
    assert table(report, "Table 1:")["cifar10"]["baseline"] == "80.00 (1)"
    assert table(report, "Fig. 4 and 5")["64"]["test acc, learnable"] == "80.00 (1)"
    assert "(2)" not in report and "20.00" not in report and "50.00" not in report


def test_report_of_committed_recipe_results_has_its_tables_and_filters(sweep, capsys, tmp_path):
    """Lines shaped like the committed results of `SEEDS=0 (then 1) bash experiments.sh recipe`, the older ones
    without precision, hardware, code and first_filters: the recipe's Table 1 and length axis, and the filters."""
    env = dict(SEEDS="0 1", RESULTS=str(tmp_path))
    accuracy = {(75, "baseline"): (93.1, 93.5), (75, "frozen"): (93.6, 93.8), (75, "learnable"): (93.0,),
                (75, "init"): (93.9,), (5, "baseline"): (91.8,), (5, "frozen"): (92.3,), (5, "init"): (92.7,)}
    lines, rms = [], {}
    for command in listed(sweep, capsys, "recipe", **env):
        args = train.parse_args(command.split()[2:])
        kind = "init" if args.lc_init else "frozen" if args.frozen else "learnable" if args.expansion else "baseline"
        if args.seed >= len(accuracy.get((args.epochs, kind), ())):
            continue  # not run (yet)
        path, r = made_up(command, accuracy[args.epochs, kind][args.seed])
        if args.seed == 0 and kind in ("baseline", "frozen"):  # written before train.py recorded these
            r.pop("precision")
        else:
            filters = torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(len(lines))).double()
            r.update(hardware="AMD EPYC, 2 threads", code="0123456789", first_filters=filters.tolist())
            rms[args.epochs, kind] = filters.square().mean().sqrt().item()
        lines.append((path, r))
    write_lines(lines)
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["fashionmnist-5ep.jsonl", "fashionmnist-75ep.jsonl"]
    assert sweep.main(["report"], {**CLEAN_ENV, **env}) == 0
    report = (tmp_path / "REPORT.md").read_text()
    recipe = table(report, "Table 1, Fashion-MNIST, at the paper's recipe", "fp32")
    assert {label: (row["ours"], row["paper"]) for label, row in recipe.items()} == {
        "baseline": (summary([93.1, 93.5]), "93.65 ± 0.18"), "LC learnable x128": ("93.00 (1)", "93.44 ± 0.18"),
        "LC frozen x128": (summary([93.6, 93.8]), "93.65 ± 0.06"), "--lc-init 128": ("93.90 (1)", "—")}
    assert recipe["baseline"]["SGD steps"] == "17,625"
    length = table(report, "The length axis on fashionmnist", "fp32")
    assert list(length) == ["5 epochs", "75 epochs"]  # no 15-epoch runs yet, no QUICK ones here
    assert length["5 epochs"]["SGD steps"] == "1,175" and length["5 epochs"]["gain, frozen LC x128"] == "+0.50 (1)"
    assert length["5 epochs"]["gain, --lc-init 128"] == "+0.90 (1)"
    assert length["75 epochs"]["gain, frozen LC x128"] == "+0.40 (2)"
    assert length["75 epochs"]["FGSM frozen LC x128"] == summary([83.6, 83.8])
    # a gain pairs runs by seed: seed 0's learnable and --lc-init runs against seed 0's baseline (93.1), not the mean
    assert length["75 epochs"]["gain, learnable LC x128"] == "-0.10 (1)"
    assert length["75 epochs"]["gain, --lc-init 128"] == "+0.80 (1)"
    forgotten = table(report, "Is the init forgotten?", "fp32")  # the first layer's filter RMS; frozen LC's over
    assert forgotten["75 epochs"] == {"schedule": "75 epochs", "SGD steps": "17,625",  # sqrt(its first layer's alpha)
                                      "baseline": f"{rms[75, 'baseline']:.3f} (1)",
                                      "--lc-init 128": f"{rms[75, 'init']:.3f} (1)",
                                      "frozen LC x128 / sqrt(alpha)": f"{rms[75, 'frozen'] / math.sqrt(4.7):.3f} (1)"}
    grid = train.filter_grid(torch.zeros(16, 1, 3, 3))
    image = PIL.Image.open(tmp_path / "plots" / "filters_fashionmnist.png")
    assert image.size == (2 * grid.shape[2] + 24, grid.shape[1]) and image.mode == "RGB"
    assert "seed 1, 75 epoch(s) on the full training set" in report  # the paper's recipe, the seed that has filters
    assert (tmp_path / "plots" / "length_fashionmnist.png").exists() == HAS_MATPLOTLIB
    assert not list(tmp_path.glob("**/*.tmp"))
