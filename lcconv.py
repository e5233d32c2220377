"""Learning with random convolutions: the LC-Block of Gavrikov & Keuper, "The Power of Linear
Combinations: Learning with Random Convolutions" (arXiv:2301.11360).

A k×k conv followed directly by a 1×1 conv is one k×k conv whose filters are linear combinations
(LCs) of the first conv's filters: the k×k filters can stay frozen at their random init while the 1×1
weights learn to combine them. With E·c_out random filters a layer (the LC expansion E), a frozen
ResNet-LC-20-16x128 reaches 91.89% on CIFAR-10, above the learnable ResNet-20-16 (91.60%, Table 1).

Top to bottom: the LC-Block, random filters, ResNet and ConvMixer, convert (the one way in) and fold
(the one way out), the paper's analysis, and why it trains (beyond the paper): a frozen LC-Block trains
as one conv whose gradient is multiplied by the fixed SᵀS of its random filters S (the preconditioned
form); for large E that is a learning rate (limit), under BatchNorm exactly a smaller init (init)."""
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

# -----------------------------------------------------------------------------
# The LC-Block


_INTERMEDIATE_OPS = {"none": lambda maps: nn.Identity(), "relu": lambda maps: nn.ReLU(inplace=True),
                     "bn": nn.BatchNorm2d,
                     "bn_relu": lambda maps: nn.Sequential(nn.BatchNorm2d(maps), nn.ReLU(inplace=True))}
INTERMEDIATES = tuple(_INTERMEDIATE_OPS)


