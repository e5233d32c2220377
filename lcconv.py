"""
Learning with random convolutions: the LC-Block, the models it goes into, and the filter
analysis of Gavrikov & Keuper, "The Power of Linear Combinations: Learning with Random
Convolutions" (arXiv:2301.11360).

A k×k conv followed directly by a 1×1 conv is one k×k conv whose filters are linear
combinations (LCs) of the first conv's filters. So the k×k filters can stay frozen at their
random initialization while the 1×1 weights learn how to combine them. With E·c_out random
filters per layer (the LC expansion E), a frozen ResNet-LC-20-16x128 reaches 91.89% on
CIFAR-10, above the learnable ResNet-20-16 (91.60%, the paper's Table 1).

Contents, top to bottom: spatial-filter init -> LCConv2d -> spatial_conv (the factory every
model uses) -> resnet -> convmixer -> convert (any model) -> analysis.
"""
import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

INITS = ("kaiming_uniform", "kaiming_normal", "center")
INTERMEDIATES = ("none", "relu", "bn", "bn_relu")

# -----------------------------------------------------------------------------
# Spatial-filter initialization


@torch.no_grad()
def init_spatial_(weight, init="kaiming_uniform"):
    """Fill a conv weight (c_out, c_in/groups, kh, kw) in place with random filters.

    All three inits have the std of PyTorch's Conv2d default, s = 1/sqrt(3·fan_in) with
    fan_in = c_in/groups·kh·kw (paper, Appendix B: other distributions keep that std).
      kaiming_uniform: w ~ U[-√3·s, √3·s], i.i.d. (PyTorch's default and the paper's).
      kaiming_normal:  w ~ N(0, s²), i.i.d.
      center:          w[o, i, y, x] = z · s · g(y, x) / sqrt(mean(g²)),  z ~ N(0, 1) i.i.d.,
                       g(y, x) = exp(-((y - cy)² / σy² + (x - cx)² / σx²) / 2),
                       (cy, cx) the kernel centre, σy = kh/4, σx = kw/4.
        A radial Gaussian envelope: per-position variance s²·g²/mean(g²), so the layer's
        mean variance is s² while the centre gets exp(r²/σ²) times the variance of a
        position at distance r (35× the corners of a 3×3, 556× those of a 9×9). Our own
        hypothesis for the paper's open question; not from the paper.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    std = 1 / math.sqrt(3 * weight[0].numel())
    if init == "kaiming_uniform":
        return weight.uniform_(-math.sqrt(3) * std, math.sqrt(3) * std)
    if init == "kaiming_normal":
        return weight.normal_(0, std)
    kh, kw = weight.shape[-2:]
    y = (torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2) / (kh / 4)
    x = (torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2) / (kw / 4)
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2)  # (kh, kw)
    g = g / g.pow(2).mean().sqrt()
    return weight.normal_(0, std).mul_(g.to(weight))


# -----------------------------------------------------------------------------
# The LC-Block


class LCConv2d(nn.Module):
    """The paper's LC-Block: a k×k conv c_in -> c_out·E, then a 1×1 conv c_out·E -> c_out.

    Arguments and attributes follow nn.Conv2d; `padding=None` means 'same' for odd kernels.
    Where it goes beyond the paper's description:
    - forward() folds the block into ONE k×k conv with `combined_weight` (a 1×1 conv after a
      k×k conv is a k×k conv), so compute and activation memory do not grow with E;
      `forward_two_conv()` is the literal block. The two agree to float tolerance.
    - `groups` applies to both convs, so every group's filters combine only inside the group
      and the block folds into a grouped (depthwise when groups = c_in = c_out) conv.
    - a bias, if asked for, sits on the 1×1 conv, where it is the folded conv's bias.
    frozen=True keeps the k×k filters at their random init (no gradient, hence no weight
    decay or momentum); the 1×1 weights always learn. `intermediate` puts ReLU and/or BN
    between the convs (the paper's Table 3); the block is then no longer linear and runs as
    two convs.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None,
                 dilation=1, groups=1, bias=False, expansion=1, frozen=True,
                 init="kaiming_uniform", intermediate="none"):
        super().__init__()
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1 for an LCConv2d, got {expansion}")
        if intermediate not in INTERMEDIATES:
            raise ValueError(f"intermediate must be one of {', '.join(INTERMEDIATES)}, "
                             f"got {intermediate!r}")
        self.in_channels, self.out_channels, self.expansion = in_channels, out_channels, expansion
        maps = out_channels * expansion  # the random feature maps the 1×1 conv combines
        self.spatial = _conv2d(in_channels, maps, kernel_size, stride, padding, dilation, groups, bias=False)
        self.kernel_size, self.stride = self.spatial.kernel_size, self.spatial.stride
        self.padding, self.dilation, self.groups = self.spatial.padding, self.spatial.dilation, groups
        init_spatial_(self.spatial.weight, init)
        self.spatial.weight.requires_grad_(not frozen)
        self.intermediate = {"none": nn.Identity(), "relu": nn.ReLU(inplace=True), "bn": nn.BatchNorm2d(maps),
                             "bn_relu": nn.Sequential(nn.BatchNorm2d(maps), nn.ReLU(inplace=True))}[intermediate]
        self.combine = nn.Conv2d(maps, out_channels, 1, groups=groups, bias=bias)

    @property
    def frozen(self):
        return not self.spatial.weight.requires_grad

    @property
    def linear(self):
        return isinstance(self.intermediate, nn.Identity)

    @property
    def combined_weight(self):
        """The folded filters, (c_out, c_in/groups, kh, kw): the paper's "combined filters"."""
        g = self.groups
        spatial = self.spatial.weight.reshape(g, -1, self.spatial.weight[0].numel())  # (g, c_out·E/g, c_in/g·kh·kw)
        combine = self.combine.weight.reshape(g, self.out_channels // g, -1)  # (g, c_out/g, c_out·E/g)
        return torch.matmul(combine, spatial).reshape(self.out_channels, -1, *self.kernel_size)

    def forward(self, x):
        if not self.linear:
            return self.forward_two_conv(x)
        return F.conv2d(x, self.combined_weight, self.combine.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def forward_two_conv(self, x):
        x = self.spatial(x)  # (B, c_out·E, H', W'): E·c_out random feature maps
        x = self.intermediate(x)
        return self.combine(x)  # (B, c_out, H', W')

    @torch.no_grad()
    def to_conv2d(self):
        """An nn.Conv2d computing the same function (for deployment)."""
        if not self.linear:
            raise RuntimeError(f"an LC-Block with an intermediate {self.intermediate} is not "
                               "linear and does not fold into one conv")
        weight = self.combined_weight
        conv = _conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                       self.padding, self.dilation, self.groups, bias=self.combine.bias is not None)
        conv.to(weight).weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(self.combine.bias)
        return conv

    def extra_repr(self):
        return f"expansion={self.expansion}, frozen={self.frozen}"


def _conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias):
    """nn.Conv2d with 'same' padding for padding=None, and argument errors as ValueError."""
    kernel_size, dilation = _pair(kernel_size), _pair(dilation)
    if min(kernel_size) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                         f"must both be divisible by groups ({groups})")
    if padding is None:
        if not all(k % 2 for k in kernel_size):
            raise ValueError(f"padding=None ('same') needs an odd kernel_size, got {kernel_size}; "
                             "pass padding explicitly for even kernels")
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)


