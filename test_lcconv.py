"""Tests for lcconv.py (the layer, models, analysis) and train.py / experiments.sh (CPU only)."""
import collections
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
# LCConv2d: the folded conv computes the paper's two-conv block


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("in_channels, out_channels, groups", [(4, 6, 1), (6, 4, 2), (8, 8, 8)])
@pytest.mark.parametrize("expansion", [1, 3])
def test_folded_block_equals_the_two_convs_and_to_conv2d(kernel_size, stride, in_channels, out_channels,
                                                         groups, expansion):
    torch.manual_seed(0)
    block = LCConv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=True, expansion=expansion)
    x = torch.randn(2, in_channels, 11, 11)
    folded, conv = block(x), block.to_conv2d()
    maps = F.conv2d(x, block.spatial.weight, None, stride, kernel_size // 2, 1, groups)  # the paper's block
    assert_close(folded, F.conv2d(maps, block.combine.weight, block.combine.bias, groups=groups))
    assert_close(folded, conv(x))
    assert type(conv) is nn.Conv2d and conv.groups == groups  # (8, 8, 8): a depthwise conv
    shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
    assert conv.weight.shape == block.combined_weight.shape == shape
    assert folded.shape == (2, out_channels, math.ceil(11 / stride), math.ceil(11 / stride))


@pytest.mark.parametrize("intermediate", ["relu", "bn", "bn_relu"])
def test_intermediate_op_sits_between_the_two_convs(intermediate):
    torch.manual_seed(0)
    block = LCConv2d(4, 4, 3, expansion=2, intermediate=intermediate)
    x = torch.randn(8, 4, 6, 6)
    maps = F.conv2d(x, block.spatial.weight, padding=1)
    if "bn" in intermediate:  # training mode: normalised with the batch's statistics
        maps = F.batch_norm(maps, None, None, training=True, eps=1e-5)
    if "relu" in intermediate:
        maps = maps.relu()
    assert_close(block(x), F.conv2d(maps, block.combine.weight))
    with pytest.raises(RuntimeError, match="not linear"):
        block.to_conv2d()


# -----------------------------------------------------------------------------
# convert and fold, in any model (the paper's Fig. 1): convert replaces plain nn.Conv2d only


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (BiT's StdConv2d)."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return self._conv_forward(x, weight.reshape_as(self.weight), self.bias)


class InitOnlyConv2d(nn.Conv2d):
    """Changes __init__ only (a default padding): computes as nn.Conv2d."""

    def __init__(self, in_channels, out_channels, kernel_size=3):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def small_model(conv):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("build", [
    lambda: lc_resnet(expansion=4, frozen=True), lambda: lc_resnet(kernel_size=5, expansion=2),
    lambda: lc_convmixer(expansion=3, frozen=True), lambda: lc_resnet(expansion=4, frozen=True, form="preconditioned"),
    lambda: lc_resnet(expansion=2, intermediate="bn"),
    lambda: lcconv.convert(small_model(InitOnlyConv2d(4, 4)), expansion=0),  # a subclass that only changes init
    lambda: lcconv.convert(small_model(InitOnlyConv2d(4, 4)), expansion=4)])  # converts and folds
def test_fold_replaces_linear_blocks_by_convs_with_equal_outputs(build):
    torch.manual_seed(0)
    model = build().eval()
    for m in model.modules():  # BN statistics away from the identity, so they matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    nonlinear = [n for n, m in lcconv.spatial_layers(model) if isinstance(m, LCConv2d) and not m.linear]
    assert lcconv.fold(model) is model
    assert_close(model(x), before)
    for name, layer in lcconv.spatial_layers(model):  # a block with an intermediate op stays
        assert type(layer) is (LCConv2d if name in nonlinear else nn.Conv2d), name
    assert lcconv.count_parameters(model)[1] <= lcconv.count_parameters(build())[1]


def test_convert_and_fold_keep_a_shared_conv_shared_and_return_a_block_that_is_the_model():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = lcconv.convert(nn.Sequential(nn.Sequential(shared), nn.Sequential(shared)), expansion=2)
    assert isinstance(model[0][0], LCConv2d) and model[0][0] is model[1][0]
    lcconv.fold(model)
    assert type(model[0][0]) is nn.Conv2d and model[0][0] is model[1][0]
    block = lcconv.convert(nn.Conv2d(3, 4, 3, padding=1), expansion=2)
    assert isinstance(block, LCConv2d) and type(lcconv.fold(block)) is nn.Conv2d


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("expansion", [0, 2])
def test_convert_torchvision_models(arch, expansion):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    before = dict(lcconv.spatial_layers(model))
    pointwise = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
                 and m.kernel_size == (1, 1)}
    lcconv.convert(model, expansion=expansion, frozen=True)
    after = dict(lcconv.spatial_layers(model))
    assert list(after) == list(before)
    for name, old in before.items():
        new = after[name]
        assert type(new) is (LCConv2d if expansion else nn.Conv2d) and new is not old
        for attr in ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"]:
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
        weight = new.spatial.weight if expansion else new.weight
        assert not weight.requires_grad and weight.abs().max() <= 1 / math.sqrt(weight[0].numel())  # fresh init
    for name, weight in pointwise.items():  # 1×1 convs are kept, learnable
        assert model.get_submodule(name).weight is weight and weight.requires_grad
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    learnable, total = lcconv.count_parameters(model)
    assert total - learnable == sum((m.spatial.weight if expansion else m.weight).numel() for m in after.values())


@pytest.mark.parametrize("expansion", [0, 4])
@pytest.mark.parametrize("cls, padding_mode, message", [
    (StdConv2d, "zeros", "3.0 is a StdConv2d, an nn.Conv2d subclass with its own forward"),
    (nn.Conv2d, "reflect", "only numeric zero padding is supported; 3.0 has")])
def test_a_subclass_with_its_own_forward_or_bad_padding_is_refused_before_anything_is_replaced(
        cls, padding_mode, message, expansion):
    model = small_model(cls(4, 4, 3, padding=1, padding_mode=padding_mode))
    state, types = copy.deepcopy(model.state_dict()), [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(ValueError) as refused:
        lcconv.convert(model, expansion=expansion)
    assert message in str(refused.value) and "\n" not in str(refused.value)  # in one line
    assert [(name, type(m)) for name, m in model.named_modules()] == types  # the first conv too
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


MODES = {"learnable": dict(), "frozen": dict(frozen=True), "lc": dict(expansion=2),
         "lc_frozen": dict(expansion=2, frozen=True), "lc_bn_relu": dict(expansion=2, intermediate="bn_relu"),
         "center": dict(expansion=2, frozen=True, init="center"),
         "preconditioned": dict(expansion=2, frozen=True, form="preconditioned"),
         "limit": dict(expansion=2, frozen=True, init="center", form="limit")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("arch", ["resnet", "convmixer"])
def test_every_model_mode_and_kernel_size_runs_and_its_state_dict_round_trips(arch, kernel_size, mode):
    build, settings = (lc_resnet if arch == "resnet" else lc_convmixer), MODES[mode]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build(kernel_size=kernel_size, num_classes=7, in_channels=1, **settings))
    model, x = models[0], torch.randn(2, 1, 16, 16)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    form = settings.get("form", "block")
    frozen = settings.get("frozen", False) and form == "block"  # the other forms train K, as one conv
    expected = (LCConv2d if form == "block" else PreconditionedConv2d) if "expansion" in settings else nn.Conv2d
    for name, layer in lcconv.spatial_layers(model):
        weight = layer.spatial.weight if isinstance(layer, LCConv2d) else layer.weight
        assert type(layer) is expected and (weight.grad is None) == frozen, name
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    models[1].load_state_dict(torch.load(buffer))  # BN statistics and P included
    assert torch.equal(model.eval()(x), models[1].eval()(x))


def test_jit_script_compiles_every_model():
    for model in [lcconv.resnet(8, 4), lcconv.convmixer(8, 2), lc_resnet(expansion=2, frozen=True),
                  lc_convmixer(expansion=2, frozen=True)]:
        x = torch.randn(2, 3, 16, 16)
        assert_close(torch.jit.script(model.eval())(x), model(x))


# -----------------------------------------------------------------------------
# Frozen means frozen: no gradient, so weight decay and momentum leave the filters alone


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("expansion", [0, 4])
def test_frozen_filters_are_bit_identical_after_training_steps_and_learnable_ones_change(expansion, frozen):
    torch.manual_seed(0)
    model = lc_resnet(expansion=expansion, frozen=frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # all parameters on purpose, frozen ones included: they get no gradient, so SGD skips them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    spatial = [name + (".spatial.weight" if expansion else ".weight") for name, _ in lcconv.spatial_layers(model)]
    assert len(spatial) == 7 and all(m.frozen == frozen for m in model.modules() if isinstance(m, LCConv2d))
    for k, v in model.state_dict().items():  # all else (1×1 weights, BN, fc) changes
        assert torch.equal(before[k], v) == (frozen and k in spatial), k


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
# Parameter counts (the paper's 272,474 and closed forms) and random filter inits


def resnet_parameters(depth, width, kernel_size, expansion, num_classes=10, in_channels=3):
    """(learnable, total) of ResNet(-LC)-{depth}-{width}(x{expansion}), frozen spatial convs, counted by hand."""
    convs, other, c = [(in_channels, width)], 2 * width, width  # (c_in, c_out) of the spatial convs; stem BN
    for stage in range(3):
        for _ in range((depth - 2) // 6):
            c_out = width * 2**stage
            convs += [(c, c_out), (c_out, c_out)]
            other += 4 * c_out + (c * c_out + 2 * c_out if c != c_out else 0)  # 2 BNs; 1×1 shortcut, BN
            c = c_out
    other += c * num_classes + num_classes
    k2 = kernel_size**2
    if expansion == 0:
        return other, other + sum(i * o * k2 for i, o in convs)
    return (other + sum(o * o * expansion for i, o in convs),
            other + sum(o * o * expansion + o * expansion * i * k2 for i, o in convs))


@pytest.mark.parametrize("depth, width, kernel_size, expansion", [
    (20, 16, 3, 0), (20, 16, 3, 1), (20, 16, 3, 128), (8, 8, 5, 4), (14, 32, 9, 2), (260, 4, 3, 0)])
def test_parameter_counts_are_the_papers_and_match_closed_form(depth, width, kernel_size, expansion):
    model = lc_resnet(depth, width, kernel_size, expansion=expansion, frozen=True)
    assert lcconv.count_parameters(model) == resnet_parameters(depth, width, kernel_size, expansion)
    if (depth, width, kernel_size, expansion) == (20, 16, 3, 0):  # the paper's ResNet-20-16
        assert lcconv.count_parameters(lcconv.resnet()) == (272_474, 272_474)


def test_convmixer_parameter_count():
    dim, depth, k, p, e = 32, 3, 5, 2, 4
    model = lc_convmixer(dim, depth, k, expansion=e, frozen=True, patch_size=p, num_classes=10)
    stem = dim * e * 3 * p * p, dim * e * dim + dim  # (frozen, learnable): spatial; 1×1 + bias
    depthwise = dim * e * k * k, dim * e + dim  # grouped 1×1: each channel combines its own E maps
    other = 2 * dim + depth * (2 * dim + dim * dim + dim + 2 * dim) + dim * 10 + 10
    learnable = stem[1] + depth * depthwise[1] + other
    assert lcconv.count_parameters(model) == (learnable, learnable + stem[0] + depth * depthwise[0])


@pytest.mark.parametrize("init", lcconv.INITS)
@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_inits_keep_pytorchs_std_and_center_puts_variance_in_the_centre(init, kernel_size):
    torch.manual_seed(0)
    w, fan_in = LCConv2d(128, 32, kernel_size, expansion=4, init=init).spatial.weight, 128 * kernel_size**2
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.03)
    assert w.mean().abs() < 0.05 * w.std()
    if init == "kaiming_uniform":  # PyTorch's default, U(±1/√fan_in)
        assert 0.99 / math.sqrt(fan_in) < w.abs().max() <= 1 / math.sqrt(fan_in)
    variance = w.reshape(-1, kernel_size, kernel_size).var(0)
    c, sigma = kernel_size // 2, kernel_size / 4
    expected = math.exp(2 * c**2 / sigma**2) if init == "center" else 1  # centre / corner = exp(r² / σ²)
    assert (variance[c, c] / variance[0, 0]).item() == pytest.approx(expected, rel=0.1)
    if init == "center":
        assert variance[c, c] == variance.max()
    else:
        assert (variance.max() / variance.min()).item() < 1.1


def random_covariance(k, rank=None, seed=0):
    """A (k², k²) covariance of the given rank (full by default), correlated across kernel positions."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(k * k, rank or k * k, generator=generator, dtype=torch.float64)
    return factor @ factor.T + torch.eye(k * k, dtype=torch.float64) * (rank is None)


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, rank", [
    (16, 32, 3, None), (8, 64, 5, None), (4, 64, 9, None), (4, 64, 9, 10), (1, 256, 3, 2)])
def test_filters_drawn_from_a_covariance_have_it_at_the_default_std(in_channels, out_channels, kernel_size, rank):
    """init=Σ draws each kernel from N(0, Σ·s²/mean(diag Σ)): the kernels' second moments match that within
    sampling error, whatever Σ's rank, and every entry has the default's std on average."""
    sigma = random_covariance(kernel_size, rank)
    torch.manual_seed(0)
    weight = LCConv2d(in_channels, out_channels, kernel_size, expansion=8, init=sigma).spatial.weight.detach()
    kernels = weight.double().reshape(-1, kernel_size**2)  # N kernels
    s2 = 1 / (3 * in_channels * kernel_size**2)  # the default's variance
    expected = sigma * s2 / sigma.diagonal().mean()
    measured = kernels.T @ kernels / len(kernels)
    # each entry's sampling std is at most sqrt(2/N)·(largest diagonal entry)
    tolerance = 5 * math.sqrt(2 / len(kernels)) * expected.diagonal().max()
    assert (measured - expected).abs().max() < tolerance, f"max abs difference {(measured - expected).abs().max():.3g}"
    assert weight.std().item() == pytest.approx(math.sqrt(s2), rel=0.05)
    assert_close(lcconv.init_std(weight.shape, sigma) ** 2, expected.diagonal().reshape(kernel_size, kernel_size),
                 atol=0, rtol=1e-9)


def test_the_isotropic_covariance_is_the_default_normal_init():
    torch.manual_seed(0)
    normal = LCConv2d(16, 16, 5, expansion=4, init="kaiming_normal").spatial.weight
    torch.manual_seed(0)
    isotropic = LCConv2d(16, 16, 5, expansion=4, init=7 * torch.eye(25)).spatial.weight  # Σ's scale does not matter
    assert_close(isotropic, normal, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("init", ["center", "covariance"])
@pytest.mark.parametrize("expansion", [1, 64])
def test_center_and_covariance_inits_have_a_preconditioned_form_of_their_filters(init, expansion):
    """Over 64 draws: P's mean is m·(I ⊗ Σ) for the init's kernel covariance Σ (not diagonal for a covariance), K₀'s
    second moments Σ/3; for m < d P is S ᵀS of filters drawn as the block draws them."""
    k, in_channels, out_channels = 3, 4, 8
    init = random_covariance(k) if init == "covariance" else init
    conv = nn.Conv2d(in_channels, out_channels, k, padding=1, bias=False)
    m, d = out_channels * expansion, in_channels * k * k
    root = lcconv.kernel_root(conv.weight.shape, init)
    expected = torch.block_diag(*[root @ root.T] * in_channels)  # each kernel's covariance, kernels independent
    torch.manual_seed(0)
    drawn = [lcconv.convert(conv, expansion, frozen=True, init=init, form="preconditioned") for _ in range(64)]
    mean = torch.cat([c.preconditioner for c in drawn]).double().mean(0)
    assert (mean - m * expected).abs().max() < 0.2 * m * expected.diagonal().max()
    k0 = torch.cat([c.weight.reshape(-1, d) for c in drawn]).double()
    assert (k0.T @ k0 / len(k0) - expected / 3).abs().max() < 0.2 * expected.diagonal().max() / 3
    if m < d:  # exactly the block's filters: P = SᵀS, K₀ in their span
        [summary] = lcconv.basis_summary(drawn[0])
        assert summary["rank"] == pytest.approx(m / d)


@pytest.mark.parametrize("sigma, message", [
    (torch.eye(25), r"stem has 3×3 kernels, the covariance init is 25×25|must be \(9, 9\), one entry per pair"),
    (torch.ones(9, 3), r"must be square|must be \(9, 9\)"),
    (torch.diag(torch.tensor([1.0, -1.0] + [1.0] * 7)), "positive semi-definite"),
    (torch.zeros(9, 9), "positive semi-definite and not zero"),
    (torch.eye(9) + torch.triu(torch.ones(9, 9), 1), "symmetric"),
    (torch.full((9, 9), math.nan), "finite")])
def test_a_bad_covariance_is_refused_before_anything_is_replaced(sigma, message):
    model = lc_resnet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        lcconv.convert(model, 8, frozen=True, init=sigma)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=message):
        LCConv2d(4, 4, 3, init=sigma)


def test_a_covariance_init_has_no_init_form_and_fits_one_kernel_size_only():
    with pytest.raises(ValueError, match="form='init' needs an i.i.d. init: under init=a covariance"):
        lc_resnet(expansion=8, frozen=True, init=torch.eye(9), form="init")
    with pytest.raises(ValueError, match="^0 has 2×2 kernels, the covariance init is 81×81"):  # the patch stem
        lc_convmixer(kernel_size=9, frozen=True, init=torch.eye(81), patch_size=2)


# -----------------------------------------------------------------------------
# Filter analysis


@pytest.mark.parametrize("shape", [(16, 16, 3, 3), (64, 32, 3, 3), (8, 3, 7, 7)])
def test_fve_matches_direct_computation_and_is_high_for_random_filters(shape):
    torch.manual_seed(0)
    w = torch.rand(shape) - 0.5
    raw, normalised = lcconv.filter_variance_entropy(w)
    # directly: the eigenvalues of the kernels' covariance matrix (= s² of the centred matrix)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(w.double().reshape(-1, shape[-2] * shape[-1]).T)).clamp(min=0)
    r = eigenvalues / eigenvalues.sum()
    assert raw == pytest.approx(-sum(x * math.log10(x) for x in r.tolist() if x > 0), rel=1e-6)
    assert raw == pytest.approx(normalised * lcconv.fve_threshold(shape[0] * shape[1]))
    assert raw <= math.log10(shape[-1] ** 2) + 1e-9
    if shape[-1] == 3:
        assert normalised > 0.95


def test_fve_is_zero_for_one_repeated_pattern_and_the_threshold_has_its_fitted_values():
    pattern = torch.randn(3, 3)
    assert lcconv.filter_variance_entropy(pattern.expand(32, 16, 3, 3)) == (0.0, 0.0)
    scaled = pattern * torch.randn(32, 16, 1, 1)  # one pattern at different scales: rank 1
    assert lcconv.filter_variance_entropy(scaled)[0] < 1e-6
    assert lcconv.fve_threshold(256) == pytest.approx(0.9433, abs=1e-3)
    assert lcconv.fve_threshold(2**20) == pytest.approx(1.2618047 - 0.31050834, abs=1e-3)


def test_combined_filters_in_forward_order_and_spatial_variance():
    model = lc_resnet(expansion=2)
    filters = lcconv.combined_filters(model)
    assert list(filters) == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                             "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    assert_close(filters["layer2.0.conv1"], model.layer2[0].conv1.combined_weight)
    assert filters["layer3.0.conv2"].shape == (16, 16, 3, 3)
    torch.manual_seed(0)  # spatial variance: uniform for i.i.d. filters, centred for init="center"
    for model, k in [(lcconv.resnet(kernel_size=5), 5), (lc_resnet(20, 16, 5, expansion=4, frozen=True), 5),
                     (lc_convmixer(256, 4, 7, expansion=2), 7)]:  # the ConvMixer's 2×2 patch stem is left out
        variance = lcconv.spatial_variance(model)
        assert variance.shape == (k, k)
        assert (variance.std() / variance.mean()).item() < 0.06  # sampling noise only
    centred = lcconv.spatial_variance(lc_resnet(20, 16, 5, init="center"))
    assert (centred[2, 2] / centred[0, 0]).item() > 10


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_spatial_covariance_returns_the_covariance_a_model_was_drawn_from(kernel_size):
    """The oracle's round trip: a model whose filters are drawn from Σ has spatial_covariance ≈ Σ / mean(diag Σ)
    (each layer over its std), and its diagonal is spatial_variance up to the kernels' mean."""
    sigma = random_covariance(kernel_size, seed=1)
    torch.manual_seed(0)
    model = lc_resnet(20, 16, kernel_size, frozen=True, init=sigma, in_channels=1)
    measured = lcconv.spatial_covariance(model)
    assert measured.shape == (kernel_size**2, kernel_size**2) and torch.allclose(measured, measured.T)
    assert measured.diagonal().mean().item() == pytest.approx(1, rel=0.01)
    assert (measured - sigma / sigma.diagonal().mean()).abs().max() < 0.1
    variance = lcconv.spatial_variance(model).double().reshape(-1)
    assert_close(measured.diagonal(), variance, atol=0.01, rtol=0)


# -----------------------------------------------------------------------------
# Why it trains: a frozen LC-Block trains exactly as its preconditioned conv (lcconv.py, "Why it trains")

# (in, out, kernel, stride, padding, dilation, groups, bias, E): m = E·out/groups vs d = in/groups·k²
BLOCKS = {"grouped, m < d": (8, 8, 3, 1, 1, 1, 4, False, 4), "depthwise, m > d": (6, 6, 3, 1, 1, 1, 6, True, 16),
          "strided, m > d": (4, 6, 3, 2, 1, 1, 1, False, 8), "m < d": (16, 4, 3, 1, 1, 1, 1, True, 1),
          "m >> d": (2, 4, 3, 1, 1, 1, 1, False, 32), "dilated, unpadded 5×5": (3, 4, 5, 1, 0, 2, 1, True, 4)}


@pytest.mark.parametrize("lr", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("shape", BLOCKS)
def test_frozen_block_and_preconditioned_conv_train_identically(shape, lr):
    """train.py's optimizer, float64, same batches: the block's combined filters and the conv's weight stay equal."""
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
    """Over 64 draws: P's mean is m·diag(init_std²), its spectrum Marchenko-Pastur's, K₀'s variance init_std²/3."""
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
    """LC-Blocks and preconditioned or limit convs keep their trained weights and P, whatever convert asks."""
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
    alpha, q = 64 * 32 / (3 * 16 * 9), 144 / 2048  # α = E·c_out / (3·c_in·k²)
    eigenvalues = torch.linalg.eigvalsh(block.preconditioner().double())[0]
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
    std = lcconv.init_std(stride2.weight.shape, init)
    expected = torch.diag((128 * 32 * std**2).expand(16, 5, 5).reshape(-1))  # m·init_std², α·I for i.i.d. inits
    assert_close(stride2.preconditioner[0].double(), expected)
    weights = torch.cat([m.weight.reshape(-1, 5, 5) / lcconv.init_std(m.weight.shape, init).float()
                         for _, m in lcconv.spatial_layers(model)])
    assert weights.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)  # K₀ = C₀·S has std s/√3


@pytest.mark.parametrize("arch, expansion, init", [
    ("resnet", 16, "kaiming_uniform"), ("resnet", 2048, "kaiming_uniform"), ("resnet", 16, "kaiming_normal"),
    ("resnet", 2048, "kaiming_normal"), ("convmixer", 64, "kaiming_uniform")])
def test_under_batchnorm_the_limit_is_the_plain_net_from_a_smaller_init(arch, expansion, init):
    """Our ResNet's spatial convs all feed a BN, blind to a filter's scale: K_limit = √α·K_init at every step.
    ConvMixer's feed a bias and a GELU before their BN, so the loss sees the scale and the two part at once."""
    nets = []
    for form in ("limit", "init"):  # one seed, float64, BN eps 1e-30: BN's scale invariance is exact as eps -> 0
        torch.manual_seed(0)
        net = lcconv.resnet(8, 4) if arch == "resnet" else lcconv.convmixer(dim=8, depth=2, kernel_size=5)
        nets.append(lcconv.convert(net.double(), expansion, frozen=True, init=init, form=form))
        for bn in nets[-1].modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.eps = 1e-30
    limit, plain = nets

    def scaled_difference():  # max over layers of |K_limit/√α - K_init| / |K_init|
        return max(((a.weight / math.sqrt(lcconv.alpha(a, expansion)) - b.weight).norm() / b.weight.norm()).item()
                   for (_, a), (_, b) in zip(lcconv.spatial_layers(limit), lcconv.spatial_layers(plain)))

    assert all(type(m) is nn.Conv2d and m.weight.requires_grad for _, m in lcconv.spatial_layers(plain))
    start = plain[0].weight.clone()  # the stem
    assert start.std().item() == pytest.approx(1 / math.sqrt(3 * start.shape[0] * expansion), rel=0.3)
    assert scaled_difference() < 1e-12
    optimizers = [train.make_optimizer(net, 0.05, momentum=0.9, weight_decay=0.01) for net in nets]
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):  # train.py's optimizer and step, the same batches for both
        x = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        for net, optimizer in zip(nets, optimizers):
            train.train_step(net, optimizer, x, y, 0.1, "fp32")
    assert (plain[0].weight - start).norm() > 0.1 * start.norm()  # and they did train
    with torch.no_grad():  # with batch statistics: eval mode would see BN's running variance, 1 in both at first
        x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
        outputs = limit(x), plain(x)
    if arch == "resnet":
        assert scaled_difference() < 1e-10, f"relative difference {scaled_difference():.3g}"
        assert_close(*outputs, atol=1e-9, rtol=1e-9)
    else:
        assert scaled_difference() > 1e-2 and (outputs[0] - outputs[1]).abs().max() > 1e-3


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
    (lambda: lcconv.convert(StdConv2d(3, 4, 3), expansion=2), "StdConv2d is a StdConv2d"),  # the whole model
])
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -----------------------------------------------------------------------------
# train.py: end to end on a tiny stand-in for Fashion-MNIST and on real Fashion-MNIST; resume; bad input