class LCConv2d(nn.Module):
    """The paper's LC-Block: a k×k conv c_in -> c_out·E, then a 1×1 conv c_out·E -> c_out.

    Arguments and attributes follow nn.Conv2d; `padding=None` means 'same' for odd kernels. frozen=True
    keeps the k×k filters at their random init (no gradient: no weight decay or momentum); the 1×1
    weights always learn. `intermediate` puts ReLU and/or BN between the convs (Table 3). Beyond the
    paper: a linear block runs as ONE k×k conv with `combined_weight`, so its cost does not grow with E;
    `groups` applies to both convs, so it folds into a grouped (or depthwise) conv; a bias sits on the 1×1."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, expansion=1, frozen=True, init="kaiming_uniform", intermediate="none"):
        super().__init__()
        padding = _check_conv(in_channels, out_channels, kernel_size, padding, dilation)
        _check_count("expansion", expansion, " for an LC-Block")
        if intermediate not in INTERMEDIATES:
            raise ValueError(f"intermediate must be one of {', '.join(INTERMEDIATES)}, got {intermediate!r}")
        self.in_channels, self.out_channels, self.expansion = in_channels, out_channels, expansion
        maps = out_channels * expansion  # the random feature maps the 1×1 conv combines
        self.spatial = nn.Conv2d(in_channels, maps, kernel_size, stride, padding, dilation, groups, bias=False)
        self.kernel_size, self.stride = self.spatial.kernel_size, self.spatial.stride
        self.padding, self.dilation, self.groups = self.spatial.padding, self.spatial.dilation, groups
        init_filters_(self.spatial.weight, init)
        self.spatial.weight.requires_grad_(not frozen)
        self.intermediate = _INTERMEDIATE_OPS[intermediate](maps)
        self.combine = nn.Conv2d(maps, out_channels, 1, groups=groups, bias=bias)

    def two_convs(self, x):
        """The block as the paper draws it."""
        x = self.spatial(x)  # (B, c_out·E, H', W'): E·c_out random feature maps
        x = self.intermediate(x)  # Table 3: ReLU and/or BN in between (none by default)
        return self.combine(x)  # (B, c_out, H', W'): their learned linear combinations

    def forward(self, x):
        if not self.linear:
            return self.two_convs(x)
        # a 1×1 conv after a k×k conv is one k×k conv: the same function at a cost that does not grow with E
        return F.conv2d(x, self.combined_weight, self.combine.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    @property
    def combined_weight(self):
        """The folded filters K = C·S per group, (c_out, c_in/groups, kh, kw): the paper's "combined filters"."""
        g, weight = self.groups, self.spatial.weight
        # S in its memory order, (m, c_in, kh, kw) or in a channels_last model (m, kh, kw, c_in), so
        # that its m·d frozen numbers are not copied at every step
        channels_last = weight.is_contiguous(memory_format=torch.channels_last)
        filters = weight.permute(0, 2, 3, 1) if channels_last else weight
        spatial = filters.reshape(g, -1, weight[0].numel())  # S: (g, m, d)
        combine = self.combine.weight.reshape(g, self.out_channels // g, -1)  # C: (g, c_out/g, m)
        shape = list(filters.shape)
        shape[0] = self.out_channels
        combined = torch.matmul(combine, spatial).reshape(shape)
        return combined.permute(0, 3, 1, 2) if channels_last else combined

    @property
    def frozen(self):
        return not self.spatial.weight.requires_grad

    @property
    def linear(self):
        return isinstance(self.intermediate, nn.Identity)

    @torch.no_grad()
    def to_conv2d(self):
        """An nn.Conv2d computing the same function (for deployment)."""
        if not self.linear:
            raise RuntimeError(f"an LC-Block with an intermediate {self.intermediate} is not "
                               "linear and does not fold into one conv")
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.combine.bias is not None, device="meta")
        return _filled(conv, self.combined_weight, self.combine.bias)

    @torch.no_grad()
    def preconditioner(self):
        """P = SᵀS per group, (groups, d, d) with d = c_in/groups·kh·kw (beyond the paper: "Why it trains")."""
        spatial = self.spatial.weight.reshape(self.groups, -1, self.spatial.weight[0].numel())
        return spatial.transpose(1, 2) @ spatial

    @torch.no_grad()
    def to_preconditioned(self):
        """The PreconditionedConv2d that trains exactly as this frozen, linear block."""
        if not (self.frozen and self.linear):
            raise RuntimeError("only a frozen LC-Block without an intermediate op has a preconditioned form")
        conv = PreconditionedConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                    self.padding, self.dilation, self.groups, self.combine.bias is not None,
                                    self.expansion, device="meta")
        return _filled(conv, self.combined_weight, self.combine.bias, self.preconditioner())

    def extra_repr(self):
        return f"expansion={self.expansion}, frozen={self.frozen}"


def _check_conv(in_channels, out_channels, kernel_size, padding, dilation):
    """Checks what nn.Conv2d lets through; -> padding, None meaning 'same' (odd kernels)."""
    _check_count("in_channels", in_channels)
    _check_count("out_channels", out_channels)
    kernel_size, dilation = _pair(kernel_size), _pair(dilation)
    if min(kernel_size) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    if padding is None:
        if not all(k % 2 for k in kernel_size):
            raise ValueError(f"padding=None ('same') needs an odd kernel_size, got {kernel_size}; "
                             "pass padding explicitly for even kernels")
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))
    return padding


def _check_count(name, value, what=""):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{what}, got {value!r}")


@torch.no_grad()
def _filled(conv, weight, bias, preconditioner=None):
    """conv (built on the meta device, which draws no random numbers) materialised on
    weight's device and filled with copies of weight, bias and preconditioner."""
    conv = conv.to_empty(device=weight.device).to(weight.dtype)
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)
    if preconditioner is not None:
        conv.preconditioner.copy_(preconditioner)
    return conv


# -----------------------------------------------------------------------------
# Random filters: PyTorch's default (the paper's), a normal one of the same std (Appendix B),
# `center`, our own test of the paper's open question, and N(0, Σ) for a given spatial covariance Σ


INITS = ("kaiming_uniform", "kaiming_normal", "center")  # or a (k², k²) tensor Σ


