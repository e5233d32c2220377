"""
Train and evaluate one model of Gavrikov & Keuper (arXiv:2301.11360): one run is one point
of one of the paper's tables or figures, appended as one JSON line to --out.

The recipe is the paper's (Appendix A): 75 epochs, SGD with Nesterov momentum 0.9, lr 0.01
with cosine annealing, weight decay 0.01, batch 256, label smoothing 0.1, the last epoch
evaluated. The dataset lives on the device as one uint8 tensor and is cropped and flipped
there a batch at a time (as in airbench), so the GPU never waits for data. The model runs
channels_last, in bf16 autocast where that is faster than fp32 (--precision).

    python train.py --dataset cifar10 --expansion 128 --frozen     # ResNet-LC-20-16x128, frozen
    python train.py --expansion 128 --frozen --preconditioned       # the same run as one conv per layer
    python train.py --lc-limit 128                                  # its large-E limit: a plain ResNet
    python train.py --lc-init 128                                   # the same under BatchNorm: a smaller init
    python train.py --benchmark                                     # step time and memory vs E
"""
import argparse
import fcntl
import gzip
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

import lcconv

# -----------------------------------------------------------------------------
# Settings: the command line; defaults are the paper's recipe

DATASETS = {  # pad-4 crop + flip for CIFAR only, as in the paper; files: what torchvision keeps in --data-dir
    "cifar10": dict(classes=10, channels=3, augment=True, train_images=50_000, test_images=10_000,
                    files="cifar-10-batches-py"),
    "cifar100": dict(classes=100, channels=3, augment=True, train_images=50_000, test_images=10_000,
                     files="cifar-100-python"),
    "svhn": dict(classes=10, channels=3, augment=False, train_images=73_257, test_images=26_032,
                 files="train_32x32.mat"),
    "fashionmnist": dict(classes=10, channels=1, augment=False, train_images=60_000, test_images=10_000,
                         files="FashionMNIST/raw"),
}
MODELS = ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2")
# flags that only some models take; their defaults are those of lcconv.resnet / lcconv.convmixer
ARCH_FLAGS = {"resnet": ("depth", "width", "kernel_size"),
              "convmixer": ("dim", "depth", "kernel_size", "patch_size")}
# flags that do not change what a run computes: left out when results and checkpoints are matched
NOT_RECIPE = ("data_dir", "out", "checkpoint", "save_figures", "device", "compile", "skip_finished", "benchmark")
# flags that act on the spatial (k×k, k > 1) convs: refused, when set, for a model that has none
SPATIAL_FLAGS = ("expansion", "frozen", "preconditioned", "lc_limit", "lc_init", "init", "intermediate")
MAX_SEED = 2**32 - 1
MAX_ALPHA = 1e6  # frozen LC's learning-rate factor past which a run is warned (the sweep's largest: 2e4)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"train.py: error: {message} (see --help)\n")


PARSER = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
_add = PARSER.add_argument
_add("--dataset", default="cifar10", choices=list(DATASETS), help="dataset (downloaded into --data-dir if missing)")
_add("--data-dir", default="./data", help="where the datasets are (torchvision layout)")
_add("--model", default="resnet", choices=MODELS,
     help="CIFAR ResNet (He et al.), ConvMixer, or a torchvision model adapted to 32x32 (paper's Fig. 1)")
_add("--depth", type=int, help="ResNet depth 6n+2 (default 20) or ConvMixer depth (default 8)")
_add("--width", type=int, help="ResNet width W: stages of W, 2W, 4W channels (default 16)")
_add("--dim", type=int, help="ConvMixer channels (default 256)")
_add("--patch-size", type=int, help="ConvMixer patch size, 1..32 (default 2)")
_add("--kernel-size", type=int, help="spatial kernel size, odd (default 3 for ResNet, 9 for ConvMixer)")
_add("--expansion", type=int, default=0, help="LC expansion E; 0 = plain spatial convs (no LC-Block)")
_add("--frozen", action="store_true", help="keep every spatial (k>1) filter at its random init")
_add("--init", default="kaiming_uniform", choices=lcconv.INITS, help="spatial filter init (paper: kaiming_uniform)")
_add("--intermediate", default="none", choices=lcconv.INTERMEDIATES, help="op between the LC-Block's convs (Table 3)")
_add("--preconditioned", action="store_true",
     help="train the frozen LC-Blocks as their exactly equivalent preconditioned convs (fast at any E)")
_add("--lc-limit", type=int, metavar="E",
     help="a plain model whose spatial convs train as the large-E limit of frozen LC xE (P = E[P])")