HERE = Path(__file__).parent
RESULT_KEYS = ["test_acc", "train_acc", "fgsm_acc", "params_learnable", "params_total", "fve_first", "fve_last",
               "epoch_time_median_s", "peak_mem_mb", "spatial_variance", "train_loss", "torch", "dataset", "model",
               "expansion", "frozen", "seed", "epochs", "preconditioned", "basis", "precision", "hardware", "code",
               "first_filters"]
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
    argv = tiny_args(tiny_data, tmp_path, "--expansion", "4", "--frozen", "--checkpoint", str(tmp_path / "run.pt"))
    train.main(argv)
    [result] = results(tmp_path)
    for key in RESULT_KEYS:
        assert result.get(key) is not None, key
    assert (result["params_learnable"], result["params_total"]) == resnet_parameters(8, 4, 3, 4, in_channels=1)
    assert 0 <= result["fgsm_acc"] <= 100 and train.unusable(result) is None
    assert len(result["spatial_variance"]) == 3 and len(result["basis"]) == 7 and len(result["first_filters"]) == 4
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 2
    train.main(argv + ["--skip-finished"])  # a finished run is finished: --skip-finished, or the same command again
    train.main(argv)
    train.main(tiny_args(tiny_data, tmp_path, "--kernel-size", "1", "--epochs", "1"))  # every conv 1×1: no filters
    [_, plain] = results(tmp_path)
    assert plain["test_acc"] is not None and [plain[k] for k in ("fve_first", "basis", "first_filters")] == [None] * 3