# -----------------------------------------------------------------------------
# The factory for every spatial conv of the models below


def spatial_conv(in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, expansion=0, frozen=False, init="kaiming_uniform",
                 intermediate="none"):
    """expansion=0: a plain nn.Conv2d (frozen or learnable); expansion >= 1: an LCConv2d.
    `frozen` freezes the filters; a bias keeps learning."""
    if expansion < 0:
        raise ValueError(f"expansion must be 0 (plain conv) or >= 1 (LC-Block), got {expansion}")
    if expansion >= 1:
        return LCConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                        groups, bias, expansion, frozen, init, intermediate)
    if intermediate != "none":
        raise ValueError(f"intermediate={intermediate!r} needs an LC-Block (expansion >= 1)")
    conv = _conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
    init_spatial_(conv.weight, init)
    conv.weight.requires_grad_(not frozen)
    return conv


# -----------------------------------------------------------------------------
# ResNet for CIFAR (He et al. 2016, Section 4.2): depth 6n+2, stages of W, 2W, 4W channels


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride, conv):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            # 1×1-conv shortcut: gives the paper's 272,474 parameters for ResNet-20-16
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet(depth=20, width=16, num_classes=10, in_channels=3, kernel_size=3, expansion=0,
           frozen=False, init="kaiming_uniform", intermediate="none"):
    """ResNet-{depth}-{width}; with expansion=E, ResNet-LC-{depth}-{width}xE (every spatial
    conv, the stem's too, is an LC-Block)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, ..., 260), got {depth}")
    conv = partial(spatial_conv, kernel_size=kernel_size, expansion=expansion, frozen=frozen,
                   init=init, intermediate=intermediate)
    layers = OrderedDict(stem=conv(in_channels, width), bn=nn.BatchNorm2d(width), relu=nn.ReLU(inplace=True))
    channels = width
    for stage in range(3):
        blocks = []
        for i in range((depth - 2) // 6):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(channels, width * 2**stage, stride, conv))
            channels = width * 2**stage
        layers[f"layer{stage + 1}"] = nn.Sequential(*blocks)
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(channels, num_classes))
    return nn.Sequential(layers)


# -----------------------------------------------------------------------------
# ConvMixer (Trockman & Kolter, "Patches Are All You Need?")


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def convmixer(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10, in_channels=3,
              expansion=0, frozen=False, init="kaiming_uniform", intermediate="none"):
    """ConvMixer-{dim}/{depth}. Its depthwise convs (and the patch stem when patch_size > 1)
    are spatial convs: frozen and/or LC-Blocks as asked; an LC depthwise conv stays
    depthwise. Convs keep PyTorch's default bias, as in the original."""
    conv = partial(spatial_conv, bias=True, expansion=expansion, frozen=frozen, init=init,
                   intermediate=intermediate)
    if patch_size > 1:
        stem = conv(in_channels, dim, patch_size, stride=patch_size, padding=0)
    else:
        stem = nn.Conv2d(in_channels, dim, 1)
    layers = [stem, nn.GELU(), nn.BatchNorm2d(dim)]
    for _ in range(depth):
        layers.append(nn.Sequential(
            Residual(conv(dim, dim, kernel_size, groups=dim), nn.GELU(), nn.BatchNorm2d(dim)),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# Any model: frozen random or LC spatial convs (the paper's Fig. 1)


def _is_spatial(module):
    return isinstance(module, LCConv2d) or (isinstance(module, nn.Conv2d) and module.weight[0, 0].numel() > 1)


def spatial_layers(model, prefix=""):
    """(name, module) of every spatial conv: LC-Blocks and convs with kernel area > 1 (not
    those inside an LC-Block), in registration order, which is the forward order for the
    models here and torchvision's."""
    for name, child in model.named_children():
        if _is_spatial(child):
            yield prefix + name, child
        else:
            yield from spatial_layers(child, prefix + name + ".")


def convert(model, expansion=0, frozen=True, init=None, intermediate="none"):
    """Replace, in place, every nn.Conv2d with kernel area > 1 by a fresh spatial_conv with
    the same channels, kernel, stride, padding, dilation, groups and bias: frozen random
    filters (expansion=0) or an LC-Block (expansion >= 1). init=None means PyTorch's default
    (kaiming_uniform), the paper's. LC-Blocks already there stay. Returns the model."""
    for name, conv in list(spatial_layers(model)):
        if isinstance(conv, LCConv2d):
            continue
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"convert supports numeric zero padding; {name} has "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        new = spatial_conv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                           expansion, frozen, init or "kaiming_uniform", intermediate)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new.to(conv.weight.device, conv.weight.dtype))
    return model