def init_std(shape, init="kaiming_uniform"):
    """The std of each entry of a random conv weight of `shape` (c_out, c_in/groups, kh, kw), as a (kh, kw)
    float64 tensor: on average PyTorch's default s = 1/sqrt(3·d), d = c_in/groups·kh·kw (Appendix B).
    `center` scales it by g/sqrt(mean(g²)), g a radial Gaussian of σ = k/4: 35× the corners' variance at
    the centre of a 3×3, 556× for a 9×9. A tensor Σ scales it by sqrt(diag(Σ) / mean(diag(Σ)))."""
    kh, kw = shape[-2:]
    std = torch.full((kh, kw), 1 / math.sqrt(3 * math.prod(shape[1:])), dtype=torch.float64, device="cpu")
    if isinstance(init, torch.Tensor):
        variance = _checked_covariance(init, kh * kw).diagonal()
        return std * (variance / variance.mean()).sqrt().reshape(kh, kw)
    _check_init(init)
    if init != "center":
        return std
    y, x = [(torch.arange(k, dtype=torch.float64, device="cpu") - (k - 1) / 2) / (k / 4) for k in (kh, kw)]
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2)
    return std * g / g.pow(2).mean().sqrt()


def kernel_root(shape, init="kaiming_uniform"):
    """B, (kh·kw, kh·kw) float64, with B·Bᵀ the covariance of one kernel of a random conv weight of `shape`
    (kernels are independent): diag(init_std) for a named init, for Σ its symmetric square root scaled
    to the default's std, so that only Σ's shape matters."""
    std = init_std(shape, init).reshape(-1)
    if not isinstance(init, torch.Tensor):
        return torch.diag(std)
    eigenvalues, vectors = torch.linalg.eigh(init.double().cpu())
    root = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T  # Σ^½
    return root * (std.square().mean() / init.double().diagonal().mean()).sqrt().item()


@torch.no_grad()
def init_filters_(weight, init="kaiming_uniform"):
    """Fill a conv weight in place with independent random filters of std init_std: kaiming_uniform
    U[-√3·s, √3·s] (PyTorch's default, the paper's), kaiming_normal N(0, s²), center N(0, init_std²),
    a tensor Σ each kernel N(0, B·Bᵀ) (kernel_root)."""
    if isinstance(init, torch.Tensor):
        root = kernel_root(weight.shape, init).to(weight)
        kernels = weight.normal_(0, 1).view(-1, len(root)) @ root  # (c_out·c_in/groups, kh·kw)
        return weight.copy_(kernels.view_as(weight))
    std = init_std(weight.shape, init)
    if init == "kaiming_uniform":
        bound = math.sqrt(3) * std[0, 0].item()
        return weight.uniform_(-bound, bound)
    return weight.normal_(0, 1).mul_(std.to(weight))


def _check_init(init):
    if isinstance(init, torch.Tensor):
        _checked_covariance(init)
    elif init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)} or a (k², k²) covariance tensor, got {init!r}")


def _checked_covariance(sigma, size=None):
    """sigma, float64, if it is a finite, symmetric, positive semi-definite (size, size) matrix other than 0
    (up to rounding), else a ValueError saying which it is not."""
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1] or size not in (None, sigma.shape[0]):
        want = f"({size}, {size}), one entry per pair of kernel positions" if size else "square"
        raise ValueError(f"a covariance init must be {want}; got shape {tuple(sigma.shape)}")
    sigma = sigma.double().cpu()
    if not sigma.isfinite().all() or not torch.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
        raise ValueError("a covariance init must be a finite symmetric matrix")
    eigenvalues = torch.linalg.eigvalsh(sigma)
    if eigenvalues[0] < -1e-4 * eigenvalues[-1].abs() or eigenvalues[-1] <= 0:
        raise ValueError(f"a covariance init must be positive semi-definite and not zero; its "
                         f"smallest eigenvalue is {eigenvalues[0]:.3g}, its largest {eigenvalues[-1]:.3g}")
    return sigma