def test_a_baselines_learned_covariance_is_a_file_an_oracle_run_draws_from(tiny_data, tmp_path, sweep):
    """The oracle: a baseline's result line holds its spatial_covariance; the sweep writes it to the Σ file that the
    oracle runs name (from the lowest seed, once, and waits without one); a run of `--init FILE.json` names it."""
    s = sweep.read_settings(dict(CLEAN_ENV, RESULTS=str(tmp_path), SEEDS="1 0"))
    oracle = [run for run in sweep.runs_of([sweep.GROUPS["kernel5"]], s)
              if train.PARSER.parse_args(run.argv).init.endswith(".json")]
    assert len(oracle) == 6 and {train.PARSER.parse_args(run.argv).init for run in oracle} == {
        f"{tmp_path}/covariance/fashionmnist-5ep-k9.json"}
    sigma_file = Path(f"{tmp_path}/covariance/fashionmnist-5ep-k9.json")
    run = oracle[0]._replace(out=str(tmp_path / "results.jsonl"))
    assert not sweep.covariance_ready(run) and not sigma_file.exists()  # no baseline yet: it waits
    for seed in ("1", "0"):  # a tiny stand-in for the k = 9 baseline, in the results file the oracle runs write to
        train.main(tiny_args(tiny_data, tmp_path, "--kernel-size", "9", "--epochs", "1", "--seed", seed))
    baseline = {r["seed"]: r for r in results(tmp_path)}
    assert len(baseline[0]["spatial_covariance"]) == 81 and all(len(row) == 81 for row in baseline[0]["spatial_covariance"])
    assert not sweep.covariance_ready(run)  # the tiny baselines are of another depth, width and schedule
    tiny = run._replace(argv=tiny_args(tiny_data, tmp_path, "--kernel-size", "9", "--epochs", "1", "--expansion", "8",
                                       "--frozen", "--init", str(sigma_file)))
    assert sweep.covariance_ready(tiny) and sweep.covariance_ready(tiny)
    written = json.loads(sigma_file.read_text())
    assert written["covariance"] == baseline[0]["spatial_covariance"] and written["baseline"]["seed"] == 0
    train.main(tiny.argv)
    oracle_line = results(tmp_path)[-1]
    assert oracle_line["init"] == str(sigma_file) and math.isfinite(oracle_line["test_acc"])


def test_frozen_lc_runs_in_every_form_and_reports_its_parameter_counts(tiny_data, tmp_path):
    """A frozen LC x16 ResNet, folded and preconditioned, its limit and the init form: each learns, at a plain
    conv's parameter count (but the folded one)."""
    lc = tiny_args(tiny_data, tmp_path, "--expansion", "16", "--frozen", "--lr", "0.1", "--epochs", "3")
    train.main(lc)
    train.main(lc + ["--preconditioned"])
    for form in ("--lc-limit", "--lc-init"):
        train.main(tiny_args(tiny_data, tmp_path, form, "16", "--lr", "0.1", "--epochs", "3"))
    folded, preconditioned, limit, init = results(tmp_path)
    assert preconditioned["preconditioned"] and limit["lc_limit"] == init["lc_init"] == 16
    assert limit["expansion"] == init["expansion"] == 0 and limit["lc_init"] is None and init["lc_limit"] is None
    plain = resnet_parameters(8, 4, 3, 0, in_channels=1)
    assert preconditioned["params_learnable"] == limit["params_learnable"] == init["params_learnable"] == plain[1]
    assert max(r["train_loss"] for r in (folded, preconditioned, limit, init)) < 2.1  # they learned (chance: 2.3)
    assert [b["rank"] for b in limit["basis"]] == [1.0] * 7
    assert limit["basis"][0]["alpha"] == pytest.approx(16 * 4 / (3 * 1 * 9), rel=1e-3)
    assert init["basis"] is None  # plain learnable convs


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """-> (train.py's arguments but --out, the result) of a 3-epoch frozen LC x2 run, straight through."""
    folder = tmp_path_factory.mktemp("straight")
    argv = tiny_args(tiny_data, folder, "--epochs", "3", "--expansion", "2", "--frozen")
    train.main(argv)
    [result] = results(folder)
    out = argv.index("--out")
    return argv[:out] + argv[out + 2:], result


def interrupt_in_epoch(epoch, train_epoch=train.train_epoch):
    def interrupted(*args):  # train_epoch's, the epoch last
        if args[-1] == epoch:
            raise KeyboardInterrupt
        return train_epoch(*args)
    return interrupted


