"""Tests for lcconv.py (the layer, models, analysis) and train.py / experiments.sh (CPU only)."""
import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lcconv
from lcconv import LCConv2d


def assert_close(a, b, atol=1e-5, rtol=1e-4):
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs difference {(a - b).abs().max():.3g}"


# -----------------------------------------------------------------------------
# LCConv2d: the folded conv, the two-conv block and to_conv2d compute the same function


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("in_channels, out_channels, groups", [(4, 6, 1), (6, 4, 2), (8, 8, 8)])
@pytest.mark.parametrize("expansion", [1, 3])
def test_one_conv_two_conv_and_to_conv2d_agree(kernel_size, stride, in_channels, out_channels,
                                               groups, expansion):
    torch.manual_seed(0)
    block = LCConv2d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=True,
                     expansion=expansion)
    nn.init.normal_(block.combine.bias)
    x = torch.randn(2, in_channels, 11, 11)
    folded = block(x)
    assert_close(folded, block.forward_two_conv(x))
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
def test_intermediate_op_runs_two_convs_and_does_not_fold(intermediate):
    torch.manual_seed(0)
    block = LCConv2d(4, 4, 3, expansion=2, intermediate=intermediate)
    x = torch.randn(8, 4, 6, 6)
    assert_close(block(x), block.forward_two_conv(x))
    assert not torch.allclose(block(x), F.conv2d(x, block.combined_weight, padding=1), atol=1e-3)
    with pytest.raises(RuntimeError, match="not linear"):
        block.to_conv2d()


# -----------------------------------------------------------------------------
# Frozen means frozen: no gradient, so weight decay and momentum leave the filters alone


@pytest.mark.parametrize("expansion", [0, 4])
def test_frozen_filters_are_bit_identical_after_training_steps(expansion):
    torch.manual_seed(0)
    model = lcconv.resnet(depth=8, width=4, expansion=expansion, frozen=True)
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
    model = lcconv.resnet(depth, width, kernel_size=kernel_size, expansion=expansion, frozen=True)
    assert lcconv.count_parameters(model) == resnet_parameters(depth, width, kernel_size, expansion)


def test_convmixer_parameter_count():
    dim, depth, k, p, e = 32, 3, 5, 2, 4
    model = lcconv.convmixer(dim, depth, k, p, num_classes=10, expansion=e, frozen=True)
    stem = dim * e * 3 * p * p, dim * e * dim + dim  # (frozen, learnable): spatial; 1×1 + bias
    depthwise = dim * e * k * k, dim * e + dim  # grouped 1×1: each channel combines its own E maps
    other = 2 * dim + depth * (2 * dim + dim * dim + dim + 2 * dim) + dim * 10 + 10
    learnable = stem[1] + depth * depthwise[1] + other
    assert lcconv.count_parameters(model) == (learnable, learnable + stem[0] + depth * depthwise[0])


# -----------------------------------------------------------------------------
# Spatial-filter inits


def test_default_init_is_pytorchs():
    torch.manual_seed(0)
    block = LCConv2d(64, 32, 3, expansion=4)
    w, fan_in = block.spatial.weight, 64 * 9
    assert w.abs().max() <= 1 / math.sqrt(fan_in)
    assert w.abs().max() > 0.99 / math.sqrt(fan_in)
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.02)
    reference = nn.Conv2d(64, 128, 3)  # PyTorch's own default, same bound
    assert reference.weight.abs().max() <= 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("init", ["kaiming_normal", "center"])
@pytest.mark.parametrize("kernel_size", [3, 9])
def test_other_inits_keep_the_default_std(init, kernel_size):
    torch.manual_seed(0)
    w = lcconv.spatial_conv(32, 64, kernel_size, init=init).weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * 32 * kernel_size**2), rel=0.03)
    assert w.mean().abs() < 0.05 * w.std()


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_center_init_puts_variance_in_the_centre(kernel_size):
    torch.manual_seed(0)
    w = lcconv.spatial_conv(128, 128, kernel_size, init="center").weight.reshape(-1, kernel_size, kernel_size)
    variance = w.var(0)
    c, sigma = kernel_size // 2, kernel_size / 4
    expected = math.exp((2 * c**2) / sigma**2)  # centre / corner = exp(r² / σ²)
    assert (variance[c, c] / variance[0, 0]).item() == pytest.approx(expected, rel=0.1)
    assert variance[c, c] == variance.max()
    uniform = lcconv.spatial_conv(128, 128, kernel_size).weight.reshape(-1, kernel_size, kernel_size).var(0)
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
    model = lcconv.resnet(depth=8, width=4, expansion=2)
    filters = lcconv.combined_filters(model)
    assert list(filters) == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                             "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    assert_close(filters["layer2.0.conv1"], model.layer2[0].conv1.combined_weight)
    assert filters["layer3.0.conv2"].shape == (16, 16, 3, 3)