# -----------------------------------------------------------------------------
# ResNet for CIFAR (He et al. 2016, Section 4.2): depth 6n+2, stages of W, 2W, 4W channels


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride, kernel_size):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False)
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


def resnet(depth=20, width=16, num_classes=10, in_channels=3, kernel_size=3):
    """ResNet-{depth}-{width} with k×k convs (odd k). convert() makes it ResNet-LC-{depth}-{width}xE:
    every spatial conv, the stem's too, an LC-Block. Every spatial conv feeds a BatchNorm."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 26, ..., 260), got {depth}")
    _check_conv(in_channels, width, kernel_size, None, 1)
    layers = OrderedDict(stem=nn.Conv2d(in_channels, width, kernel_size, 1, kernel_size // 2, bias=False),
                         bn=nn.BatchNorm2d(width), relu=nn.ReLU(inplace=True))
    channels = width
    for stage in range(3):
        blocks = []
        for i in range((depth - 2) // 6):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(channels, width * 2**stage, stride, kernel_size))
            channels = width * 2**stage
        layers[f"layer{stage + 1}"] = nn.Sequential(*blocks)
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(channels, num_classes))
    return nn.Sequential(layers)


# -----------------------------------------------------------------------------
# ConvMixer (Trockman & Kolter, "Patches Are All You Need?")


class Residual(nn.Sequential):
    def forward(self, x):
        out = x
        for layer in self:  # a loop rather than super().forward(), which TorchScript cannot compile
            out = layer(out)
        return x + out


def convmixer(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10, in_channels=3):
    """ConvMixer-{dim}/{depth}: patch stem, then depth × [residual depthwise k×k conv, 1×1 conv].
    Convs keep PyTorch's default bias, as in the original. Its spatial convs are the
    depthwise convs and the patch stem when patch_size > 1; a GELU sits between each and its BN."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not isinstance(patch_size, int) or not 1 <= patch_size <= 32:
        raise ValueError(f"patch_size must be in 1..32 (the images are 32×32), got {patch_size}")
    _check_conv(in_channels, dim, kernel_size, None, 1)
    layers = [nn.Conv2d(in_channels, dim, patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim)]
    for _ in range(depth):
        layers.append(nn.Sequential(
            Residual(nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim), nn.GELU(),
                     nn.BatchNorm2d(dim)),
            nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim)))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, num_classes)]
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# Any model: the one way in (convert) and the one way out (fold)


def _is_spatial(module):
    return isinstance(module, LCConv2d) or (isinstance(module, nn.Conv2d) and module.weight[0, 0].numel() > 1)


def spatial_layers(model, prefix=""):
    """(name, module) of every spatial conv: LC-Blocks and convs with kernel area > 1 (not
    those inside an LC-Block), in registration order, which is the forward order for the
    models here and torchvision's. A module shared by two parents comes once per parent."""
    if not prefix and _is_spatial(model):
        yield "", model
        return
    for name, child in model.named_children():
        if _is_spatial(child):
            yield prefix + name, child
        else:
            yield from spatial_layers(child, prefix + name + ".")


def _replace(model, new_module):
    """Replace, in place, every spatial conv of model by new_module(name, conv) where that is not
    None, a shared conv once (it stays shared); -> the model, or its replacement if model is one."""
    replaced = {}
    for name, conv in list(spatial_layers(model)):
        if id(conv) not in replaced:
            replaced[id(conv)] = new_module(name or type(model).__name__, conv) or conv
        if not name:
            return replaced[id(conv)]
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, replaced[id(conv)])
    return model


def _conv_arguments(name, conv):
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"only numeric zero padding is supported; {name} has "
                         f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None)


FORMS = ("block", "preconditioned", "limit", "init")