def test_a_run_interrupted_or_killed_while_saving_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path,
                                                                                      monkeypatch):
    argv, straight = uninterrupted
    argv = argv + ["--out", str(tmp_path / "results.jsonl"), "--checkpoint", str(tmp_path / "run.pt")]
    # Ctrl-C in epoch 3: the checkpoint holds epoch 2, and the same command resumes (one line says so)
    monkeypatch.setattr(train, "train_epoch", interrupt_in_epoch(2))
    with pytest.raises(SystemExit, match="^train.py: interrupted; no --checkpoint to resume$"):
        train.main(argv[:-2])
    with pytest.raises(SystemExit, match="^train.py: interrupted; rerun the same command to resume from --checkpoint$"):
        train.main(argv)
    assert not results(tmp_path) and torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    train.main(argv)
    # SIGKILL in the middle of writing the second epoch's checkpoint: the first one is still there
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
    killed_argv = [a.replace("run.pt", "killed.pt").replace("results.jsonl", "killed.jsonl") for a in argv]
    killed = subprocess.run([sys.executable, "-c", killer, *killed_argv], cwd=HERE, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and not results(tmp_path, "killed.jsonl")
    assert torch.load(tmp_path / "killed.pt", weights_only=True)["epoch"] == 1
    train.main(killed_argv)
    for resumed in results(tmp_path) + results(tmp_path, "killed.jsonl"):
        assert all(resumed[k] == straight[k] for k in METRICS)


def test_a_short_write_of_the_result_then_a_rerun_gives_exactly_one_result(uninterrupted, tmp_path, monkeypatch):
    argv, straight = uninterrupted
    argv = argv + ["--out", str(tmp_path / "results.jsonl"), "--checkpoint", str(tmp_path / "run.pt")]
    write = os.write  # the result line's write() stops after 50 bytes, as on a full disk
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[:50] if b'"test_acc"' in data else data))
    with pytest.raises(SystemExit, match="short write"):
        train.main(argv)
    assert (tmp_path / "results.jsonl").read_text() == ""
    monkeypatch.setattr(os, "write", write)
    train.main(argv)  # from the last checkpoint: only the evaluation again
    [result] = results(tmp_path)
    assert all(result[k] == straight[k] for k in METRICS)


@pytest.mark.skipif(not train.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="real Fashion-MNIST is missing: `apt-get install dataset-fashion-mnist` (.ci/run does)")
def test_real_fashion_mnist_subset_learns(tmp_path):
    train.main(["--dataset", "fashionmnist", "--data-dir", str(tmp_path / "data"), "--train-subset", "4000",
                "--epochs", "2", "--batch-size", "64", "--width", "8", "--expansion", "8", "--frozen",
                "--out", str(tmp_path / "results.jsonl")])
    [result] = results(tmp_path)
    assert result["test_acc"] > 60 and result["train_acc"] > 60, result  # chance is 10%


def test_augmentation_is_a_padded_crop_and_maybe_a_flip_and_channel_stats_are_per_channel():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 8, 8), dtype=torch.uint8)
    flips = 0
    for image, source in zip(train.augment(images, torch.Generator().manual_seed(0)), F.pad(images, (4, 4, 4, 4))):
        crops = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                 if torch.equal(image, source[:, dy:dy + 8, dx:dx + 8].flip(2) if flip else source[:, dy:dy + 8, dx:dx + 8])}
        assert crops, "not a crop of the padded image"
        flips += min(crops)[2]
    assert 4 <= flips <= 28  # about half flipped
    mean, std = train.channel_stats(images)
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert_close(mean, x.mean(1).float())
    assert_close(std, x.std(1, unbiased=False).float())


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
    (["--expansion", "-1"], "--expansion"), (["--epochs", "0"], "--epochs"),
    (["--kernel-size", "0"], "kernel_size must be >= 1"), (["--kernel-size", "4"], "needs an odd kernel_size"),
    (["--depth", "21"], r"--model resnet: depth must be 6n\+2"),
    (["--model", "resnet18", "--width", "4"], "--width does not apply to --model resnet18"),
    (["--model", "convmixer", "--width", "4"], "--width does not apply to --model convmixer"),
    (["--intermediate", "relu"], "needs an LC-Block"),
    (["--lr", "-1"], "--lr"), (["--momentum", "-1"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--label-smoothing", "2"], "--label-smoothing"), (["--width", "0"], "out_channels must be an integer >= 1"),
    (["--model", "convmixer", "--depth", "-3"], "convmixer: depth must be >= 1"),
    (["--model", "convmixer", "--dim", "0"], "convmixer: out_channels must be"),
    (["--model", "convmixer", "--patch-size", "64"], "patch_size must be in 1..32"),
    (["--device", "foo"], "--device: invalid choice: 'foo'"), (["--device", "cuda:99"], "invalid choice: 'cuda:99'"),
    (["--fgsm-eps", "-1"], "--fgsm-eps"), (["--fgsm-eps", "1e9"], "--fgsm-eps"),
    (["--train-subset", "60001"], "--train-subset must be in 1..60000"),
    (["--seed", str(2**64)], "--seed: must be in 0..4294967295"),
    (["--preconditioned", "--expansion", "4"], "form='preconditioned' needs a frozen"),
    (["--lc-limit", "8", "--frozen"], "--lc-limit"), (["--lc-limit", "0"], "--lc-limit"),
    (["--lc-init", "8", "--expansion", "8"], "not allowed with argument --lc-init"), (["--lc-init", "0"], "--lc-init"),
    (["--lc-init", "8", "--init", "center"], "--lc-init needs an i.i.d. init: under --init center"),
    (["--out", "/dev/full"], "--out /dev/full: is not a regular file"),
    (["--out", "FILE/results.jsonl"], "--out .*FILE is not a directory"),
    (["--checkpoint", "FILE/run.pt"], "--checkpoint .*FILE is not a directory"),
    (["--out", "DIR"], "--out .*is a directory"),
    (["--dataset", "cifar10"], "cannot load cifar10 .* connect to the internet"),
    (["--data-dir", "CORRUPT_DATA"], "cannot load fashionmnist .* corrupt"),
    (["--checkpoint", "CORRUPT"], "cannot read checkpoint"), (["--checkpoint", "PLANTED"], "cannot read checkpoint"),
    (["--checkpoint", "OTHER", "--seed", "1"], "differs in seed"),
    (["--lr", "1e30"], "the loss became .* in epoch 1; lower --lr"),
    # every conv 1×1: the LC flags would do nothing, so they are refused up front
    (["--kernel-size", "1", "--expansion", "8", "--frozen", "--preconditioned"],
     "has no spatial conv .* nothing for --expansion, --frozen, --preconditioned to act on"),
    (["--kernel-size", "1", "--lc-limit", "8"], "nothing for --lc-limit to act on"),
    (["--model", "convmixer", "--patch-size", "1", "--kernel-size", "1", "--init", "center"], "nothing for --init"),
    (["--init", "uniform"], "--init: must be one of kaiming_uniform, kaiming_normal, center or a FILE.json"),
    (["--init", "SIGMA_25.json"], r"--init .*SIGMA_25.json: a covariance init must be \(9, 9\)"),
    (["--init", "SIGMA_NEGATIVE.json"], "--init .*: a covariance init must be positive semi-definite"),
    (["--init", "FILE.json"], r"--init .*FILE.json: cannot read a covariance from it \(JSONDecodeError"),
    (["--init", "MISSING.json"], r"cannot read a covariance from it \(FileNotFoundError"),
    (["--init", "SIGMA_9.json", "--lc-init", "8"], "use --lc-limit"),
])
def test_bad_input_one_line_and_nothing_written(tiny_data, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "_check_integrity", lambda self: False)
    (tmp_path / "CORRUPT").write_bytes(b"not a checkpoint")
    (tmp_path / "PLANTED").write_bytes(pickle.dumps({"config": Planted(tmp_path / "PWNED")}))
    (tmp_path / "FILE").write_text("a file")
    (tmp_path / "FILE.json").write_text("a file")
    for name, sigma in [("9", torch.eye(9)), ("25", torch.eye(25)), ("NEGATIVE", -torch.eye(9))]:
        (tmp_path / f"SIGMA_{name}.json").write_text(json.dumps(dict(covariance=sigma.tolist())))
    (tmp_path / "DIR").mkdir()
    raw = tmp_path / "CORRUPT_DATA" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (tiny_data / "FashionMNIST" / "raw").iterdir():
        (raw / f.name).write_bytes(f.read_bytes()[:100])  # cut short
    other = tmp_path / "OTHER"
    torch.save({"config": train.recipe(train.parse_args(tiny_args(tiny_data, tmp_path))), "epoch": 1}, other)
    before = other.read_bytes()
    extra = [str(tmp_path / a) if a.split("/")[0] in ("CORRUPT", "PLANTED", "OTHER", "DIR", "FILE", "CORRUPT_DATA")
             or a.endswith(".json") else a for a in extra]
    argv = tiny_args(tmp_path / "empty" if "cifar10" in extra else tiny_data, tmp_path, *extra)
    if "--model" in extra:  # no ResNet flags
        argv = argv[:4] + argv[8:]
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    error = str(exit.value.code) if isinstance(exit.value.code, str) else capsys.readouterr().err
    assert exit.value.code != 0 and error.count("\n") <= 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert not (tmp_path / "results.jsonl").exists() and other.read_bytes() == before
    assert not (tmp_path / "PWNED").exists()  # the planted pickle never ran


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--depth", "21", "--checkpoint", "CKPT", "--skip-finished"],
                                  ["--model", "convmixer", "--patch-size", "33", "--checkpoint", "CKPT"]])
def test_a_command_line_error_is_one_line_before_a_lock_a_checkpoint_or_a_result(tmp_path, argv):
    """As a user runs it: exit 2, one line on stderr, no traceback, nothing created (lcconv's checks included)."""
    argv = [str(tmp_path / "run.pt") if a == "CKPT" else a for a in argv]
    run = subprocess.run([sys.executable, "train.py", *argv, "--out", str(tmp_path / "out" / "r.jsonl")],
                         capture_output=True, text=True, cwd=HERE)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("train.py: error: ") and list(tmp_path.iterdir()) == []


# train.py's bf16 path (autocast, channels_last), on the CPU and, where there is one, CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def fast_path_batch(device, generator=None, batch_size=8):
    images = torch.randint(0, 256, (batch_size, 3, 16, 16), dtype=torch.uint8, device=device, generator=generator)
    return train.to_input(images), torch.randint(0, 10, (batch_size,), device=device, generator=generator)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["plain", "block", "preconditioned", "limit"])