def test_spatial_variance_is_uniform_for_iid_filters_and_centred_for_center_init():
    torch.manual_seed(0)
    for model in [lcconv.resnet(kernel_size=5), lcconv.resnet(kernel_size=5, expansion=4, frozen=True),
                  lcconv.convmixer(dim=256, depth=4, kernel_size=7, expansion=2)]:
        variance = lcconv.spatial_variance(model)
        assert variance.shape == (model_kernel(model),) * 2
        assert (variance.std() / variance.mean()).item() < 0.06  # sampling noise only
    centred = lcconv.spatial_variance(lcconv.resnet(kernel_size=5, init="center"))
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

MODES = {"learnable": dict(), "frozen": dict(frozen=True), "lc": dict(expansion=2),
         "lc_frozen": dict(expansion=2, frozen=True), "lc_bn_relu": dict(expansion=2, intermediate="bn_relu"),
         "center": dict(expansion=2, frozen=True, init="center")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("arch", ["resnet", "convmixer"])
def test_every_model_mode_and_kernel_size_runs(arch, kernel_size, mode):
    torch.manual_seed(0)
    if arch == "resnet":
        model = lcconv.resnet(depth=8, width=4, num_classes=7, in_channels=1, kernel_size=kernel_size, **MODES[mode])
    else:
        model = lcconv.convmixer(dim=8, depth=2, kernel_size=kernel_size, num_classes=7, in_channels=1, **MODES[mode])
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7)
    out.sum().backward()
    for name, layer in lcconv.spatial_layers(model):
        weight = layer.spatial.weight if isinstance(layer, LCConv2d) else layer.weight
        frozen = MODES[mode].get("frozen", False)
        assert (weight.grad is None) == frozen, name
        assert isinstance(layer, LCConv2d) == ("expansion" in MODES[mode])


def test_state_dict_round_trips():
    torch.manual_seed(0)
    a = lcconv.resnet(depth=8, width=4, expansion=3, frozen=True, intermediate="bn")
    torch.manual_seed(1)
    b = lcconv.resnet(depth=8, width=4, expansion=3, frozen=True, intermediate="bn")
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
# Bad arguments say what is allowed


@pytest.mark.parametrize("build, message", [
    (lambda: LCConv2d(4, 4, 3, expansion=0), "expansion must be >= 1"),
    (lambda: lcconv.spatial_conv(4, 4, 3, expansion=-1), "expansion must be 0"),
    (lambda: lcconv.resnet(expansion=-2), "expansion must be 0"),
    (lambda: LCConv2d(4, 4, 0), "kernel_size must be >= 1"),
    (lambda: lcconv.resnet(kernel_size=0), "kernel_size must be >= 1"),
    (lambda: LCConv2d(4, 4, 4), "odd kernel_size"),
    (lambda: lcconv.convmixer(kernel_size=6), "odd kernel_size"),
    (lambda: LCConv2d(6, 4, 3, groups=4), "divisible by groups"),
    (lambda: lcconv.spatial_conv(4, 6, 3, groups=4), "divisible by groups"),
    (lambda: LCConv2d(4, 4, 3, init="xavier"), "init must be one of kaiming_uniform, kaiming_normal, center"),
    (lambda: lcconv.resnet(init="orthogonal"), "init must be one of"),
    (lambda: LCConv2d(4, 4, 3, intermediate="gelu"), "intermediate must be one of none, relu, bn, bn_relu"),
    (lambda: lcconv.resnet(intermediate="relu"), "needs an LC-Block"),
    (lambda: lcconv.resnet(depth=21), r"depth must be 6n\+2"),
    (lambda: lcconv.resnet(depth=2), r"depth must be 6n\+2"),
    (lambda: lcconv.convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding="same"))), "numeric zero padding"),
])
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -----------------------------------------------------------------------------
# train.py: end to end on a tiny synthetic dataset, on real Fashion-MNIST, resume, bad input

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.error  # noqa: E402
from pathlib import Path  # noqa: E402

import train  # noqa: E402