def convert(model, expansion=0, frozen=True, init="kaiming_uniform", intermediate="none", form="block"):
    """Replace, in place, every plain nn.Conv2d with kernel area > 1 by a fresh random one of the same
    shape, stride, padding, dilation, groups and bias: a plain conv (expansion=0; frozen or learnable) or
    an LC-Block of that expansion, its filters drawn from init. LC layers already there stay. A conv
    subclass with its own forward ('same' padding, weight standardisation...) or a padding other than
    numeric zeros is refused by a ValueError before any layer is replaced. A frozen linear LC-Block
    also comes in forms that train like it at a plain conv's cost ("Why it trains"): "preconditioned"
    (exactly, in distribution for Gaussian filters), "limit" (m ≫ d) or "init" (that limit under BN).
    Returns the model (the new conv, if model itself is one)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if expansion != 0:
        _check_count("expansion", expansion, " for an LC-Block")
    elif intermediate != "none":
        raise ValueError(f"intermediate={intermediate!r} needs an LC-Block (expansion >= 1)")
    _check_init(init)  # a bad init fails here, before any layer is replaced
    if form != "block" and not (expansion and frozen and intermediate == "none"):
        raise ValueError(f"form={form!r} needs a frozen LC-Block without intermediate op (expansion >= 1, frozen=True)")
    if form == "init" and not (isinstance(init, str) and init != "center"):
        what = repr(init) if isinstance(init, str) else "a covariance"
        raise ValueError(f"form='init' needs an i.i.d. init: under init={what} the limit's P is not α·I but a "
                         "learning rate per kernel position, not an initialisation (use form='limit')")
    arguments = {}  # of every conv to replace, all checked first: a refused model stays as it was
    for name, conv in spatial_layers(model):
        if not isinstance(conv, (LCConv2d, PreconditionedConv2d)):  # the LC layers stay
            name, cls = name or type(model).__name__, type(conv)
            if (cls.forward, cls._conv_forward) != (nn.Conv2d.forward, nn.Conv2d._conv_forward):
                raise ValueError(f"{name} is a {cls.__name__}, an nn.Conv2d subclass with its own forward; "
                                 "convert replaces plain nn.Conv2d only (replace it by nn.Conv2d first)")
            arguments[id(conv)] = _conv_arguments(name, conv)
            if isinstance(init, torch.Tensor) and conv.weight[0, 0].numel() != len(init):
                raise ValueError(f"{name} has {'×'.join(map(str, conv.kernel_size))} kernels, the covariance "
                                 f"init is {len(init)}×{len(init)}: one row per position of a kernel")

    def new_module(name, conv):
        if id(conv) not in arguments:
            return None
        args = arguments[id(conv)]
        if form == "preconditioned":
            new = _preconditioned_lc_block(args, expansion, init)
        elif form in ("limit", "init"):
            new = _lc_limit_conv(args, expansion, init, as_init=form == "init")
        elif expansion:
            new = LCConv2d(*args, expansion, frozen, init, intermediate)
        else:
            new = nn.Conv2d(*args)
            init_filters_(new.weight, init)
            new.weight.requires_grad_(not frozen)
        return new.to(conv.weight.device, conv.weight.dtype)
    return _replace(model, new_module)


def fold(model):
    """For deployment: replace, in place, every linear LC-Block (and PreconditionedConv2d) by the
    nn.Conv2d computing the same function (as RepVGG does); a block with an intermediate op stays.
    Returns the model (the conv, if model itself is a block)."""
    def new_module(name, conv):
        if isinstance(conv, LCConv2d) and conv.linear:
            return conv.to_conv2d()
        if isinstance(conv, PreconditionedConv2d):
            return _filled(nn.Conv2d(*_conv_arguments(name, conv), device="meta"), conv.weight.detach(), conv.bias)
        return None
    return _replace(model, new_module)


# -----------------------------------------------------------------------------
# The paper's analysis


@torch.no_grad()
def combined_filters(model):
    """{name: (c_out, c_in/groups, kh, kw) filters} of every spatial conv, LC-Blocks folded, in forward order."""
    return {name: (m.combined_weight if isinstance(m, LCConv2d) else m.weight).detach().float()
            for name, m in spatial_layers(model)}


def fve_threshold(n):
    """T(N): the normalising threshold of the filter variance entropy (fitted for 3×3)."""
    return 1.2618047 / (1 + math.exp(-0.88767525 * (math.log2(n) - 2.30436435))) - 0.31050834


@torch.no_grad()
def filter_variance_entropy(weight):
    """Filter variance entropy of one layer -> (raw H, normalised H / T(N)): the layer's N =
    c_out·c_in kernels as an (N, kh·kw) matrix, centred over N; s its singular values, r = s² / Σ s²,
    H = -Σ r·log10 r. H ≈ log10(k²) for random filters, 0 for one repeated pattern."""
    kernels = weight.detach().double().reshape(-1, weight.shape[-2] * weight.shape[-1])
    s = torch.linalg.svdvals(kernels - kernels.mean(0))  # centred over N
    if s.max() <= 1e-9 * kernels.norm():  # all kernels identical (up to rounding)
        return 0.0, 0.0
    r = s**2 / (s**2).sum()
    r = r[r > 0]
    h = -(r * torch.log10(r)).sum().item()
    return h, h / fve_threshold(len(kernels))


@torch.no_grad()
def spatial_variance(model):
    """(k, k) variance over all kernels of the model at each kernel position (the paper's Fig. 8b):
    each layer's combined filters divided by that layer's std, stacked, variance per position.
    Layers whose kernel shape is not the model's most common one (a patch stem) are left out."""
    return _normalised_kernels(model).var(0)


@torch.no_grad()
def spatial_covariance(model):
    """(k², k²) second moments of the kernels spatial_variance stacks, about zero (not their mean): the
    covariance Σ of the zero-mean Gaussian that matches them, to draw random filters from (init=Σ)."""
    kernels = _normalised_kernels(model).flatten(1).double()  # (N, k²)
    return kernels.T @ kernels / len(kernels)


def _normalised_kernels(model):
    """(N, k, k): every kernel of the model's most common shape, each layer's over that layer's std."""
    filters = list(combined_filters(model).values())
    shapes = [f.shape[-2:] for f in filters]
    shape = max(set(shapes), key=shapes.count)
    kernels = [(f / f.std()).reshape(-1, *shape) for f in filters if f.shape[-2:] == shape]
    return torch.cat(kernels)


def count_parameters(model):
    """(learnable, total) number of parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -----------------------------------------------------------------------------
# Why it trains (beyond the paper)
#
# Per group, S (m × d) are the frozen filters (m = E·c_out/groups, d = c_in/groups·kh·kw),
# C (c_out/groups × m) the 1×1 weights, K = C·S the combined filters. SGD on C with momentum,
# Nesterov and weight decay λ maps linearly to K (right-multiply every update by S):
#     K ← K − η·(∇_K L · P + λ·K),   P = SᵀS,
# with the momentum buffer mapped the same way. So a frozen LC-Block trains exactly as one
# k×k conv started at K₀ = C₀·S whose weight gradient is right-multiplied by the fixed P.
# Three regimes: m < d, P has rank m (the filters move in a random subspace); m ≈ d, P is an
# anisotropic preconditioner; m ≫ d, P ≈ E[P] = m·s²·I = α·I, α = E·c_out/(3·c_in·kh·kw)
# for i.i.d. filters of std s (the limit form). And when the conv feeds a BatchNorm, the loss
# does not see a filter's scale (it is the same for K and c·K), so the limit trains as the plain
# conv started at K₀/√α, K_limit = √α·K_init at every SGD step, weight decay and momentum
# included: a smaller init of the plain network, trained with the plain recipe (the init form).


class _RightMultiplyGrad(torch.autograd.Function):
    """Identity forward; backward right-multiplies the weight's gradient by P per group."""

    @staticmethod
    def forward(ctx, weight, preconditioner):
        ctx.save_for_backward(preconditioner)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        preconditioner, = ctx.saved_tensors
        groups, d = preconditioner.shape[:2]
        preconditioned = grad.reshape(groups, -1, d) @ preconditioner  # (g, c_out/g, d) @ (g, d, d)
        return preconditioned.reshape(grad.shape), None


class PreconditionedConv2d(nn.Conv2d):
    """An nn.Conv2d whose weight gradient is right-multiplied per group by the fixed buffer
    `preconditioner`, P (groups, d, d); the bias (if any) is an ordinary parameter. With P = SᵀS it
    trains exactly as the frozen LC-Block with filters S (LCConv2d.to_preconditioned), in groups·d²
    numbers instead of E·c_out·d. A fresh one has P = I, a plain conv; `expansion` is the E it stands for."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, expansion=1, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         device=device, dtype=dtype)
        self.expansion = expansion
        d = self.weight[0].numel()
        self.register_buffer("preconditioner", torch.eye(d, device=device, dtype=dtype).repeat(groups, 1, 1))

    def forward(self, x):
        weight = _RightMultiplyGrad.apply(self.weight, self.preconditioner)
        return self._conv_forward(x, weight, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", expansion={self.expansion}"


def alpha(conv, expansion):
    """E[P]'s scale m·s² = E·c_out/(3·c_in·kh·kw) for a frozen LC ×E in place of conv: the
    factor by which it multiplies the conv's learning rate when m ≫ d."""
    return expansion * conv.out_channels / (3 * conv.in_channels * math.prod(_pair(conv.kernel_size)))


@torch.no_grad()
def _preconditioned_lc_block(args, expansion, init):
    """A fresh frozen LC ×E as its PreconditionedConv2d, drawn without its m·d filters S: per
    group, P = SᵀS and K₀ = C₀·S come from a root R with P = RᵀR.
      m < d: R = S, drawn as LCConv2d draws it, and K₀ = C₀·S (exact for every init);
      m ≥ d: P is Wishart W_d(m, Σ), Σ = I ⊗ B·Bᵀ (kernel_root), drawn by Bartlett's decomposition,
        R = Lᵀ·(I ⊗ Bᵀ) (L lower triangular, L_ii² ~ χ²(m − i + 1), N(0, 1) below the diagonal),
        and K₀ as σ_C·Z·R, Z ~ N(0, 1): given P, the rows of C₀·S are N(0, σ_C²·P).
    O(d³) per group, whatever E. For m ≥ d, exact in distribution for Gaussian filters and C₀; for the
    uniform default, P has the block's mean m·Σ and Marchenko-Pastur spectrum, not its finer statistics."""
    if torch.get_default_device().type == "meta":  # built for its shapes alone (train.py's checks): no O(d³) draw
        return PreconditionedConv2d(*args, expansion=expansion, device="meta")
    new = PreconditionedConv2d(*args, expansion=expansion, device="meta").to_empty(device="cpu")
    groups, shape = new.groups, new.weight.shape[1:]
    m, d = new.out_channels * expansion // groups, math.prod(shape)
    weight = new.weight.view(groups, -1, d)
    bound = 1 / math.sqrt(m)  # the 1×1 conv's default init U(±1/√m), fan-in m
    # Bᵀ, (kh·kw, kh·kw), diagonal for a named init: in float32 and applied in float64, each product exact
    kernel = kernel_root(new.weight.shape, init).T.float().double()
    with torch.device("cpu"):  # drawn on the CPU even where the caller builds under a torch.device('meta') context
        for group in range(groups):
            if m < d:
                root = init_filters_(torch.empty(m, *shape), init).reshape(m, d)
                weight[group] = torch.empty(len(weight[group]), m).uniform_(-bound, bound) @ root
            else:
                chi2 = torch.distributions.Chi2(torch.arange(m, m - d, -1, dtype=torch.float64)).sample()
                lower = torch.randn(d, d).tril_(-1) + torch.diag(chi2.sqrt().float())
                root = (lower.T.double().reshape(d, -1, len(kernel)) @ kernel).reshape(d, d).float()  # Lᵀ·(I ⊗ Bᵀ)
                weight[group] = torch.randn(len(weight[group]), d).mul_(bound / math.sqrt(3)) @ root
            new.preconditioner[group] = root.T @ root
    if new.bias is not None:
        new.bias.uniform_(-bound, bound)
    return new


@torch.no_grad()
def _lc_limit_conv(args, expansion, init, as_init):
    """The m ≫ d limit of a frozen LC ×E, a PreconditionedConv2d: P = E[P] = m·(I ⊗ B·Bᵀ) (kernel_root; α·I
    for i.i.d. inits), K₀ drawn as its limit, kernels N(0, B·Bᵀ/3), bias 0. as_init: the init form, the plain
    nn.Conv2d whose weight is that K₀/√α (std 1/√(3m)), from the same random numbers; i.i.d. inits only."""
    # float64, so that a float64 model gets K_init = K₀/√α to the last bit
    limit = PreconditionedConv2d(*args, expansion=expansion, device="meta", dtype=torch.float64).to_empty(device="cpu")
    groups, m = limit.groups, limit.out_channels * expansion // limit.groups
    kernel = kernel_root(limit.weight.shape, init)  # B: (kh·kw, kh·kw)
    kernels = limit.weight.normal_(0, 1).view(-1, len(kernel)) @ (kernel.T / math.sqrt(3))
    limit.weight.copy_(kernels.view_as(limit.weight))
    if limit.bias is not None:
        limit.bias.zero_()
    if as_init:
        return _filled(nn.Conv2d(*args, device="meta"), limit.weight / math.sqrt(alpha(limit, expansion)), limit.bias)
    covariance = torch.block_diag(*[m * kernel @ kernel.T] * limit.weight.shape[1])  # (d, d): I ⊗ m·B·Bᵀ
    limit.preconditioner.copy_(covariance.expand(groups, -1, -1))
    return limit


@torch.no_grad()
def basis_summary(model):
    """How rank-complete and well-conditioned each frozen layer's random basis is: per frozen LC-Block and
    PreconditionedConv2d, {name, m, d, rank, alpha, alpha_iid, spread, spread_mp}, means over its groups:
    rank = rank(P)/d, the share of filter space K can reach; alpha = trace(P)/d, the effective
    learning-rate factor (alpha_iid: its expectation); spread = P's largest / smallest nonzero eigenvalue
    (1: P ∝ I on its range) and spread_mp its Marchenko-Pastur prediction for i.i.d. filters."""
    summary = []
    for name, layer in spatial_layers(model):
        if isinstance(layer, LCConv2d) and layer.frozen and layer.linear:
            preconditioner = layer.preconditioner()
        elif isinstance(layer, PreconditionedConv2d):
            preconditioner = layer.preconditioner
        else:
            continue
        groups, d = preconditioner.shape[:2]
        m = layer.out_channels * layer.expansion // groups
        eigenvalues = torch.linalg.eigvalsh(preconditioner.double().cpu())  # (groups, d), ascending
        nonzero = eigenvalues > eigenvalues[:, -1:] * 1e-5  # float32 filters: smaller is rounding
        smallest = torch.where(nonzero, eigenvalues, math.inf).min(1).values
        q = min(m, d) / max(m, d)
        summary.append(dict(
            name=name, m=m, d=d, rank=nonzero.double().mean().item(), alpha=eigenvalues.mean().item(),
            alpha_iid=alpha(layer, layer.expansion), spread=(eigenvalues[:, -1] / smallest).mean().item(),
            spread_mp=((1 + q**0.5) / (1 - q**0.5)) ** 2 if q < 1 else math.inf))
    return summary