def test_training_steps_in_bf16_and_channels_last(device, form):
    """train.py's own step on the plain ResNet and on frozen LC x8 in each form: finite loss, bf16 logits,
    channels_last weights, and what is fixed (the random filters S, P) bit-identical."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = train.to_device(lc_resnet() if form == "plain" else lc_resnet(expansion=8, frozen=True, form=form), device)
    optimizer = train.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    fixed = {n: t.clone() for n, t in state.items()
             if not t.requires_grad and (n.endswith(".spatial.weight") or n.endswith("preconditioner"))}
    learnable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(fixed) == (0 if form == "plain" else 7)
    for _ in range(3):
        x, y = fast_path_batch(device)
        assert x.is_contiguous(memory_format=torch.channels_last)
        loss, logits = train.train_step(model, optimizer, x, y, 0.1, "bf16")
        assert logits.dtype == torch.bfloat16 and torch.isfinite(loss), loss
    assert all(torch.equal(state[name], before) for name, before in fixed.items())
    for name, before in learnable.items():
        assert not torch.equal(state[name], before), name
        assert state[name].dim() != 4 or state[name].is_contiguous(memory_format=torch.channels_last), name


def combined_filter_changes(model, device, precision, steps=3):
    """How much train.py's steps (on the batches every call gets) change all of model's combined filters."""
    optimizer = train.make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    start = torch.cat([f.flatten() for f in lcconv.combined_filters(model).values()])
    generator = torch.Generator(device).manual_seed(1)
    for _ in range(steps):
        loss, _ = train.train_step(model, optimizer, *fast_path_batch(device, generator), 0.1, precision)
        assert torch.isfinite(loss), loss
    return torch.cat([f.flatten() for f in lcconv.combined_filters(model).values()]) - start


@pytest.mark.parametrize("device", DEVICES)
def test_preconditioned_form_tracks_the_frozen_block_in_bf16_and_channels_last(device):
    """From equal weights (LCConv2d.to_preconditioned) and on equal batches, frozen LC x8 and its preconditioned
    form in bf16 differ by no more than bf16 makes the block differ from its own float32 run (times 2). bf16 alone
    moves these steps by about 40% (the plain ResNet's too: at init the weight gradients are small sums of large
    terms); replacing P by its mean α·I (the limit form) moved them 2.3-3× that in our trials."""
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
    bf16, difference = (block - reference).norm() / reference.norm(), (block - conv).norm() / conv.norm()
    assert difference < 2 * bf16, f"the forms differ by {difference:.3g}, bf16 moves the block by {bf16:.3g}"


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
    assert [train.parse_args(["--precision", p]).precision for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    # the result line's hardware names the units that decided, since CPU model names can hide them
    hardware = train.hardware(torch.device("cpu"))
    assert f"({units}), " in hardware if units else not any(u in hardware for u in ("AMX", "BF16"))


# -----------------------------------------------------------------------------
# Results are never lost, glued or duplicated; old lines stay data


def test_result_lines_are_never_glued_short_or_read_when_not_ours(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    path.write_text('{"seed": 0}\n{"seed": 1, "test_a')  # a crash cut the last line short
    train.append_result(path, {"seed": 2})
    train.append_result(path, {"seed": 3})
    assert [r["seed"] for _, r in train.read_lines(path) if r] == [0, 2, 3]
    before, write = path.read_bytes(), os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[:len(data) // 2]))
    with pytest.raises(OSError, match="short write"):
        train.append_result(path, {"seed": 1, "test_acc": 90.0})
    assert path.read_bytes() == before  # taken back
    path.write_bytes(b'[1]\n"text"\nnull\n{"seed": 4}\nnot json\n\xff\xfe{"seed": 5}\n{"seed": 1' + b"0" * 5000 + b"}\n")
    assert [line for _, line in train.read_lines(path) if isinstance(line, dict)] == [{"seed": 4}]
    assert not train.finished(path, train.recipe(train.parse_args([])))


@pytest.mark.parametrize("extra, config, finished", [
    (dict(device="cpu"), {}, True), (dict(device="NVIDIA H100"), {}, False),  # before --precision: fp32 on the CPU,
    (dict(device="NVIDIA H100"), dict(precision="bf16"), True),  # bf16 on CUDA
    (dict(device="cpu", preconditioned=True), {}, False),
    (dict(device="cpu", pgd_steps=0, save_figures="figures", compile=False), {}, True),  # removed flags, old default
    (dict(device="cpu", pgd_steps=2), {}, False)])  # ... or not
def test_old_result_lines_match_with_the_new_flags_at_their_defaults(tmp_path, extra, config, finished):
    current = train.recipe(train.parse_args(["--precision", "fp32"]))
    old = {k: v for k, v in current.items() if k not in ("preconditioned", "lc_limit", "lc_init", "precision")}
    train.append_result(tmp_path / "r.jsonl", dict(old, test_acc=90.0, **extra))
    assert train.finished(tmp_path / "r.jsonl", dict(current, **config)) == finished


def test_benchmark_table_has_paired_ratios_and_flags_a_noisy_row():
    """Per round, the baseline; the preconditioned x128 row a steady 1.02x, bf16 half its fp32; the two-conv row
    2x to 3x (noisy). In round 3 a neighbour slows the fp32 baseline 5x: no row is flagged for it."""
    times, memory = {}, {("—", 0, False): 100.0, ("preconditioned", 128, True): 110.0, ("two convs", 8, True): 300.0,
                         ("one conv (folded)", 512, False): 9999.0}  # the last one out of memory: no times
    for base, two in [(100, 200), (100, 300), (500, 200), (100, 300), (100, 250)]:
        for key, ms in [(("—", 0, False, "fp32"), base), (("—", 0, False, "bf16"), 50.0),
                        (("preconditioned", 128, True, "fp32"), 1.02 * base),
                        (("preconditioned", 128, True, "bf16"), 51.0), (("two convs", 8, True, "fp32"), two),
                        (("two convs", 8, True, "bf16"), two / 2)]:
            times.setdefault(key, []).append(ms)
    table = train.bench_table(times, memory, ("fp32", "bf16"))
    rows = {tuple(line.split(" | ")[1:3]): line.split(" | ") for line in table.splitlines() if line.startswith("| LC-")}
    assert rows["preconditioned", "fp32"][4:8] == ["1.02 [1.02–1.02]", "—", "110", "1.10 |"]
    assert rows["preconditioned", "bf16"][4:6] == ["1.02 [1.02–1.02]", "0.50 [0.50–0.50]"]
    assert rows["two convs", "fp32"][4] == "2.50 [2.00–3.00] (noisy)" and rows["two convs", "fp32"][6] == "300"
    assert rows["one conv (folded)", "bf16"][3] == "out of memory" and len(rows) == 6  # the baseline's rows aside
    assert [line.split(" | ")[0] for line in table.splitlines() if "| one conv" in line] == ["| LC-x512 learnable"] * 2
    assert "2 ratio(s) spread" in table and "Do not trust them" in table


def test_the_benchmark_times_the_models_that_training_builds():
    """The baseline and learnable rows learn their filters (the baseline once had them frozen); the frozen rows
    learn only the 1×1 weights, BN and the classifier; the two-conv row runs the block as drawn."""
    for path, e, frozen in [row for row in train.BENCH_ROWS if row[1] <= 8]:
        model, _, x, _ = train.bench_step(path, e, frozen, 4, torch.device("cpu"))
        learnable, total = lcconv.count_parameters(model)
        assert (learnable < total) == frozen, (path, e)
        net = train.build_net(train.parse_args(["--expansion", str(e)] + ["--frozen"] * frozen))
        assert lcconv.count_parameters(net) == (learnable, total)
        blocks = [m for m in model.modules() if isinstance(m, lcconv.LCConv2d)]
        assert all(("forward" in vars(b)) == (path == "two convs") for b in blocks) and bool(blocks) == bool(e)
    assert {(e, frozen) for _, e, frozen in train.BENCH_ROWS if not frozen} == {(0, False), (128, False),
                                                                                   (256, False), (512, False)}


# -----------------------------------------------------------------------------
# experiments.sh: every group lists valid train.py commands; bad settings stop it in one line; a tiny sweep writes
# one results file per training setting, reports, skips finished runs and survives a failing one; the report reads
# every line it can of every results file, one run a seed, one part per setting

GROUPS = ["table1", "expansion", "expansion15", "width", "depth", "kernel", "kernel5", "ablation", "offtheshelf",
          "mechanism", "recipe", "quick", "length"]
OWN_SCHEDULES = {"recipe": (75, 5, 15), "expansion15": (15,), "kernel5": (5,), "quick": (3,)}  # on all images; the rest: EPOCHS
CLEAN_ENV = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}  # the caller's SEEDS etc. stay out
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # the report's plots need it; the rest does not


def experiments(*args, **env):
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
    """The lines of `experiments.sh --list GROUPS` in a clean environment."""
    assert sweep.main(["--list", *groups], {**CLEAN_ENV, **env}) == 0
    return capsys.readouterr().out.splitlines()


def made_up_covariances(commands):
    """An isotropic Σ file for each `--init FILE.json` of these listed commands that has none."""
    for init in {train.PARSER.parse_args(shlex.split(c)[2:]).init for c in commands} - set(lcconv.INITS):
        Path(init).parent.mkdir(parents=True, exist_ok=True)
        Path(init).exists() or Path(init).write_text(json.dumps(dict(covariance=torch.eye(81).tolist())))


def made_up(command, test_acc, **extra):
    """-> (its --out, a result line shaped like train.py's) for a listed command, with made-up metrics."""
    args = train.parse_args(shlex.split(command)[2:])
    line = dict(vars(args), test_acc=test_acc, train_acc=90.0, fgsm_acc=test_acc - 10, fve_first=1.0, fve_last=0.9,
                params_learnable=1000, params_total=2000, precision="fp32", hardware="a CPU, 2 threads",
                basis=[dict(rank=1.0, alpha=4.7, spread=2.0, spread_mp=2.1), dict(rank=0.5, alpha=25.0, spread=3.0,
                                                                                  spread_mp=1.5)] if args.frozen else None)
    return args.out, dict(line, **extra)


def report_of(sweep, folder, lines, **env):
    """REPORT.md of these (path, line or text) appended to their files."""
    for path, line in lines:
        with open(path, "a") as f:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    assert sweep.main(["report"], {**CLEAN_ENV, **env, "RESULTS": str(folder)}) == 0
    return (folder / "REPORT.md").read_text()


def table(report, title, part=""):
    """{row label: {column header: cell}} of the first table whose title starts with title, in the first part whose
    heading has part; a repeated header (the paper's beside each of ours) gets its place added: "paper 2", ..."""
    found, where, name, header = None, "", "", None
    for line in report.splitlines():
        if line.startswith("#") and found is not None:
            break
        if line.startswith("#"):
            where, name, header = line if line.startswith("# ") else where, line.lstrip("# "), None
        elif line.startswith("|") and not line.startswith("|---") and name.startswith(title) and part in where:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = [h if cells[:i].count(h) == 0 else f"{h} {cells[:i].count(h) + 1}" for i, h in enumerate(cells)]
                found = {}
            else:
                found[cells[0]] = dict(zip(header, cells))
    assert found is not None, f"no table {title!r} in a part with {part!r}"
    return found


def provenance(report):
    """The rows of the report's provenance table, as lists of cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in report.split("# Provenance")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| dataset")]


def summary(values, sign=""):
    """The cell the report writes for these values (one a seed)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return f"{mean:{sign}.2f}{f' ± {std:.2f}' if std is not None else ''} ({len(values)})"


@pytest.mark.parametrize("group", GROUPS)
def test_list_prints_valid_train_commands_for_every_group(sweep, capsys, group, monkeypatch, tmp_path):
    monkeypatch.setenv("EPOCHS", "3")  # the caller's settings do not leak in
    commands = listed(sweep, capsys, group)
    monkeypatch.chdir(tmp_path)  # where the oracle's Σ files, named relative to the repo, are made up
    made_up_covariances(commands)
    assert len(commands) >= 8 and len(set(commands)) == len(commands)
    configs, names = set(), set()
    for command in commands:
        program, script, *argv = command.split()
        assert (program, script) == ("python", "train.py")
        args = train.parse_args(argv)  # exits on any flag train.py would reject
        assert args.skip_finished and args.seed in (0, 1, 2, 3)
        assert args.epochs in OWN_SCHEDULES.get(group, (75,))
        assert args.out == f"results/{args.dataset}-{args.epochs}ep.jsonl"  # one results file per setting
        configs.add(json.dumps(train.recipe(args), sort_keys=True))
        names.add(args.checkpoint)
        assert Path(args.checkpoint).parent == Path("results/checkpoints")  # a file there, whatever the flags hold
    assert len(configs) == len(names) == len(commands)  # no run listed twice, each its own checkpoint


def test_list_default_quick_and_recipe(sweep, capsys):
    everything = experiments("--list", EPOCHS="")  # via bash, as users run it; empty is unset, as ${EPOCHS:-75} is
    assert everything.returncode == 0, everything.stderr
    def configs(commands):  # each command's flags, paths aside, as argparse reads them
        return [json.dumps({k: v for k, v in vars(train.PARSER.parse_args(shlex.split(c)[2:])).items()
                            if k not in ("out", "checkpoint")}) for c in commands]
    assert len(set(configs(everything.stdout.splitlines()))) == len(everything.stdout.splitlines())  # each once
    assert set(configs(everything.stdout.splitlines())) == set(configs(sum((listed(sweep, capsys, g) for g in GROUPS), [])))
    # QUICK: Table 1's Fashion-MNIST row at 3 epochs on all images, whatever EPOCHS says; the named groups at 100 steps
    quick = listed(sweep, capsys, QUICK="1", EPOCHS="1")
    assert quick == listed(sweep, capsys, "quick", QUICK="1") and all(
        "--out results-quick/fashionmnist-3ep.jsonl" in c for c in quick)
    assert [(a.dataset, a.epochs, a.train_subset, a.seed, a.expansion, a.frozen) for a in map(
        train.parse_args, (c.split()[2:] for c in quick))] == [
        ("fashionmnist", 3, None, 0, 0, False), ("fashionmnist", 3, None, 0, 128, True),
        ("fashionmnist", 3, None, 0, 128, False)]
    short = listed(sweep, capsys, "expansion", "mechanism", QUICK="1")
    assert all("--dataset fashionmnist" in c and "--seed 0 --epochs 5 --train-subset 5000" in c
               and "--out results-quick/fashionmnist-5ep-5000.jsonl" in c for c in short)
    length = [train.parse_args(c.split()[2:]) for c in listed(sweep, capsys, "length", QUICK="1", SEEDS="0 1 2")]
    assert len(length) == 15 and {(a.epochs, a.train_subset) for a in length} == {(5, 5000)}  # QUICK: 100 steps
    # expansion15: Fig. 4 at 15 epochs on all images, seed by seed, each config once
    sweep15 = [train.parse_args(c.split()[2:]) for c in listed(sweep, capsys, "expansion15", SEEDS="0 1", EPOCHS="3")]
    assert [a.seed for a in sweep15] == [0] * 26 + [1] * 26 and {(a.epochs, a.train_subset) for a in sweep15} == {(15, None)}
    kinds = collections.Counter((a.frozen, a.preconditioned, bool(a.lc_init)) for a in sweep15[:26])
    assert kinds == {(False, False, False): 9, (True, False, False): 10, (True, True, False): 2, (False, False, True): 5}
    assert sorted(a.expansion for a in sweep15[:26] if a.frozen) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192]
    assert max(a.expansion for a in sweep15 if not a.frozen) == 128  # learnable x256, x512: too large for a CPU
    assert [a.lc_init for a in sweep15[:26] if a.lc_init] == [8, 32, 128, 512, 2048]
    # recipe: its own schedules on all images, whatever EPOCHS and TRAIN_SUBSET say; DATASETS still filters
    recipe = [train.parse_args(c.split()[2:])
              for c in listed(sweep, capsys, "recipe", SEEDS="0", EPOCHS="3", TRAIN_SUBSET="5000")]
    assert [(a.epochs, a.expansion, a.frozen, a.lc_init) for a in recipe] == [
        (e, *kind) for e in (75, 5, 15) for kind in [(0, False, None), (128, True, None), (128, False, None),
                                                     (0, False, 128)]]
    assert all(a.dataset == "fashionmnist" and a.train_subset is None for a in recipe)
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
    assert not (tmp_path / "results").exists()