RESULT_KEYS = ["test_acc", "train_acc", "fgsm_acc", "pgd_acc", "params_learnable", "params_total", "fve_first",
               "fve_last", "fve_first_raw", "fve_last_raw", "epoch_time_s", "peak_mem_mb", "spatial_variance",
               "train_loss", "device", "torch", "dataset", "model", "expansion", "frozen", "seed", "epochs"]


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


def tiny_args(data_dir, tmp_path, *extra):
    return ["--dataset", "fashionmnist", "--data-dir", str(data_dir), "--depth", "8", "--width", "4",
            "--batch-size", "64", "--epochs", "2", "--out", str(tmp_path / "results.jsonl"), *extra]


def results(tmp_path):
    path = tmp_path / "results.jsonl"
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
    assert len(result["spatial_variance"]) == 3
    assert (tmp_path / "figs" / "filters.png").stat().st_size > 100
    assert (tmp_path / "figs" / "spatial_variance.png").stat().st_size > 50
    assert torch.load(tmp_path / "run.pt", weights_only=False)["epoch"] == 2
    # --skip-finished recognises the run by its config and adds nothing
    train.main(argv + ["--skip-finished"])
    assert len(results(tmp_path)) == 1


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    argv = tiny_args(tiny_data, tmp_path, "--epochs", "3", "--expansion", "2", "--frozen")
    train.main(argv)
    [uninterrupted] = results(tmp_path)

    checkpoint = str(tmp_path / "run.pt")
    train_epoch = train.train_epoch

    def interrupted(*args):
        if args[4] == 2:  # epoch index
            raise KeyboardInterrupt
        return train_epoch(*args)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv + ["--checkpoint", checkpoint])
    assert len(results(tmp_path)) == 1 and torch.load(checkpoint, weights_only=False)["epoch"] == 2
    monkeypatch.setattr(train, "train_epoch", train_epoch)
    train.main(argv + ["--checkpoint", checkpoint])
    resumed = results(tmp_path)[1]
    for key in ["test_acc", "train_acc", "fgsm_acc", "train_loss", "fve_first", "fve_last", "spatial_variance"]:
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


def test_nan_loss_stops_the_run_with_a_message(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(tiny_args(tiny_data, tmp_path, "--lr", "1e30"))
    assert "loss became" in str(exit.value.code) and "--lr" in str(exit.value.code)
    assert not (tmp_path / "results.jsonl").exists()


def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--model", "vgg16"], "invalid choice: 'vgg16'"),
    (["--expansion", "-1"], "--expansion must be >= 0"),
    (["--kernel-size", "0"], "--kernel-size must be odd and >= 1"),
    (["--kernel-size", "4"], "--kernel-size must be odd and >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--depth", "21"], r"depth must be 6n\+2"),
    (["--model", "resnet18", "--width", "4"], "--(depth|width) does not apply to --model resnet18"),
    (["--intermediate", "relu"], "needs an LC-Block"),
    (["--dataset", "cifar10"], "cannot load cifar10 .* connect to the internet"),
    (["--checkpoint", "CORRUPT"], "cannot read checkpoint .* delete it"),
    (["--checkpoint", "OTHER", "--seed", "1"], "from another config .*differs in seed"),
    (["--out", "DIR"], "is a directory"),
])
def test_bad_input_one_line_and_nothing_written(tiny_data, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "_check_integrity", lambda self: False)
    (tmp_path / "CORRUPT").write_bytes(b"not a checkpoint")
    (tmp_path / "DIR").mkdir()
    other = tmp_path / "OTHER"
    torch.save({"config": train.recipe(train.parse_args(tiny_args(tiny_data, tmp_path))), "epoch": 1}, other)
    before = other.read_bytes()
    extra = [str(tmp_path / a) if a in ("CORRUPT", "OTHER", "DIR") else a for a in extra]
    data_dir = tmp_path / "empty" if "cifar10" in extra else tiny_data
    with pytest.raises(SystemExit) as exit:
        train.main(tiny_args(data_dir, tmp_path, *extra))
    error = str(exit.value.code) if isinstance(exit.value.code, str) else capsys.readouterr().err
    assert exit.value.code != 0 and error.count("\n") <= 1 and "Traceback" not in error
    assert re.search(message, error), error
    assert not (tmp_path / "results.jsonl").exists() and other.read_bytes() == before


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--epochs", "0", "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "--epochs must be >= 1" in run.stderr and not (tmp_path / "r.jsonl").exists()


# -----------------------------------------------------------------------------
# experiments.sh: every group lists valid commands; a tiny sweep runs, reports, skips, survives failures