# -----------------------------------------------------------------------------
# Analysis


@torch.no_grad()
def combined_filters(model):
    """{name: (c_out, c_in/groups, kh, kw) filters} of every spatial conv, LC-Blocks folded,
    in forward order (see spatial_layers)."""
    return {name: (m.combined_weight if isinstance(m, LCConv2d) else m.weight).detach().float()
            for name, m in spatial_layers(model)}


def fve_threshold(n):
    """T(N): the normalising threshold of the filter variance entropy (fitted for 3×3)."""
    return 1.2618047 / (1 + math.exp(-0.88767525 * (math.log2(n) - 2.30436435))) - 0.31050834


@torch.no_grad()
def filter_variance_entropy(weight):
    """Filter variance entropy of one layer -> (raw H, normalised H / T(N)).

    The layer's N = c_out·c_in kernels as an (N, kh·kw) matrix, centred over N; s its
    singular values, r = s² / Σ s², H = -Σ r·log10 r. H ≈ log10(k²) for random filters,
    0 for one repeated pattern."""
    kernels = weight.detach().double().reshape(-1, weight.shape[-2] * weight.shape[-1])
    centred = kernels - kernels.mean(0)
    s = torch.linalg.svdvals(centred)
    if s.max() <= 1e-9 * kernels.norm():  # all kernels identical (up to rounding)
        return 0.0, 0.0
    r = s**2 / (s**2).sum()
    r = r[r > 0]
    h = -(r * torch.log10(r)).sum().item()
    return h, h / fve_threshold(len(kernels))


@torch.no_grad()
def spatial_variance(model):
    """(k, k) variance over all kernels of the model (the paper's Fig. 8b): each layer's
    combined filters divided by that layer's std, stacked, variance per position. Layers
    whose kernel shape is not the model's most common one (a patch stem) are left out."""
    filters = list(combined_filters(model).values())
    shapes = [f.shape[-2:] for f in filters]
    shape = max(set(shapes), key=shapes.count)
    kernels = [(f / f.std()).reshape(-1, *shape) for f in filters if f.shape[-2:] == shape]
    return torch.cat(kernels).var(0)


def count_parameters(model):
    """(learnable, total) number of parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