def test_tiny_sweep_reports_skips_finished_runs_and_survives_a_failure(sweep, capsys, tiny_data, tmp_path,
                                                                       monkeypatch):
    results = tmp_path / "results"
    env = dict(CLEAN_ENV, DATASETS="fashionmnist", SEEDS="0", EPOCHS="1", TRAIN_SUBSET="256", DATA_DIR=str(tiny_data),
               RESULTS=str(results), PYTHON=sys.executable)
    commands = listed(sweep, capsys, "table1", **env)
    broken = Path(commands[1].split("--checkpoint ")[1].split()[0])  # a corrupt checkpoint fails this run
    broken.parent.mkdir(parents=True)
    broken.write_text("garbage")
    monkeypatch.chdir(HERE)
    assert sweep.main(["table1"], env) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and out.count("done:") == 2 and "1 run(s) failed" in err
    out_file = results / "fashionmnist-1ep-256.jsonl"
    assert [p.name for p in results.glob("*.jsonl")] == [out_file.name]  # one file per training setting
    baseline = next(r for _, r in train.read_lines(out_file) if r["expansion"] == 0)
    row = table((results / "REPORT.md").read_text(), "Table 1:")["fashionmnist"]
    assert row["baseline"] == f"{baseline['test_acc']:.2f} (1)" and row["paper"] == "93.65 ± 0.18"
    broken.unlink()
    assert sweep.main(["table1"], env) == 0
    assert "[1/1]" in capsys.readouterr().out  # the failed one again
    assert sweep.main(["table1"], env) == 0
    assert "[1/" not in capsys.readouterr().out and len(out_file.read_text().splitlines()) == 3  # nothing new
    report = (results / "REPORT.md").read_text()
    assert "3 finished runs in 1 results file(s)" in report
    assert ("(plots/filters_fashionmnist.png)" in report) == HAS_MATPLOTLIB and not list(results.glob("**/.*.tmp"))
    if HAS_MATPLOTLIB:  # the two grids side by side, under their titles
        width, height = PIL.Image.open(results / "plots" / "filters_fashionmnist.png").size
        assert width > 2 * height