GROUPS = ["table1", "expansion", "width", "depth", "kernel", "ablation", "offtheshelf", "convmixer", "init"]
HERE = Path(__file__).parent


def experiments(*args, **env):
    return subprocess.run(["bash", "experiments.sh", *args], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, **env})


@pytest.mark.parametrize("group", GROUPS)
def test_list_prints_valid_train_commands_for_every_group(group):
    listed = experiments("--list", group)
    assert listed.returncode == 0, listed.stderr
    commands = listed.stdout.splitlines()
    assert len(commands) >= 8 and len(set(commands)) == len(commands)
    configs = set()
    for command in commands:
        program, script, *argv = command.split()
        assert (program, script) == ("python", "train.py")
        args = train.parse_args(argv)  # exits on any flag train.py would reject
        assert args.skip_finished and args.checkpoint and args.seed in (0, 1, 2, 3) and args.epochs == 75
        configs.add(json.dumps(train.recipe(args), sort_keys=True))
    assert len(configs) == len(commands)  # no run listed twice


def test_list_default_is_every_group_and_bad_group_fails():
    everything = experiments("--list").stdout.splitlines()
    assert len(everything) == sum(len(experiments("--list", g).stdout.splitlines()) for g in GROUPS)
    quick = experiments("--list", QUICK="1").stdout.splitlines()
    assert quick and all("--dataset fashionmnist" in c and "--seed 0" in c and "--train-subset" in c for c in quick)
    bad = experiments("--list", "kernels")
    assert bad.returncode != 0 and "unknown group 'kernels'" in bad.stderr


def test_tiny_sweep_reports_skips_finished_runs_and_survives_a_failure(tiny_data, tmp_path):
    env = dict(DATASETS="fashionmnist", SEEDS="0", EPOCHS="1", DATA_DIR=str(tiny_data),
               RESULTS=str(tmp_path / "results"), TRAIN_ARGS="--train-subset 256")
    commands = experiments("--list", "table1", **env).stdout.splitlines()
    assert len(commands) == 3
    broken = Path(commands[1].split("--checkpoint ")[1].split()[0])  # a corrupt checkpoint fails this run
    broken.parent.mkdir(parents=True)
    broken.write_text("garbage")

    first = experiments("table1", GPUS="0 1", **env)  # two at a time
    assert first.returncode == 1 and "FAILED" in first.stdout and "1 run(s) failed" in first.stderr
    assert "GPU 0: " in first.stdout and "GPU 1: " in first.stdout
    lines = (tmp_path / "results" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2  # the other two ran
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "Table 1" in report and "93.65 ± 0.18" in report and "(1)" in report

    broken.unlink()
    second = experiments("table1", **env)
    assert second.returncode == 0 and "[1/1]" in second.stdout  # only the failed run again
    third = experiments("table1", **env)
    assert third.returncode == 0 and "[1/" not in third.stdout  # nothing new
    assert len((tmp_path / "results" / "results.jsonl").read_text().splitlines()) == 3


def test_report_has_every_table_and_figure(tmp_path):
    """The report from made-up results of every group (one seed): all sections, paper numbers, links."""
    env = dict(SEEDS="0 1", RESULTS=str(tmp_path))
    lines = []
    for i, command in enumerate(experiments("--list", **env).stdout.splitlines()):
        args = train.parse_args(command.split()[2:])
        k = args.kernel_size or 3
        variance = [[1.0 + (y == x == k // 2) for x in range(k)] for y in range(k)]
        lines.append(json.dumps(dict(vars(args), test_acc=80 + i % 7, train_acc=90.0, fgsm_acc=70.0, pgd_acc=None,
                                     params_learnable=1000 + i, params_total=2000, fve_first=1.0, fve_last=0.9,
                                     fve_first_raw=0.9, fve_last_raw=0.8, spatial_variance=variance)))
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    run = experiments("report", **env)
    assert run.returncode == 0, run.stderr
    report = (tmp_path / "REPORT.md").read_text()
    for heading in ["Table 1", "Fig. 4 and 5", "Fig. 6a", "Fig. 6b", "Fig. 7-9", "Table 3", "Fig. 1",
                    "ConvMixer-256/8 on cifar10, kernel size", "centre-weighted init for ResNet-LC-20-16",
                    "centre-weighted init for ConvMixer-256/8"]:
        assert heading in report, heading
    assert "91.89 ± 0.10" in report and "94.72 ± 0.16" in report  # Tables 1 and 3 of the paper
    assert "(2)" in report and "[filters](figures/" in report and "centre/ring 2.00" in report