_add("--lc-init", type=int, metavar="E",
     help="the plain model started at that limit's filters / sqrt(alpha): the same training under BatchNorm")
_add("--epochs", type=int, default=75, help="training epochs (paper: 75)")
_add("--batch-size", type=int, default=256, help="batch size (paper: 256)")
_add("--lr", type=float, default=0.01, help="peak learning rate, cosine-annealed per step (paper: 0.01)")
_add("--momentum", type=float, default=0.9, help="Nesterov momentum (paper: 0.9)")
_add("--weight-decay", type=float, default=0.01, help="weight decay (paper: 0.01)")
_add("--label-smoothing", type=float, default=0.1, help="label smoothing (paper: 0.1)")
_add("--seed", type=int, default=0, help=f"0..{MAX_SEED}: fixes the random filters, the init and the data order")
_add("--train-subset", type=int, help="train on the first N training images only (quick runs)")
_add("--fgsm-eps", type=float, default=1 / 255, help="l-inf radius on [0,1] images for FGSM/PGD (paper: 1/255)")
_add("--pgd-steps", type=int, default=0, help="PGD steps for an extra robust accuracy; 0 = off")
_add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
_add("--precision", default="auto", choices=("auto", "bf16", "fp32"),
     help="bf16 autocast or fp32; auto: bf16 where it is faster (CUDA with bf16; CPUs with AMX, or AMD's "
          "with AVX512_BF16), else fp32")
_add("--compile", action="store_true", help="torch.compile the model")
_add("--out", default="results.jsonl", help="append one JSON line with config and results here")
_add("--checkpoint", help="save after every epoch here; rerunning the same command resumes (and a finished run is done)")
_add("--skip-finished", action="store_true", help="exit at once if --out already has a result for this config")
_add("--save-figures", metavar="DIR", help="save the combined filters and the spatial variance heatmap as PNGs")
_add("--benchmark", action="store_true",
     help="time a training step and measure peak memory of ResNet-20-16 vs frozen ResNet-LC-20-16xE; train nothing")
CONFIG_KEYS = [a.dest for a in PARSER._actions if a.dest != "help" and a.dest not in NOT_RECIPE]