def test_two_sweeps_and_four_runs_on_one_results_folder_run_each_config_once(tiny_data, tmp_path):
    env = dict(CLEAN_ENV, DATASETS="fashionmnist", SEEDS="0", EPOCHS="1", DATA_DIR=str(tiny_data),
               RESULTS=str(tmp_path), TRAIN_ARGS="--train-subset 64 --depth 8 --width 4 --batch-size 64",
               PYTHON=sys.executable)
    commands = experiments("--list", "table1", **env).stdout.splitlines()
    everything = [subprocess.Popen(argv, cwd=HERE, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                  for argv in [["bash", "experiments.sh", "table1"]] * 2 + [shlex.split(commands[i]) for i in (0, 0, 1, 2)]]
    outputs = [p.communicate()[0] for p in everything]
    assert [p.returncode for p in everything] == [0] * 6, outputs  # a run that finds its result waited for counts as done
    lines = [r for _, r in train.read_lines(tmp_path / "fashionmnist-1ep-64.jsonl")]  # --train-subset from TRAIN_ARGS
    assert len(lines) == 3 and len({json.dumps(train.recipe(r), sort_keys=True) for r in lines}) == 3
    assert "3 finished runs in 1 results file(s)" in (tmp_path / "REPORT.md").read_text()


def test_a_failing_report_in_a_sweep_is_one_line_and_the_later_groups_still_run(sweep, capsys, tmp_path,
                                                                                monkeypatch):
    ran = []
    monkeypatch.setattr(sweep, "run_one", lambda run, s: ran.append(run.group) or True)  # trains nothing
    monkeypatch.setattr(sweep, "write_report", lambda folder: {}["spatial_variance"])
    assert sweep.main(["table1", "expansion"], dict(CLEAN_ENV, QUICK="1", RESULTS=str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert set(ran) == {"table1", "expansion"}
    assert err.count("\n") == 2 and err.count("the report failed") == 2 and "KeyError" in err, err


def test_a_sweep_skips_a_run_whose_seed_has_a_line_in_the_other_precision(sweep, capsys, tmp_path, monkeypatch):
    """As the report counts it: a seed's run in fp32 is that seed's run, for a sweep on a machine that trains bf16."""
    env = dict(CLEAN_ENV, QUICK="1", RESULTS=str(tmp_path), TRAIN_ARGS="--precision bf16")
    baseline, *rest = listed(sweep, capsys, "quick", **env)
    report_of(sweep, tmp_path, [made_up(baseline, 90.0)])  # its line says fp32
    ran = []
    monkeypatch.setattr(sweep, "run_one", lambda run, s: ran.append(run.argv) or True)  # trains nothing
    assert sweep.main([], env) == 0
    assert ran == [shlex.split(c)[2:] for c in rest]


def test_report_has_every_table_with_the_numbers_of_its_runs(sweep, capsys, tmp_path):
    """Made-up results of every group, two seeds, each line written twice, some without the newer keys: every table
    shows, and its cells are the mean ± std of exactly its runs."""
    lines, commands = [], listed(sweep, capsys, SEEDS="0 1", RESULTS=str(tmp_path))
    made_up_covariances(commands)
    for command in commands:
        path, r = made_up(command, 80.0 + int(command.split("--seed ")[1].split()[0]) + 2 * ("--frozen" in command))
        k = r.get("kernel_size") or 3  # Fig. 8b's map: flat for frozen filters, twice the rest at a learned centre
        r["spatial_variance"] = [[2.0 if (i, j) == (k // 2, k // 2) and not r["frozen"] else 1.0 for j in range(k)]
                                 for i in range(k)]
        if not r["preconditioned"] and not r["lc_limit"]:  # a line from before these keys
            del r["preconditioned"], r["lc_limit"], r["precision"]
        lines += [(path, r)] * 2
    report = report_of(sweep, tmp_path, lines)
    learnable, frozen, part = summary([80.0, 81.0]), summary([82.0, 83.0]), "75 epoch(s) on the full training set"
    fgsm, gain = summary([70.0, 71.0]), summary([2.0, 2.0], "+")
    assert table(report, "Table 1:", part)["cifar10"] == {
        "dataset": "cifar10", "baseline": learnable, "paper": "91.60 ± 0.23", "LC learnable": learnable,
        "paper 2": "91.39 ± 0.29", "LC frozen": frozen, "paper 3": "91.89 ± 0.10", "gain, LC learnable":
        summary([0.0, 0.0], "+"), "gain, LC frozen": gain, "frozen − learnable": gain, "FGSM baseline": fgsm,
        "FGSM LC learnable": fgsm, "FGSM LC frozen": summary([72.0, 73.0])}
    fig4 = table(report, "Fig. 4:", part)
    assert fig4["512"]["test acc, frozen"] == frozen and fig4["0"]["test acc, learnable"] == learnable
    assert fig4["0"]["gain, learnable"] == "—"  # the baseline over itself
    assert fig4["512"]["FGSM, frozen"] == summary([72.0, 73.0]) and fig4["512"]["gain, frozen"] == gain
    assert fig4["64"]["frozen − learnable"] == gain and fig4["8192"]["test acc, preconditioned"] == frozen
    seeds = table(report, "Seed by seed: Table 1:", part)["cifar10"]  # each gain of a table, seed by seed
    assert seeds["gain, LC frozen"] == "0: +2.00, 1: +2.00" and seeds["gain, LC learnable"] == "0: +0.00, 1: +0.00"
    assert table(report, "Seed by seed: Fig. 4:", part)["64"]["frozen − learnable"] == "0: +2.00, 1: +2.00"
    assert table(report, "Fig. 5:", part)["2"]["params, learnable"] == "1,000 ± 0 (2)"
    # at 15 epochs on Fashion-MNIST, the preconditioned form and --lc-init E beside the block
    fig4 = table(report, "Fig. 4:", "15 epoch(s) on the full training set")
    assert fig4["8192"]["test acc, preconditioned"] == frozen and fig4["2048"]["FGSM, preconditioned"] == summary([72.0, 73.0])
    assert fig4["2048"]["test acc, --lc-init"] == fig4["8"]["test acc, --lc-init"] == learnable
    assert fig4["8192"]["gain, preconditioned"] == fig4["2048"]["FGSM gain, preconditioned"] == gain
    assert fig4["128"]["frozen − --lc-init"] == fig4["2048"]["FGSM preconditioned − --lc-init"] == gain
    assert fig4["2048"]["test acc, frozen"] == fig4["256"]["test acc, learnable"] == "—"  # not run: too slow
    for title, row in [("Fig. 6a", "256"), ("Fig. 6b", "260"), ("Fig. 8a", "9, frozen"), ("Fig. 8a", "9, frozen, oracle"),
                       ("Fig. 8a", "3, frozen, center")]:
        assert set(table(report, title, part)[row].values()) >= {frozen}, title
    assert table(report, "Fig. 8a", part)["9, learnable, center"]["no LC"] == learnable
    kernel = table(report, "Fig. 8a on a CPU", "5 epoch(s) on the full training set")  # gaps to the default baseline
    assert kernel["9"]["learned filters"] == kernel["9, center"]["learned filters"] == learnable
    assert kernel["9, oracle"]["frozen x8"] == kernel["7"]["frozen x512"] == frozen and "5, center" not in kernel
    assert kernel["9, oracle"]["gap x64"] == kernel["3, center"]["gap x1"] == kernel["5"]["gap x512"] == gain
    assert kernel["9, center"]["gap, learned filters"] == summary([0.0, 0.0], "+")
    assert kernel["9"]["gap, learnable x8"] == summary([0.0, 0.0], "+") and kernel["9, oracle"]["learnable x8"] == "—"
    centre = table(report, "Fig. 8b on a CPU", "5 epoch(s) on the full training set")  # the centre over the mean
    assert centre["9"]["learned filters"] == summary([2 * 81 / 82] * 2) and centre["5"]["learnable x8"] == summary(
        [2 * 25 / 26] * 2) and centre["9, oracle"]["frozen x8"] == summary([1.0, 1.0])
    table3 = table(report, "Table 3", part)["bn_relu"]  # learnable, then frozen, each with the paper's beside
    assert (table3["learnable"], table3["paper"], table3["frozen"], table3["paper 2"]) == (
        learnable, "94.72 ± 0.16", frozen, "93.26 ± 0.18")
    assert table(report, "Fig. 1", part)["mobilenet_v2"]["drop"] == summary([-2.0, -2.0], "+")
    mechanism = table(report, "Why it works: frozen LC xE", part)
    assert mechanism["32768"]["limit"] == mechanism["8"]["init"] == learnable
    assert mechanism["8192"]["preconditioned"] == mechanism["512"]["frozen LC"] == frozen
    assert (mechanism["0"]["limit"], mechanism["0"]["learnable LC"]) == ("—", learnable)
    basis = table(report, "The random basis", part)  # each form's own runs: smallest rank, largest alpha of the layers
    assert basis["128, folded"]["rank/d, smallest"] == "0.50 ± 0.00 (2)"
    assert basis["128, preconditioned"]["α, largest"] == "25.00 ± 0.00 (2)"
    length = table(report, "The length axis on fashionmnist", "across training lengths")
    assert [row["SGD steps"] for row in length.values()] == ["705", "1,175", "3,525", "17,625"]  # 3 ... 75 epochs
    assert all(row["gain, frozen LC x128"] == summary([2.0, 2.0], "+") for row in length.values())
    assert "(4)" not in report  # each run once
    for name in ("expansion_cifar10-75ep", "expansion_fashionmnist-15ep", "kernel_fashionmnist-5ep"):
        assert (f"(plots/{name}.png)" in report) == (tmp_path / "plots" / f"{name}.png").exists() == HAS_MATPLOTLIB


def test_report_skips_and_counts_the_lines_it_cannot_use_in_any_file(sweep, capsys, tmp_path):
    env = dict(QUICK="1", RESULTS=str(tmp_path))
    good = [made_up(c, 80.0) for c in listed(sweep, capsys, "table1", **env)]
    path, baseline = good[0]
    odd = [dict(baseline, test_acc="81.5"), dict(baseline, expansion="4"), dict(baseline, test_acc=math.nan), {},
           dict(baseline, frozen=None), "not json", "", "[1]", '{"test_acc": 1' + "0" * 5000 + "}",
           dict(baseline, dataset="imagenet"), dict(baseline, batch_size=0)]
    malformed = dict(good[2][1], fgsm_acc="x", spatial_variance=[[1.0, 2.0], [3.0]], basis="x", first_filters=[[1]])
    cifar = listed(sweep, capsys, "table1", DATASETS="cifar10", SEEDS="0", RESULTS=str(tmp_path))[0]
    report = report_of(sweep, tmp_path, [(path, line) for line in odd] + good[:2] + [(path, malformed)] + [
        (tmp_path / "cifar10-75ep.jsonl", "{"),  # another file, its own odd line, and an alpha below 0
        made_up(cifar, 70.0, first_filters=[[[[1.0]]]], basis=[dict(alpha=-1.0)])], **env)
    assert "11 line(s) of the results files not used" in capsys.readouterr().out
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


def test_a_seed_counts_once_fp32_where_it_has_both_precisions_and_gains_pair_by_seed(sweep, capsys, tmp_path):
    commands = [c for c in listed(sweep, capsys, "recipe", SEEDS="0 1 2", RESULTS=str(tmp_path)) if "--epochs 75" in c]
    baselines = [c for c in commands if "--expansion" not in c and "--lc-init" not in c]  # seeds 0, 1, 2
    (path, fp32), (_, seed1), (_, bf16) = [made_up(c, acc) for c, acc in zip(baselines, (93.0, 94.0, 95.0))]
    old = dict({k: v for k, v in fp32.items() if k != "precision"}, device="cpu")  # from before --precision: fp32
    frozen = made_up(next(c for c in commands if "--frozen" in c), 93.5, first_filters=[[[[0.3, -0.3]]]])  # seed 0
    report = report_of(sweep, tmp_path, [(path, dict(fp32, precision="bf16", test_acc=90.0)), (path, old), frozen,
                                         (path, dict(seed1, precision="bf16")), (path, dict(bf16, device="NVIDIA H100"))])
    assert table(report, "Table 1:", "75 epoch(s)")["fashionmnist"]["baseline"] == summary([93.0, 94.0, 95.0])
    length = table(report, "The length axis", "across training lengths")["75 epochs"]
    assert length["gain, frozen LC x128"] == "+0.50 (1)"  # against seed 0's baseline, not the mean of three
    forgotten = table(report, "Is the init forgotten?", "across training lengths")["75 epochs"]
    assert forgotten["frozen LC x128 / sqrt(alpha)"] == f"{0.3 / math.sqrt(4.7):.3f} (1)"  # its first layer's alpha
    assert [(row[2], row[3], row[4], row[7]) for row in provenance(report)] == [
        ("baseline", "0", "bf16", "90.00"), ("baseline", "0", "fp32", "93.00"), ("baseline", "1", "bf16", "94.00"),
        ("baseline", "2", "fp32", "95.00"), ("expansion 128, frozen", "0", "fp32", "93.50")]
    pairs = [[c.strip() for c in line.strip("|").split("|")] for line in
             report.split("# Precision pairs")[1].split("# Provenance")[0].splitlines() if line.startswith("| fashion")]
    assert pairs == [["fashionmnist", "75 ep", "baseline", "0", "93.00", "90.00", "-3.00", "83.00", "83.00", "+0.00"]]


def test_table1_within_bf16_pairs_bf16_runs_only_and_is_left_out_where_every_run_is_bf16(sweep, capsys, tmp_path):
    recipe = [c for c in listed(sweep, capsys, "recipe", SEEDS="0 1", RESULTS=str(tmp_path)) if "--epochs 75" in c]
    baseline = [c for c in recipe if "--expansion" not in c and "--lc-init" not in c]
    frozen = [c for c in recipe if "--frozen" in c]
    learnable = [c for c in recipe if "--expansion 128" in c and "--frozen" not in c]
    bf16 = dict(precision="bf16")
    lines = [made_up(baseline[0], 93.0), made_up(baseline[0], 92.0, **bf16), made_up(baseline[1], 94.0, **bf16),
             made_up(frozen[0], 93.5), made_up(frozen[1], 95.0, **bf16),
             made_up(learnable[0], 93.25, **bf16), made_up(learnable[1], 94.75, **bf16)]
    quick = listed(sweep, capsys, "quick", SEEDS="0", RESULTS=str(tmp_path))
    report = report_of(sweep, tmp_path, lines + [made_up(c, 90.0, **bf16) for c in quick])
    mixed, within = table(report, "Table 1:", "75 epoch(s)"), table(report, "Table 1 within bf16", "75 epoch(s)")
    assert mixed["fashionmnist"]["baseline"] == summary([93.0, 94.0])  # fp32 where a seed has both
    assert mixed["fashionmnist"]["gain, LC frozen"] == summary([0.5, 1.0], "+")  # seed 0 pairs fp32 with fp32
    assert mixed["fashionmnist"]["frozen − learnable"] == summary([0.25, 0.25], "+")  # paired with learnable LC
    assert within["fashionmnist"]["baseline"] == summary([92.0, 94.0]) and "paper" not in within["fashionmnist"]
    assert within["fashionmnist"]["LC frozen"] == "95.00 (1)" and within["fashionmnist"]["gain, LC frozen"] == "+1.00 (1)"
    assert table(report, "Table 1:", "3 epoch(s)")["fashionmnist"]["baseline"] == "90.00 (1)"
    assert report.count("## Table 1 within bf16") == 1  # not at 3 epochs, where it would repeat Table 1


def test_fig4_within_bf16_pairs_bf16_runs_only_is_drawn_and_is_left_out_where_every_run_is_bf16(
        sweep, capsys, tmp_path, monkeypatch):
    drawn = []  # (the baseline's test accuracy, where) of each Fig. 4 drawn: as expansion_figure, none without it
    monkeypatch.setattr(sweep, "expansion_figure", lambda folder, rows, where: "" if (
        baseline := rows[0][2]["test acc, learnable"].value) is None else drawn.append((baseline, where)) or "drawn")
    sweep15 = listed(sweep, capsys, "expansion15", SEEDS="0", RESULTS=str(tmp_path))
    baseline = next(c for c in sweep15 if "--expansion" not in c and "--lc-init" not in c)
    frozen2, frozen4, frozen8, frozen128 = [next(c for c in sweep15 if f"--expansion {e} --frozen " in c)
                                            for e in (2, 4, 8, 128)]
    bf16 = dict(precision="bf16")
    lines = [made_up(baseline, 93.0), made_up(baseline, 92.0, **bf16), made_up(frozen2, 91.0, **bf16),
             made_up(frozen4, 91.5, **bf16), made_up(frozen8, 93.5, **bf16), made_up(frozen128, 95.0)]
    quick = listed(sweep, capsys, "expansion", SEEDS="0", QUICK="1", RESULTS=str(tmp_path))
    report = report_of(sweep, tmp_path, lines + [made_up(c, 90.0, **bf16) for c in quick])
    part = "15 epoch(s) on the full training set"
    mixed, within = table(report, "Fig. 4:", part), table(report, "Fig. 4 within bf16", part)
    assert (mixed["0"]["test acc, learnable"], mixed["8"]["gain, frozen"]) == ("93.00 (1)", "+0.50 (1)")  # fp32 first
    assert (within["0"]["test acc, learnable"], within["8"]["gain, frozen"]) == ("92.00 (1)", "+1.50 (1)")
    assert mixed["128"]["test acc, frozen"] == "95.00 (1)" and "128" not in within  # a row with no number: left out
    assert report.count("## Fig. 4 within bf16") == 1 and report.count("## Fig. 4:") == 2  # not where all is bf16
    assert [(value, where.startswith("of 15 epoch(s)"), where.endswith(", bf16 runs only")) for value, where in drawn
            if value != 90.0] == [(92.0, True, True)]  # one figure for the setting, from the bf16 runs
    assert [where.endswith("runs only") for value, where in drawn if value == 90.0] == [False]  # all bf16: Fig. 4's
    drawn.clear()  # without seed 0's bf16 baseline the bf16 curve has nothing to stand against: Fig. 4's is drawn
    (tmp_path / "mixed").mkdir()
    report = report_of(sweep, tmp_path / "mixed", [(tmp_path / "mixed" / Path(path).name, line) for path, line in lines
                                                   if line["precision"] == "fp32" or line["expansion"]])
    assert "## Fig. 4 within bf16" in report
    assert [(value, where.endswith("runs only")) for value, where in drawn] == [(93.0, False)]


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
    report = report_of(sweep, tmp_path, good + [(path, dict(r, flag_from_later=other, test_acc=20.0)) for path, r in good])
    assert f"{2 * len(good)} finished runs" in report
    assert table(report, "Table 1:")["cifar10"]["baseline"] == table(report, "Fig. 4")["64"]["test acc, learnable"] \
        == "80.00 (1)"
    assert "(2)" not in report and "20.00" not in report.split("# Provenance")[0]


def test_every_committed_run_is_finished_by_its_own_listed_command_and_in_the_report(sweep, capsys, tmp_path,
                                                                                    monkeypatch):
    """Each line of results/*.jsonl: its command from `experiments.sh --list` (the recipe group's, or QUICK's with
    RESULTS=results), given the line's precision, says it is finished and writes nothing; the report uses each."""
    commands = {}
    for groups, env in [(["recipe", "expansion15", "kernel5", "quick"], dict(SEEDS="0 1 2 3")),
                        (["table1", "expansion", "mechanism", "length"],
                                                                dict(QUICK="1", SEEDS="0 1 2", RESULTS="results"))]:
        for command in listed(sweep, capsys, *groups, **env):
            argv = shlex.split(command)[2:]
            init = train.PARSER.parse_args(argv).init
            if init.endswith(".json") and not (HERE / init).exists():
                continue  # an oracle run whose Σ file is not committed yet (nor any line of it)
            commands[json.dumps({**train.recipe(train.parse_args(argv)), "precision": None}, sort_keys=True)] = argv
    for path in (HERE / "results").glob("*.jsonl"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.chdir(HERE)  # where an oracle's --init results/covariance/... is
    lines = [line for path in sorted(tmp_path.glob("*.jsonl")) for _, line in train.read_lines(path)]
    assert len(lines) >= 50 and all(train.unusable(line) is None for line in lines)
    for line in lines:
        config = train.recipe(line)
        argv = commands[json.dumps({**config, "precision": None}, sort_keys=True)]
        argv = list(argv)  # its results file and checkpoint in tmp_path; an oracle's --init Σ stays, part of its config
        for flag in ("--out", "--checkpoint"):
            argv[argv.index(flag) + 1] = str(tmp_path / Path(argv[argv.index(flag) + 1]).name)
        train.main(argv + ["--precision", config["precision"]])
        assert capsys.readouterr().out.startswith("already in"), argv
    assert all(path.read_bytes() == (tmp_path / path.name).read_bytes() for path in (HERE / "results").glob("*.jsonl"))
    assert not list(tmp_path.glob("*.pt"))
    report = report_of(sweep, tmp_path, [])
    assert f"{len(lines)} finished runs" in report and "not used" not in report
    row = table(report, "Table 1:", "75 epoch(s) on the full training set")["fashionmnist"]
    assert row["paper"] == "93.65 ± 0.18" and row["baseline"].endswith(")") and row["LC frozen"].endswith(")")
    length = table(report, "The length axis on fashionmnist", "across training lengths")
    assert length["75 epochs"]["SGD steps"] == "17,625" and length["5 epochs on 5,000 images"]["SGD steps"] == "100"
    assert table(report, "Is the init forgotten?")["75 epochs"]["baseline"] != "—"
    assert len(provenance(report)) == sum(r["train_subset"] is None for r in lines)
    assert ("(plots/filters_fashionmnist.png)" in report) == ("seed 0, 75 epoch(s) on the full" in report) \
        == (tmp_path / "plots" / "length_fashionmnist.png").exists() == HAS_MATPLOTLIB


# -----------------------------------------------------------------------------
# The README: every number it states is one the report (or the benchmark) prints

TRIPLE = r"[+-]?\d[\d,]*\.\d+ ± \d[\d,]*\.\d+ \(\d+\)"  # a cell of the report: mean ± std (seeds)
DECIMAL = r"(?<![\w.])[+-]?\d[\d,]*\.\d+(?![\w.])"  # any other number with a decimal point, whole


def unsourced(readme, sources):
    """The numbers with a decimal point in readme's prose and tables that no source prints: a mean ± std (seeds) as a
    whole, any other number as a whole token (sign aside). Code blocks, `code` and link targets are left out."""
    text = re.sub(r"```.*?```", "", readme, flags=re.S)
    text = re.sub(r"`[^`\n]*`|\]\([^)]*\)|src=\"[^\"]*\"", "", text).replace("−", "-")
    missing = [t for t in re.findall(TRIPLE, text) if t not in sources]
    tokens = {t.lstrip("+-") for t in re.findall(DECIMAL, sources)}
    return missing + [t for t in re.findall(DECIMAL, re.sub(TRIPLE, "", text)) if t.lstrip("+-") not in tokens]


def test_every_number_in_the_readme_is_printed_by_the_report_and_a_changed_one_is_caught():
    readme = (HERE / "README.md").read_text()
    sources = "".join((HERE / "results" / name).read_text() for name in ("REPORT.md", "benchmark.md"))
    assert unsourced(readme, sources) == []
    triples = re.findall(TRIPLE, readme.replace("−", "-"))
    assert len(triples) >= 20
    for triple in triples[:: max(1, len(triples) // 8)]:  # a mean changed by hand in its last digit is caught
        mean = triple.split(" ")[0]
        changed = mean[:-1] + str((int(mean[-1]) + 1) % 10)
        assert unsourced(readme.replace(triple.replace("-", "−"), triple.replace(mean, changed)).replace(
            triple, triple.replace(mean, changed)), sources), triple


def test_the_readme_is_short_leads_with_results_and_its_tables_are_readable():
    readme = (HERE / "README.md").read_text().splitlines()
    assert len(readme) <= 170
    assert readme.index("## Results") < next(i for i, line in enumerate(readme) if line.startswith("QUICK=1")) < 60
    cells = [cell for line in readme if line.startswith("|") for cell in line.strip("|").split("|")]
    assert cells and max(len(cell.split()) for cell in cells) <= 40


def test_the_figures_say_what_they_show_and_without_matplotlib_the_report_says_how_to_get_them(
        sweep, capsys, tmp_path, monkeypatch):
    """Each figure's title names its data, length, seeds and precision; without matplotlib the report has one
    line saying how to draw them, and every table still."""
    lines = [made_up(c, 90.0 + ("--frozen" in c), precision="bf16")
             for c in listed(sweep, capsys, "expansion15", "recipe", SEEDS="0 1", RESULTS=str(tmp_path))]
    if HAS_MATPLOTLIB:
        titles = {}
        def save(fig, folder, name):
            titles[name] = fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()
            matplotlib.pyplot.close(fig)
        import matplotlib.pyplot
        monkeypatch.setattr(sweep, "save_figure", save)
        report_of(sweep, tmp_path, lines)
        assert titles["expansion_fashionmnist-15ep"] == "Accuracy against E: fashionmnist, 15 epochs, 2 seed(s), bf16"
        assert titles["length_fashionmnist"].endswith("fashionmnist, 2 seeds, bf16")
        (tmp_path / "fewer").mkdir()  # one run lacks seed 1: the title gives the range
        dropped = next(i for i, (_, line) in enumerate(lines) if line["seed"] == 1 and line["epochs"] == 15)
        report_of(sweep, tmp_path / "fewer", [(tmp_path / "fewer" / Path(path).name, line)
                                              for i, (path, line) in enumerate(lines) if i != dropped])
        assert titles["expansion_fashionmnist-15ep"] == "Accuracy against E: fashionmnist, 15 epochs, 1–2 seed(s), bf16"
        monkeypatch.undo()
    (tmp_path / "none").mkdir()
    monkeypatch.setattr(sweep, "pyplot", lambda: None)
    report = report_of(sweep, tmp_path / "none", [(tmp_path / "none" / Path(path).name, line) for path, line in lines])
    assert "No figures: matplotlib is not installed (`pip install matplotlib`" in report and "![" not in report
    assert table(report, "Fig. 4:", "15 epoch(s)")["128"]["test acc, frozen"] == "91.00 ± 0.00 (2)"