def parse_args(argv=None):
    """The arguments, every one checked here: a bad one exits with one line (status 2)."""
    args = PARSER.parse_args(argv)
    error = PARSER.error
    for flag in sum(ARCH_FLAGS.values(), ()):
        if getattr(args, flag) is not None and flag not in ARCH_FLAGS.get(args.model, ()):
            error(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
    if args.model in ARCH_FLAGS:  # fill in the model's defaults, so configs are complete
        builder = getattr(lcconv, args.model)
        for flag in ARCH_FLAGS[args.model]:
            if getattr(args, flag) is None:
                setattr(args, flag, inspect.signature(builder).parameters[flag].default)
    data = DATASETS[args.dataset]
    # the rest of the model's sizes (depth, patch size) lcconv checks when the model is built below
    checks = [
        (args.expansion >= 0, "--expansion must be >= 0 (0 = no LC-Block)"),
        (args.kernel_size is None or (args.kernel_size >= 1 and args.kernel_size % 2),
         f"--kernel-size must be odd and >= 1, got {args.kernel_size}"),
        (args.width is None or args.width >= 1, f"--width must be >= 1, got {args.width}"),
        (args.dim is None or args.dim >= 1, f"--dim must be >= 1, got {args.dim}"),
        (args.intermediate == "none" or args.expansion >= 1, "--intermediate needs an LC-Block (--expansion >= 1)"),
        (not args.preconditioned or (args.frozen and args.expansion >= 1 and args.intermediate == "none"),
         "--preconditioned needs --frozen, --expansion >= 1 and no --intermediate"),
        (args.lc_limit is None or args.lc_limit >= 1, f"--lc-limit must be >= 1, got {args.lc_limit}"),
        (args.lc_limit is None or (args.expansion == 0 and not args.frozen and not args.preconditioned),
         "--lc-limit is a plain learnable model: it takes no --expansion, --frozen or --preconditioned"),
        (args.lc_init is None or args.lc_init >= 1, f"--lc-init must be >= 1, got {args.lc_init}"),
        (args.lc_init is None or (args.expansion == 0 and not args.frozen and not args.preconditioned
                                  and args.lc_limit is None),
         "--lc-init is a plain learnable model: it takes no --expansion, --frozen, --preconditioned or --lc-limit"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (0 < args.lr < math.inf, f"--lr must be > 0, got {args.lr}"),
        (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
        (0 <= args.weight_decay < math.inf, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (0 <= args.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {args.seed}"),
        (args.train_subset is None or 1 <= args.train_subset <= data["train_images"],
         f"--train-subset must be in 1..{data['train_images']} (the {args.dataset} training set), "
         f"got {args.train_subset}"),
        (0 < args.fgsm_eps <= 1, f"--fgsm-eps must be in (0, 1] (images are in [0, 1]), got {args.fgsm_eps}"),
        (args.pgd_steps >= 0, "--pgd-steps must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            error(message)
    if args.model in ARCH_FLAGS:  # built on the meta device: lcconv's checks, no memory, no random numbers
        try:
            with torch.device("meta"):
                plain = builder(**{flag: getattr(args, flag) for flag in ARCH_FLAGS[args.model]})
        except ValueError as e:
            error(f"--model {args.model}: {e}")
        given = [flag for flag in SPATIAL_FLAGS if getattr(args, flag) != PARSER.get_default(flag)]
        if given and not list(lcconv.spatial_layers(plain)):
            given = [f"--{flag.replace('_', '-')}" for flag in given]
            error(f"this {args.model} has no spatial conv (with these sizes all its convs are 1x1): "
                  f"nothing for {', '.join(given)} to act on")
    device_error = check_device(args.device)
    if device_error:
        error(device_error)
    if args.precision == "auto":  # resolved here, so that the config says what ran
        args.precision = "bf16" if native_bf16(pick_device(args.device)) else "fp32"
    for flag, path, kind in [("--out", args.out, "file"), ("--checkpoint", args.checkpoint, "file"),
                             ("--save-figures", args.save_figures, "directory")]:
        problem = path and unwritable(Path(path), kind)
        if problem:
            error(f"{flag} {path}: {problem}")
    return args


def check_device(name):
    """None if --device names a device this machine has, else what is wrong."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this machine has no CUDA GPU"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)"
    if device.type not in ("cpu", "cuda"):
        return f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"
    return None


def unwritable(path, kind):
    """None if a file (or directory) can be written at path, else why not; creates nothing."""
    if path.exists() and kind == "directory" and not path.is_dir():
        return "is not a directory"
    if path.exists() and kind == "file" and not path.is_file():
        return "is a directory" if path.is_dir() else "is not a regular file"
    folder = path if kind == "directory" else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror})"
    return None


def recipe(config):
    """The part of a config (argparse namespace, or a result line) that determines the result;
    keys a line lacks (written before they existed) take their defaults. Lines from before
    --precision ran bf16 on CUDA and fp32 on the CPU."""
    config = vars(config) if isinstance(config, argparse.Namespace) else config
    keys = {k: config.get(k, PARSER.get_default(k)) for k in CONFIG_KEYS}
    if "precision" not in config:
        keys["precision"] = "fp32" if config.get("device", "cpu") == "cpu" else "bf16"
    return keys


# -----------------------------------------------------------------------------
# Device and precision: decided once, here


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def cpu_capabilities():
    """torch's CPU feature flags (a private function; absent in older torch, which reads as none)."""
    return getattr(torch.cpu, "get_capabilities", dict)()


def native_bf16(device):
    """Whether bf16 runs faster than fp32 on the device: CUDA GPUs with bf16 units; CPUs with
    AMX, or AMD's with AVX512_BF16. An Intel CPU with AVX512_BF16 but no AMX ran train.py's step
    1.08-1.36x slower in bf16 (oneDNN's bf16 convs there are slower than its fp32 ones): fp32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 counts no emulation
            return torch.cuda.is_bf16_supported()
    cpu = cpu_capabilities()
    return bool(cpu.get("amx_bf16") or cpu.get("avx512_bf16") and str(cpu.get("cpu_name", "")).startswith("AMD"))


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def hardware(device):
    """The GPU's name, or the CPU's model, its bf16 units (one model name covers Xeons with and
    without AMX, which `auto` treats apart) and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    flags = cpu_capabilities()
    units = "AMX" if flags.get("amx_bf16") else "AVX512_BF16" if flags.get("avx512_bf16") else None
    threads = torch.get_num_threads()
    return f"{cpu or platform.processor() or 'cpu'}{f' ({units})' * bool(units)}, {threads} thread{'s' * (threads > 1)}"


# a short hash of lcconv.py and train.py, which code wrote a result: taken at start, so it names the
# code that runs even if the files change during a run
CODE_VERSION = hashlib.sha1(b"".join((Path(__file__).resolve().parent / f).read_bytes()
                                     for f in ("lcconv.py", "train.py"))).hexdigest()[:10]


# -----------------------------------------------------------------------------
# Data: whole splits as uint8 tensors (N, C, 32, 32) on the device

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist


def load_split(name, root, train):
    """-> (images uint8 (N, C, 32, 32), labels int64 (N,)), downloading if root lacks them."""
    datasets = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        split = (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)(root, train=train, download=True)
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(split.targets)
    if name == "svhn":
        split = datasets.SVHN(root, split="train" if train else "test", download=True)
        return torch.from_numpy(split.data), torch.from_numpy(split.labels).long()
    raw = Path(root, "FashionMNIST", "raw")
    if not raw.is_dir() and DEBIAN_FASHION_MNIST.is_dir():
        unpack_gz(DEBIAN_FASHION_MNIST, raw)
    split = datasets.FashionMNIST(root, train=train, download=True)
    # upscaled to 32×32, train and test (paper, Appendix A)
    images = F.interpolate(split.data[:, None].float(), size=32, mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8), split.targets


def unpack_gz(source, target):
    """The .gz files of source, decompressed into target (torchvision wants them unpacked)."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for gz in source.glob("*.gz"):
        with gzip.open(gz) as f, open(tmp / gz.stem, "wb") as out:
            shutil.copyfileobj(f, out)
    try:
        tmp.rename(target)
    except OSError:  # a run beside this one unpacked it first
        shutil.rmtree(tmp)


def load_data(args, device):
    try:
        train_x, train_y = load_split(args.dataset, args.data_dir, train=True)
        test_x, test_y = load_split(args.dataset, args.data_dir, train=False)
    except Exception as e:  # no internet, a broken download, corrupt files, a missing package
        files = Path(args.data_dir, DATASETS[args.dataset]["files"])
        hint = " or `apt-get install dataset-fashion-mnist`" if args.dataset == "fashionmnist" else ""
        fix = (f"{files} is there but corrupt or incomplete: delete it to download it again" if files.exists() else
               f"connect to the internet so torchvision can download it{hint}, or pass --data-dir")
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise RuntimeError(f"cannot load {args.dataset} from {args.data_dir} ({type(e).__name__}: {detail}); "
                           f"{fix}") from None
    mean, std = channel_stats(train_x)
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    return dict(train_x=train_x.to(device), train_y=train_y.to(device), test_x=test_x.to(device),
                test_y=test_y.to(device), mean=mean, std=std)


def channel_stats(images):
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(10_000):
        chunk = chunk.double().div(255)
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean**2).sqrt().float()


def augment(images, generator):
    """Zero-pad 4 px, random 32×32 crop, random horizontal flip; uint8 in, uint8 out."""
    n, c, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, n, 1, 1, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(h, device=images.device).view(1, 1, h, 1)).expand(n, c, h, w + 8)
    cropped = padded.gather(2, rows)
    cols = (dx + torch.arange(w, device=images.device).view(1, 1, 1, w)).expand(n, c, h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(3), cropped)


def to_input(images):
    """uint8 (B, C, H, W) -> float [0, 1], channels_last (faster convs on CUDA and the CPU)."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


# -----------------------------------------------------------------------------
# Model


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def build_net(args):
    """The plain network of args for its dataset, then its spatial convs made frozen and/or
    LC-Blocks (or their preconditioned form, its large-E limit, or the init that limit is
    under BatchNorm) by lcconv.convert."""
    channels, classes = DATASETS[args.dataset]["channels"], DATASETS[args.dataset]["classes"]
    if args.model in ARCH_FLAGS:
        arch = {flag: getattr(args, flag) for flag in ARCH_FLAGS[args.model]}
        net = getattr(lcconv, args.model)(num_classes=classes, in_channels=channels, **arch)
    else:
        net = getattr(torchvision.models, args.model)(num_classes=classes)
        # adapted to 32×32 inputs: 3×3 stride-1 stem, no max-pool
        if args.model == "mobilenet_v2":
            net.features[0][0] = nn.Conv2d(channels, 32, 3, 1, 1, bias=False)
        else:
            net.conv1, net.maxpool = nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.Identity()
    e = args.lc_limit or args.lc_init or args.expansion * args.frozen
    alpha = max((lcconv.alpha(conv, e) for _, conv in lcconv.spatial_layers(net)), default=0)
    if alpha > MAX_ALPHA:
        print(f"train.py: warning: frozen LC x{e} multiplies a spatial layer's learning rate by up to alpha = "
              f"{alpha:.3g} (lcconv.alpha); expect the loss to diverge, or BatchNorm's eps to dominate", file=sys.stderr)
    if args.lc_limit or args.lc_init:
        form = "limit" if args.lc_limit else "init"
        return lcconv.convert(net, args.lc_limit or args.lc_init, True, args.init, form=form)
    form = "preconditioned" if args.preconditioned else "block"
    return lcconv.convert(net, args.expansion, args.frozen, args.init, args.intermediate, form)


def to_device(model, device):
    """The model on the device, channels_last."""
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(model, lr, momentum, weight_decay):
    """SGD over the learnable parameters only: frozen filters get no update at all. Fused: the same
    update in one kernel, 2.5x faster on the CPU for learnable LC x128's 38 M parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay, fused=True)


# -----------------------------------------------------------------------------
# Training


def train_step(model, optimizer, x, y, label_smoothing, precision):
    with autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(model, optimizer, scheduler, data, args, epoch):
    """One pass over the training set -> (mean loss, accuracy %). The data order and the
    augmentation of epoch e depend only on (seed, e), so a resumed run sees the same batches."""
    model.train()
    device = data["train_y"].device
    generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + epoch)
    n = len(data["train_y"])
    order = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{args.epochs}", unit="img", unit_scale=True,
               leave=False, disable=None, file=sys.stderr)
    for step, i in enumerate(range(0, n, args.batch_size)):
        idx = order[i:i + args.batch_size]
        images, y = data["train_x"][idx], data["train_y"][idx]
        if DATASETS[args.dataset]["augment"]:
            images = augment(images, generator)
        loss, logits = train_step(model, optimizer, to_input(images), y, args.label_smoothing, args.precision)
        scheduler.step()
        loss_sum += loss.float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bar.update(len(y))
        if not bar.disable and step % 20 == 0:  # .item() syncs the GPU, so only now and then
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{100 * correct.item() / (i + len(y)):.1f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    return loss_sum.item() / n, 100 * correct.item() / n


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def accuracy(model, images, labels, batch_size, precision):
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_input(x)
        with autocast(x.device, precision):
            correct += (model(x).argmax(1) == y).sum().item()
    return 100 * correct / len(labels)


def robust_accuracy(model, images, labels, eps, steps, batch_size, precision, seed=0):
    """Accuracy under an l∞ attack of radius eps on [0, 1] images (before normalisation):
    FGSM for steps=1 (Goodfellow et al.), else PGD from a random start with step 2.5·eps/steps
    (Madry et al.). The attack maximises plain cross-entropy."""
    model.eval()
    generator = torch.Generator(images.device).manual_seed(seed)
    step_size = eps if steps == 1 else 2.5 * eps / steps
    correct = 0
    bar = tqdm(total=len(labels) * steps, desc="FGSM" if steps == 1 else f"PGD-{steps}", unit="step",
               unit_scale=True, leave=False, disable=None, file=sys.stderr)
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_input(x)
        delta = torch.zeros_like(x)
        if steps > 1:
            delta = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast(x.device, precision):
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            grad, = torch.autograd.grad(loss, delta)
            delta = (delta + step_size * grad.sign()).clamp(-eps, eps).detach()
            bar.update(len(y))
        with torch.no_grad(), autocast(x.device, precision):
            correct += (model((x + delta).clamp(0, 1)).argmax(1) == y).sum().item()
    bar.close()
    return 100 * correct / len(labels)


def filter_metrics(net):
    """FVE of the first and last spatial layer (Fig. 5), the spatial variance (Fig. 8b), the
    random basis of frozen LC layers (lcconv.basis_summary) and the first layer's filters (Fig. 7)."""
    filters = list(lcconv.combined_filters(net).values())
    if not filters:  # every conv 1×1 (--kernel-size 1): nothing to measure
        return dict.fromkeys(("fve_first", "fve_last", "fve_first_raw", "fve_last_raw", "spatial_variance", "basis",
                              "first_filters"))
    (first_raw, first), (last_raw, last) = map(lcconv.filter_variance_entropy, (filters[0], filters[-1]))
    variance = lcconv.spatial_variance(net)
    basis = [{k: round(v, 4) if isinstance(v, float) else v for k, v in layer.items()}
             for layer in lcconv.basis_summary(net)]
    return dict(fve_first=first, fve_last=last, fve_first_raw=first_raw, fve_last_raw=last_raw,
                spatial_variance=[[round(v, 4) for v in row] for row in variance.tolist()], basis=basis or None,
                first_filters=first_filters(net).double().mul(1e5).round().div(1e5).tolist())


def first_filters(net):
    """The first layer's combined filters, as the figures show them: up to 64, RGB or the first
    input channel, (n, 1 or 3, k, k)."""
    shape = lcconv.spatial_variance(net).shape  # the model's kernel size: a patch stem is left out
    filters = next(f for f in lcconv.combined_filters(net).values() if f.shape[-2:] == shape)
    return filters[:64] if filters.shape[1] in (1, 3) else filters[:64, :1]


def filter_grid(filters):
    """(n, 1 or 3, k, k) filters -> an 8-wide image grid on one shared scale, 0 = grey (Fig. 7)."""
    from torchvision.utils import make_grid
    scale = filters.abs().max().clamp(min=1e-12).item()
    tiles = F.interpolate(filters.cpu().float(), scale_factor=max(1, 48 // filters.shape[-1]), mode="nearest")
    return make_grid(tiles, nrow=8, normalize=True, value_range=(-scale, scale), pad_value=1)


def save_figures(net, directory):
    """The first layer's combined filters as an 8-wide grid on one shared scale (0 = grey; Fig. 7)
    and the spatial variance heatmap (Fig. 8b) on a fixed log scale: each position's variance
    over the mean, 1/4 black, 1 grey (uniform), 4 white, the same for every run."""
    from torchvision.utils import save_image
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_image(filter_grid(first_filters(net)), directory / "filters.png")
    variance = lcconv.spatial_variance(net)
    relative = (variance / variance.mean()).log2().clamp(-2, 2).add(2).div(4)
    heatmap = F.interpolate(relative[None, None].cpu(), scale_factor=32, mode="nearest")
    save_image(heatmap, directory / "spatial_variance.png")


def peak_memory_mb(device):
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# Results and checkpoints: written whole or not at all, one run per config at a time


@contextmanager
def claimed(out, config):
    """Holds this config's lock (a file beside --out) for the whole run, so that a second
    run of it (a second sweep on the same results) waits, then finds the result. The lock
    goes with the process, however it ends."""
    folder = Path(f"{out}.locks")
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    with open(folder / f"{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another run of this config is running (lock {lock.name}); waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_checkpoint(path, state):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, config, device):
    """The saved state if path exists and was written by this config, else None. Loaded
    with weights_only: tensors, numbers, strings, lists and dicts, never code."""
    if not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path} ({type(e).__name__}: it is damaged, or holds "
                           "more than tensors and numbers); delete it to start over") from None
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    if saved != config:
        changed = sorted(k for k in config if saved.get(k) != config[k])
        raise RuntimeError(f"checkpoint {path} is from another config (differs in {', '.join(changed)}); "
                           "delete it or pass another --checkpoint")
    return state


def append_result(path, result):
    """One JSON line, appended under an exclusive lock in one write(): whole beside parallel
    runs, never glued to a line a crash left unfinished, and a short write is taken back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(result) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # start after the unfinished line, which read_results skips
        if os.write(fd, line) != len(line):
            os.ftruncate(fd, size)
            raise OSError(f"short write to {path}: disk full?")
    finally:
        os.close(fd)


def read_lines(path):
    """(line number, parsed JSON or None) for each non-blank line of path, if it exists."""
    lines = Path(path).read_text(errors="replace").splitlines() if Path(path).is_file() else []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except ValueError:  # not ours, cut short by a crash, or a number past Python's 4,300 digits
                yield n, None


def read_results(path):
    """The results in path (a list of dicts); lines that are not JSON objects are skipped."""
    return [result for _, result in read_lines(path) if isinstance(result, dict)]


def has_result(results, config):
    """Whether one of the results was run with this config (a recipe)."""
    return any(recipe(r) == config for r in results)


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.benchmark:
        return benchmark(args, device)
    config = recipe(args)
    # a run with a checkpoint or --skip-finished is finished once its result is in --out
    once = args.checkpoint or args.skip_finished
    try:
        with claimed(args.out, config) if once else nullcontext():
            if once and has_result(read_results(args.out), config):
                print(f"already in {args.out}: {json.dumps(config)}")
                return
            run(args, config, device)
    except KeyboardInterrupt:  # only a run with a checkpoint can resume
        how = "rerun the same command to resume from --checkpoint" if args.checkpoint else "no --checkpoint to resume"
        sys.exit(f"train.py: interrupted; {how}")


def run(args, config, device):
    try:
        torch.manual_seed(args.seed)  # fixes the random filters
        net = build_net(args)
        state = load_checkpoint(args.checkpoint, config, device) if args.checkpoint else None
        data = load_data(args, device)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"train.py: error: {e}")
    # the network takes [0, 1] images and normalises them itself, so attacks work on those
    model = to_device(nn.Sequential(OrderedDict(normalize=Normalize(data["mean"], data["std"]), net=net)), device)
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay)
    steps_per_epoch = math.ceil(len(data["train_y"]) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    epoch_times, start_epoch, train_loss = [], 0, float("nan")
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, epoch_times, train_loss = state["epoch"], state["epoch_times"], state["train_loss"]
        print(f"resuming from {args.checkpoint} after epoch {start_epoch}")
    compiled = torch.compile(model) if args.compile else model
    learnable, total = lcconv.count_parameters(model)
    print(f"{args.model} on {args.dataset}, {device_name(device)}: {learnable:,} learnable of {total:,} parameters")

    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(compiled, optimizer, scheduler, data, args, epoch)
        epoch_times.append(time.perf_counter() - start)
        if not math.isfinite(train_loss):
            sys.exit(f"train.py: error: the loss became {train_loss} in epoch {epoch + 1}; "
                     f"lower --lr (now {args.lr}) or check the input")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  acc {train_acc:.2f}%  "
              f"lr {scheduler.get_last_lr()[0]:.2e}  {len(data['train_y']) / epoch_times[-1]:.0f} img/s  "
              f"{epoch_times[-1]:.1f} s", flush=True)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, dict(
                config=config, epoch=epoch + 1, epoch_times=epoch_times, train_loss=train_loss,
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()))

    # the last epoch's model, as the paper evaluates it
    bs, test, precision = args.batch_size, (data["test_x"], data["test_y"]), args.precision
    result = dict(vars(args))
    result.update(
        test_acc=accuracy(compiled, *test, bs, precision),
        train_acc=accuracy(compiled, data["train_x"], data["train_y"], bs, precision),
        fgsm_acc=robust_accuracy(compiled, *test, args.fgsm_eps, 1, bs, precision),
        pgd_acc=robust_accuracy(compiled, *test, args.fgsm_eps, args.pgd_steps, bs, precision, args.seed)
        if args.pgd_steps else None,
        train_loss=train_loss, params_learnable=learnable, params_total=total,
        **filter_metrics(model.net),
        epoch_time_median_s=statistics.median(epoch_times), peak_mem_mb=peak_memory_mb(device),
        device=device_name(device), hardware=hardware(device), torch=torch.__version__, code=CODE_VERSION)
    if args.preconditioned:  # the LC-Block it trains as, counted without building it
        with torch.device("meta"):
            blocks = build_net(argparse.Namespace(**{**vars(args), "preconditioned": False}))
        result["lc_params_learnable"], result["lc_params_total"] = lcconv.count_parameters(blocks)
    try:  # before the figures: a failing figure loses no result
        append_result(args.out, result)
    except OSError as e:
        sys.exit(f"train.py: error: could not write the result to {args.out} ({e}); rerun the same command")
    print(json.dumps({k: result[k] for k in ("test_acc", "train_acc", "fgsm_acc", "fve_first", "fve_last")}))
    if args.save_figures and result["spatial_variance"] is not None:  # a model with spatial convs
        try:
            save_figures(model.net, args.save_figures)
        except OSError as e:
            sys.exit(f"train.py: error: the result is in {args.out}, but the figures could not be written "
                     f"to {args.save_figures} ({e.strerror or e})")


# -----------------------------------------------------------------------------
# Benchmark: a training step of frozen ResNet-LC-20-16xE, as one conv (folded), as two
# convs (the paper's block) and as the preconditioned conv, against the plain ResNet-20-16

BENCH_CONFIGS = [("ResNet-20-16", "—", 0)] + [
    (f"LC-x{e} frozen", path, e) for path, es in [("one conv (folded)", (1, 128, 512)),
                                                   ("two convs", (8,)),
                                                   ("preconditioned", (128, 8192))] for e in es]


def bench_setup(path, expansion, batch_size, device):
    torch.manual_seed(0)
    model = lcconv.resnet()
    if expansion:
        form = "preconditioned" if path == "preconditioned" else "block"
        model = lcconv.convert(model, expansion, frozen=True, form=form)
    if path == "two convs":  # the paper's block as drawn, instead of the folded one
        for block in model.modules():
            if isinstance(block, lcconv.LCConv2d):
                block.forward = block.two_convs
    model = to_device(model, device)
    optimizer = make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.01)
    x = to_input(torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device))
    y = torch.randint(0, 10, (batch_size,), device=device)
    return model, optimizer, x, y


def bench_memory(path, expansion, precision, batch_size, device, queue):
    """In a fresh process: the peak memory of three training steps in MB, building the model
    left out. CUDA: allocated tensors; CPU: resident memory above the process's start-up."""
    try:
        device = torch.device(device)
        start = resident_mb()
        model, optimizer, x, y = bench_setup(path, expansion, batch_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
        for _ in range(3):
            train_step(model, optimizer, x, y, 0.1, precision)
        queue.put(peak_memory_mb(device) if device.type == "cuda" else resident_mb(peak=True) - start)
    except (RuntimeError, MemoryError):  # out of memory
        queue.put(None)


def resident_mb(peak=False):
    key = "VmHWM:" if peak else "VmRSS:"
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024


def benchmark(args, device, rounds=None):
    """Each config's step time in fp32 and bf16 (emulated on some CPUs), interleaved round by round so
    that drift and neighbours hit them alike: the median over rounds, and the ratios to the
    baseline of the same precision and to fp32, each the median [interquartile range] of the
    per-round ratios, so that one round a neighbour disturbed does not move it. A ratio whose
    interquartile range exceeds 10% of it is flagged as untrustworthy."""
    precisions = ("fp32", "bf16") if device.type == "cpu" or torch.cuda.is_bf16_supported() else ("fp32",)
    configs = [(*config, precision) for config in BENCH_CONFIGS for precision in precisions]
    # fresh processes for clean peak-memory counters; on CPU with large blocks mmap-ed, so
    # freed tensors go back to the OS and resident memory follows the live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    spawn = multiprocessing.get_context("spawn")
    memory = {}
    for _, path, e, precision in tqdm(configs, desc="benchmark memory", disable=None, file=sys.stderr):
        queue = spawn.Queue()
        process = spawn.Process(target=bench_memory, args=(path, e, precision, args.batch_size, str(device), queue))
        process.start()
        process.join()
        memory[path, e, precision] = queue.get() if process.exitcode == 0 else None
    runs = {(path, e): bench_setup(path, e, args.batch_size, device) for _, path, e in BENCH_CONFIGS
            if any(memory[path, e, p] for p in precisions)}
    rounds = rounds or (5 if device.type == "cuda" else 7)
    seconds = 1.0 if device.type == "cuda" else 3.0  # per turn: long enough to average out a busy neighbour
    times = {key: [] for key in memory if memory[key]}
    for _ in tqdm(range(rounds), desc="benchmark rounds", disable=None, file=sys.stderr):
        for key, t in times.items():
            t.append(time_steps(runs[key[:2]], key[2], device, seconds))
    print(f"Training step, batch {args.batch_size}, 32×32, channels_last, {hardware(device)}, torch "
          f"{torch.__version__}, code {CODE_VERSION}; median of {rounds} interleaved rounds; ratios: median "
          "[interquartile range] of the per-round ratios\n")
    print("| model | LC path | precision | ms/step | × baseline | × fp32 | peak MB | × baseline |")
    print("|---|---|---|---|---|---|---|---|")
    noisy = []

    def ratio(a, b):
        low, r, high = statistics.quantiles([x / y for x, y in zip(a, b)], n=4, method="inclusive")
        if high - low > 0.1 * r:
            noisy.append(r)
        return f"{r:.2f} [{low:.2f}–{high:.2f}]" + (" (noisy)" if high - low > 0.1 * r else "")
    base = BENCH_CONFIGS[0][1:]
    for name, path, e, precision in configs:
        t, mb = times.get((path, e, precision)), memory[path, e, precision]
        if not t:
            print(f"| {name} | {path} | {precision} | out of memory | | | | |")
            continue
        fp32 = times.get((path, e, "fp32"))
        print(f"| {name} | {path} | {precision} | {statistics.median(t):.1f} | {ratio(t, times[(*base, precision)])} | "
              f"{ratio(t, fp32) if precision != 'fp32' and fp32 else '—'} | {mb:.0f} | "
              f"{mb / memory[(*base, precision)]:.2f} |")
    if noisy:
        print(f"\n{len(noisy)} ratio(s) spread by more than 10% over most rounds: the machine was busy. "
              "Do not trust them; rerun on a quiet machine.")


def time_steps(run, precision, device, seconds):
    """ms per training step: one untimed step (it absorbs the switch from the last model),
    then steps for about `seconds`, at least two."""
    train_step(*run, 0.1, precision)
    sync(device)
    start, steps = time.perf_counter(), 0
    while steps < 2 or time.perf_counter() - start < seconds:
        train_step(*run, 0.1, precision)
        steps += 1
        sync(device)
    return (time.perf_counter() - start) / steps * 1000


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # in parse_args or the benchmark; main says how a run resumes
        sys.exit("train.py: interrupted")
    except torch.cuda.OutOfMemoryError:
        sys.exit("train.py: error: out of memory; lower --batch-size or --expansion")
