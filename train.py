"""
Train and evaluate one model of Gavrikov & Keuper (arXiv:2301.11360): one run is one point of one of
the paper's tables or figures, appended as one JSON line to --out. The recipe is the paper's (Appendix
A): 75 epochs, SGD with Nesterov momentum 0.9, lr 0.01 cosine-annealed, weight decay 0.01, batch 256,
label smoothing 0.1, the last epoch evaluated. The dataset lives on the device as one uint8 tensor,
cropped and flipped there a batch at a time (as in airbench); the model runs channels_last, in bf16
autocast where that is faster than fp32 (--precision).

    python train.py --dataset cifar10 --expansion 128 --frozen     # ResNet-LC-20-16x128, frozen
    python train.py --expansion 128 --frozen --preconditioned       # the same run as one conv per layer
    python train.py --lc-limit 128                                  # its large-E limit: a plain ResNet
    python train.py --lc-init 128                                   # the same under BatchNorm: a smaller init
    python train.py --benchmark                                     # step time and memory vs E
"""
import argparse
import ctypes
import fcntl
import gzip
import hashlib
import inspect
import json
import math
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
    "cifar10": dict(classes=10, channels=3, augment=True, train_images=50_000, files="cifar-10-batches-py"),
    "cifar100": dict(classes=100, channels=3, augment=True, train_images=50_000, files="cifar-100-python"),
    "svhn": dict(classes=10, channels=3, augment=False, train_images=73_257, files="train_32x32.mat"),
    "fashionmnist": dict(classes=10, channels=1, augment=False, train_images=60_000, files="FashionMNIST/raw"),
}
MODELS = ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2")
# flags that only some models take; their defaults are those of lcconv.resnet / lcconv.convmixer
ARCH_FLAGS = {"resnet": ("depth", "width", "kernel_size"), "convmixer": ("dim", "depth", "kernel_size", "patch_size")}
# flags that do not change what a run computes: left out when results and checkpoints are matched
NOT_RECIPE = ("data_dir", "out", "checkpoint", "device", "skip_finished", "benchmark")
REMOVED = {"pgd_steps": 0}  # flags of older versions, at the value a line holds where the flag was not given


def checked(kind, ok, allowed):
    """An argparse type: kind(text) if ok(value), else argparse's one-line error saying what is allowed."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    parse.kind = kind  # what a result line holds for it
    return parse


COUNT = checked(int, lambda n: n >= 1, ">= 1")
POSITIVE, NONNEGATIVE = checked(float, lambda x: 0 < x < math.inf, "> 0"), checked(float, lambda x: 0 <= x < math.inf, ">= 0")
FRACTION = checked(float, lambda x: 0 <= x < 1, "in [0, 1)")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"train.py: error: {message} (see --help)\n")


PARSER = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
_add = PARSER.add_argument
_add("--dataset", default="cifar10", choices=list(DATASETS), help="dataset (downloaded into --data-dir if missing)")
_add("--data-dir", default="./data", help="where the datasets are (torchvision layout)")
_add("--model", default="resnet", choices=MODELS, help="CIFAR ResNet, ConvMixer, or a torchvision model (Fig. 1)")
_add("--depth", type=int, help="ResNet depth 6n+2 (default 20) or ConvMixer depth (default 8)")
_add("--width", type=int, help="ResNet width W: stages of W, 2W, 4W channels (default 16)")
_add("--dim", type=int, help="ConvMixer channels (default 256)")
_add("--patch-size", type=int, help="ConvMixer patch size, 1..32 (default 2)")
_add("--kernel-size", type=int, help="spatial kernel size, odd (default 3 for ResNet, 9 for ConvMixer)")
lc = PARSER.add_mutually_exclusive_group()  # an LC-Block, its large-E limit, or the init that limit is
lc.add_argument("--expansion", type=checked(int, lambda n: n >= 0, ">= 0"), default=0,
                help="LC expansion E; 0 = plain spatial convs (no LC-Block)")
lc.add_argument("--lc-limit", type=COUNT, metavar="E", help="a plain model trained as frozen LC xE's large-E limit")
lc.add_argument("--lc-init", type=COUNT, metavar="E", help="the plain model started at that limit's filters / sqrt(alpha)")
_add("--frozen", action="store_true", help="keep every spatial (k>1) filter at its random init")
_add("--init", default="kaiming_uniform", help=f"spatial filter init: {', '.join(lcconv.INITS)} (the paper's: the first), "
     "or FILE.json holding a k²×k² covariance Σ to draw each kernel from, N(0, Σ) at the default's std",
     type=checked(str, lambda init: init in lcconv.INITS or init.endswith(".json"),
                  f"one of {', '.join(lcconv.INITS)} or a FILE.json"))
_add("--intermediate", default="none", choices=lcconv.INTERMEDIATES, help="op between the LC-Block's convs (Table 3)")
_add("--preconditioned", action="store_true", help="train frozen LC-Blocks as their preconditioned convs (exact)")
_add("--epochs", type=COUNT, default=75, help="training epochs")
_add("--batch-size", type=COUNT, default=256, help="batch size")
_add("--lr", type=POSITIVE, default=0.01, help="peak learning rate, cosine-annealed per step")
_add("--momentum", type=FRACTION, default=0.9, help="Nesterov momentum")
_add("--weight-decay", type=NONNEGATIVE, default=0.01, help="weight decay")
_add("--label-smoothing", type=FRACTION, default=0.1, help="label smoothing")
_add("--seed", type=checked(int, lambda n: 0 <= n < 2**32, f"in 0..{2**32 - 1}"), default=0,
     help="fixes the random filters, the init and the data order")
_add("--train-subset", type=COUNT, help="train on the first N training images only (quick runs)")
_add("--fgsm-eps", type=checked(float, lambda x: 0 < x <= 1, "in (0, 1]"), default=1 / 255,
     help="l-inf radius of FGSM on [0, 1] images")
_add("--device", default="auto", help="auto: cuda if there is one, else cpu",
     choices=["auto", "cpu"] + ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))] * torch.cuda.is_available())
_add("--precision", default="auto", choices=("auto", "bf16", "fp32"),
     help="bf16 autocast or fp32; auto: bf16 where it is faster (CUDA; CPUs with AMX, AMD's with AVX512_BF16)")
_add("--out", default="results.jsonl", help="append one JSON line with config and results here")
_add("--checkpoint", help="save after every epoch here; the same command again resumes (or finds the run finished)")
_add("--skip-finished", action="store_true", help="exit at once if --out already has a result for this config")
_add("--benchmark", action="store_true", help="time a training step and peak memory against E; train nothing")
CONFIG_KEYS = [a.dest for a in PARSER._actions if a.dest != "help" and a.dest not in NOT_RECIPE]


def parse_args(argv=None):
    """The arguments, all checked here (the model's sizes and the LC flags by lcconv, building the model on
    the meta device): a bad one exits with one line, status 2, before any work."""
    args, error = PARSER.parse_args(argv), PARSER.error
    for flag in sum(ARCH_FLAGS.values(), ()):
        if getattr(args, flag) is not None and flag not in ARCH_FLAGS.get(args.model, ()):
            error(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
    for flag in ARCH_FLAGS.get(args.model, ()):  # the model's defaults, so that configs are complete
        if getattr(args, flag) is None:
            setattr(args, flag, inspect.signature(getattr(lcconv, args.model)).parameters[flag].default)
    if (args.lc_limit or args.lc_init) and (args.frozen or args.preconditioned):
        error("--lc-limit and --lc-init are plain learnable models: they take no --frozen or --preconditioned")
    if args.lc_init and (args.init == "center" or args.init.endswith(".json")):
        error(f"--lc-init needs an i.i.d. init: under --init {args.init} the limit's P is not a multiple of I but a "
              "learning rate per kernel position, not an initialisation (use --lc-limit)")
    if args.init.endswith(".json"):  # readable, a covariance, of the model's kernels (convert checks each layer's)
        try:
            sigma = covariance(args.init)
            k = args.kernel_size or math.isqrt(len(sigma))  # a torchvision model's: any
            lcconv.init_std((1, 1, k, k), sigma)
        except ValueError as e:
            error(f"--init {args.init}: {e}")
    if (args.train_subset or 0) > (images := DATASETS[args.dataset]["train_images"]):
        error(f"--train-subset must be in 1..{images} (the {args.dataset} training set), got {args.train_subset}")
    try:
        with torch.device("meta"):
            net = build_net(args)
    except ValueError as e:
        error(f"--model {args.model}: {e}")
    given = [f"--{f.replace('_', '-')}" for f in ("expansion", "frozen", "preconditioned", "lc_limit", "lc_init",
                                                     "init", "intermediate") if getattr(args, f) != PARSER.get_default(f)]
    if given and not list(lcconv.spatial_layers(net)):
        error(f"this {args.model} has no spatial conv (with these sizes all its convs are 1x1): nothing for "
              f"{', '.join(given)} to act on")
    if args.precision == "auto":  # resolved here, so that the config says what ran
        args.precision = "bf16" if native_bf16(pick_device(args.device)) else "fp32"
    for flag, path in [("--out", args.out), ("--checkpoint", args.checkpoint)]:
        if path and (problem := unwritable(Path(path), "file")):
            error(f"{flag} {path}: {problem}")
    return args


def unwritable(path, kind):
    """None if a file (or directory) can be written at path, else why not; creates nothing."""
    if path.exists() and not (path.is_dir() if kind == "directory" else path.is_file()):
        return "is a directory" if path.is_dir() else f"is not a {'directory' if kind == 'directory' else 'regular file'}"
    folder = next(f for f in [path, *path.parents][kind == "file":] if f.exists())
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"{folder} is not a directory" if not folder.is_dir() else f"cannot write in {folder} ({e.strerror})"


def recipe(config):
    """The part of a config (argparse namespace, or a result line) that determines the result; keys a
    line lacks (written before they existed) take their defaults. Lines from before --precision ran
    bf16 on CUDA and fp32 on the CPU."""
    config = vars(config) if isinstance(config, argparse.Namespace) else config
    keys = {k: config.get(k, PARSER.get_default(k)) for k in CONFIG_KEYS}
    if "precision" not in config:
        keys["precision"] = "fp32" if config.get("device", "cpu") == "cpu" else "bf16"
    return keys


def unusable(line):
    """Why a result line (parsed JSON) is not a finished run, or None: the one check behind the skip of finished
    runs and the report. Each config key holds a value of its flag's type, range and choices (a missing key reads
    as its default), a removed flag's key its old default, test_acc a finite number."""
    if not isinstance(line, dict):
        return "not a JSON object"
    if removed := next((k for k, old in REMOVED.items() if line.get(k, old) != old), None):
        return f"{removed} is {line[removed]!r}: a flag train.py no longer has"
    for action in (a for a in PARSER._actions if a.dest in CONFIG_KEYS):
        value, kind = line.get(action.dest, action.default), getattr(action.type, "kind", action.type)
        kind = kind or type(action.default)  # store_true: bool
        if value is None and action.default is None:  # an unset flag
            continue
        if type(value) is not kind and not (kind is float and type(value) is int):  # a bool is no int
            return f"{action.dest} is {value!r}, not {kind.__name__}"
        try:
            if action.choices and value not in action.choices or action.type and action.type(value) is None:
                raise argparse.ArgumentTypeError
        except argparse.ArgumentTypeError:
            return f"{action.dest} is {value!r}, not a value train.py takes"
    if "test_acc" not in line:
        return "no test_acc"
    if type(line["test_acc"]) not in (int, float) or not math.isfinite(line["test_acc"]):
        return f"test_acc is {line['test_acc']!r}, not a finite number"


# -----------------------------------------------------------------------------
# Device and precision: decided once, here


def pick_device(name):  # --device's choices are this machine's devices
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def cpu_capabilities():  # torch's CPU feature flags: a private function, absent in some versions (none)
    return getattr(torch.cpu, "get_capabilities", dict)()


def native_bf16(device):
    """Whether bf16 runs faster than fp32 on the device: CUDA GPUs with bf16 units; CPUs with
    AMX, or AMD's with AVX512_BF16. An Intel CPU with AVX512_BF16 but no AMX ran train.py's step
    1.08-1.36x slower in bf16 (oneDNN's bf16 convs there are slower than its fp32 ones): fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = cpu_capabilities()
    return bool(cpu.get("amx_bf16") or cpu.get("avx512_bf16") and str(cpu.get("cpu_name", "")).startswith("AMD"))


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def hardware(device):
    """The GPU's name, or the CPU's model, its bf16 units (one model name covers Xeons with and
    without AMX, which `auto` treats apart) and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags, threads = cpu_capabilities(), torch.get_num_threads()
    units = " (AMX)" if flags.get("amx_bf16") else " (AVX512_BF16)" if flags.get("avx512_bf16") else ""
    return f"{cpu or 'cpu'}{units}, {threads} thread{'s' * (threads > 1)}"


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
    if not raw.is_dir() and DEBIAN_FASHION_MNIST.is_dir():  # unpacked (torchvision reads them so), then renamed
        tmp = raw.with_name(f"raw.{os.getpid()}.partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for gz in DEBIAN_FASHION_MNIST.glob("*.gz"):
            with gzip.open(gz) as f, open(tmp / gz.stem, "wb") as out:
                shutil.copyfileobj(f, out)
        try:
            tmp.rename(raw)
        except OSError:  # a run beside this one unpacked it first
            shutil.rmtree(tmp)
    split = datasets.FashionMNIST(root, train=train, download=True)
    # upscaled to 32×32, train and test (paper, Appendix A)
    images = F.interpolate(split.data[:, None].float(), size=32, mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8), split.targets


def load_data(args, device):
    try:
        train_x, train_y = load_split(args.dataset, args.data_dir, train=True)
        test_x, test_y = load_split(args.dataset, args.data_dir, train=False)
    except Exception as e:  # no internet, a broken download, corrupt files, a missing package
        files = Path(args.data_dir, DATASETS[args.dataset]["files"])
        hint = " or `apt-get install dataset-fashion-mnist`" * (args.dataset == "fashionmnist")
        fix = (f"{files} is there but corrupt or incomplete: delete it to download it again" if files.exists() else
               f"connect to the internet so torchvision can download it{hint}, or pass --data-dir")
        detail = (str(e).strip().splitlines() or ["no details"])[0]
        raise RuntimeError(f"cannot load {args.dataset} from {args.data_dir} ({type(e).__name__}: {detail}); {fix}") from None
    mean, std = channel_stats(train_x)
    if args.train_subset:
        train_x, train_y = train_x[:args.train_subset], train_y[:args.train_subset]
    return dict(train_x=train_x.to(device), train_y=train_y.to(device), test_x=test_x.to(device),
                test_y=test_y.to(device), mean=mean, std=std)


def channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W), on the [0, 1] scale."""
    std, mean = torch.std_mean(images.transpose(0, 1).reshape(images.shape[1], -1).float(), dim=1, correction=0)
    return mean / 255, std / 255


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
    """The plain network of args for its dataset, its spatial convs then converted by lcconv.convert."""
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
    init = covariance(args.init) if args.init.endswith(".json") else args.init
    if args.lc_limit or args.lc_init:
        form = "limit" if args.lc_limit else "init"
        return lcconv.convert(net, args.lc_limit or args.lc_init, True, init, form=form)
    form = "preconditioned" if args.preconditioned else "block"
    return lcconv.convert(net, args.expansion, args.frozen, init, args.intermediate, form)


def covariance(path):
    """The Σ of `--init FILE.json`: the "covariance" of the JSON object in it, a list of k² rows of k² numbers."""
    try:
        return torch.tensor(json.loads(Path(path).read_text())["covariance"], dtype=torch.float64, device="cpu")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read a covariance from it ({type(e).__name__}: {e})") from None


def to_device(model, device):
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
    """One pass over the training set -> (mean loss, accuracy %). The order and augmentation of epoch e
    depend only on (seed, e), so a resumed run sees the same batches."""
    model.train()
    device = data["train_y"].device
    generator = torch.Generator(device).manual_seed(args.seed * 1_000_003 + epoch)
    n = len(data["train_y"])
    order = torch.randperm(n, device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{args.epochs}", unit="img", unit_scale=True,
               leave=False, disable=None, file=sys.stderr)
    for i in range(0, n, args.batch_size):
        idx = order[i:i + args.batch_size]
        images, y = data["train_x"][idx], data["train_y"][idx]
        if DATASETS[args.dataset]["augment"]:
            images = augment(images, generator)
        loss, logits = train_step(model, optimizer, to_input(images), y, args.label_smoothing, args.precision)
        scheduler.step()
        loss_sum += loss.float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        bar.update(len(y))
    bar.close()
    return loss_sum.item() / n, 100 * correct.item() / n


# -----------------------------------------------------------------------------
# Evaluation


def accuracy(model, images, labels, batch_size, precision, fgsm_eps=0):
    """Accuracy %, clean or under l∞ FGSM of radius fgsm_eps on the [0, 1] images, before normalisation (Fig. 4c)."""
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_input(x).requires_grad_(fgsm_eps > 0)
        if fgsm_eps:
            with autocast(x.device, precision):
                grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
            x = (x + fgsm_eps * grad.sign()).clamp(0, 1)
        with torch.no_grad(), autocast(x.device, precision):
            correct += (model(x).argmax(1) == y).sum().item()
    return 100 * correct / len(labels)


def filter_metrics(net):
    """FVE of the first and last spatial layer (Fig. 5), the spatial variance and covariance (Fig. 8b), the random
    basis (lcconv.basis_summary) and up to 64 first-layer filters of the model's kernel size (Fig. 7)."""
    filters = list(lcconv.combined_filters(net).values())
    if not filters:  # every conv 1×1 (--kernel-size 1): nothing to measure
        return dict.fromkeys(("fve_first", "fve_last", "spatial_variance", "spatial_covariance", "basis",
                              "first_filters"))
    variance, sigma = lcconv.spatial_variance(net), lcconv.spatial_covariance(net)
    first = next(f for f in filters if f.shape[-2:] == variance.shape)
    first = first[:64] if first.shape[1] in (1, 3) else first[:64, :1]
    basis = [{k: round(v, 4) if isinstance(v, float) else v for k, v in layer.items()}
             for layer in lcconv.basis_summary(net)]
    return dict(fve_first=lcconv.filter_variance_entropy(filters[0])[1],
                fve_last=lcconv.filter_variance_entropy(filters[-1])[1],
                spatial_variance=[[round(v, 4) for v in row] for row in variance.tolist()],
                spatial_covariance=[[round(v, 4) for v in row] for row in sigma.tolist()], basis=basis or None,
                first_filters=first.double().mul(1e5).round().div(1e5).tolist())


# -----------------------------------------------------------------------------
# Results and checkpoints: written whole or not at all, one run per config at a time


@contextmanager
def claimed(out, config):
    """This config's lock (a file beside --out), held for the whole run: a second run of it waits, then
    finds the result. The lock goes with the process, however it ends."""
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
    """The saved state if path exists and was written by this config, else None (weights_only: never code)."""
    if not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path} ({type(e).__name__}: it is damaged, or holds "
                           "more than tensors and numbers); delete it to start over") from None
    saved = recipe(state["config"]) if isinstance(state, dict) and isinstance(state.get("config"), dict) else {}
    if saved != config:
        changed = sorted(k for k in config if saved.get(k) != config[k])
        raise RuntimeError(f"checkpoint {path} is from another config (differs in {', '.join(changed)}); "
                           "delete it or pass another --checkpoint")
    return state


def append_result(path, result):
    """One JSON line, appended under a lock in one write(): whole beside parallel runs, never glued to a
    line a crash left unfinished; a short write is taken back."""
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


def finished(path, config):
    """Whether path has a usable result line of this config (a recipe)."""
    return any(not unusable(line) and recipe(line) == config for _, line in read_lines(path))


# -----------------------------------------------------------------------------
# Main


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.benchmark:
        return benchmark(args.batch_size, device)
    config = recipe(args)
    # a run with a checkpoint or --skip-finished is finished once its result is in --out
    once = args.checkpoint or args.skip_finished
    try:
        with claimed(args.out, config) if once else nullcontext():
            if once and finished(args.out, config):
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
    learnable, total = lcconv.count_parameters(model)
    print(f"{args.model} on {args.dataset}, {hardware(device)}: {learnable:,} learnable of {total:,} parameters")

    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, optimizer, scheduler, data, args, epoch)
        epoch_times.append(time.perf_counter() - start)
        if not math.isfinite(train_loss):
            sys.exit(f"train.py: error: the loss became {train_loss} in epoch {epoch + 1}; "
                     f"lower --lr (now {args.lr}) or check the input")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  acc {train_acc:.2f}%  "
              f"lr {scheduler.get_last_lr()[0]:.2e}  {epoch_times[-1]:.1f} s", flush=True)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, dict(
                config=config, epoch=epoch + 1, epoch_times=epoch_times, train_loss=train_loss,
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict()))

    # the last epoch's model, as the paper evaluates it
    bs, precision = args.batch_size, args.precision
    result = dict(
        vars(args), test_acc=accuracy(model, data["test_x"], data["test_y"], bs, precision),
        train_acc=accuracy(model, data["train_x"], data["train_y"], bs, precision),
        fgsm_acc=accuracy(model, data["test_x"], data["test_y"], bs, precision, args.fgsm_eps),
        train_loss=train_loss, params_learnable=learnable, params_total=total, **filter_metrics(model.net),
        epoch_time_median_s=statistics.median(epoch_times),  # CUDA: allocated tensors; CPU: resident memory
        peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        hardware=hardware(device), torch=torch.__version__, code=CODE_VERSION)
    try:
        append_result(args.out, result)
    except OSError as e:
        sys.exit(f"train.py: error: could not write the result to {args.out} ({e}); rerun the same command")
    print(json.dumps({k: result[k] for k in ("test_acc", "train_acc", "fgsm_acc", "fve_first", "fve_last")}))


# -----------------------------------------------------------------------------
# Benchmark: a training step of ResNet-LC-20-16xE, frozen as one conv (folded), as two convs (the paper's block
# as drawn) and as the preconditioned conv, and learnable (folded), against the plain ResNet-20-16 ("—")

BENCH_ROWS = ([("—", 0, False)] + [(path, e, True) for path, es in [("one conv (folded)", (1, 128, 512)),
                                                                    ("two convs", (8,)), ("preconditioned", (128, 8192))]
                                   for e in es] + [("one conv (folded)", e, False) for e in (128, 256, 512)])


def bench_step(path, expansion, frozen, batch_size, device):
    """(model, optimizer, x, y) of one benchmark row: the arguments of train_step, its model as training builds it."""
    torch.manual_seed(0)
    flags = f"--expansion {expansion}" + " --frozen" * frozen + " --preconditioned" * (path == "preconditioned")
    model = to_device(build_net(parse_args(flags.split())), device)
    for block in model.modules():
        if path == "two convs" and isinstance(block, lcconv.LCConv2d):
            block.forward = block.two_convs
    x = to_input(torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device))
    return model, make_optimizer(model, 0.01, 0.9, 0.01), x, torch.randint(0, 10, (batch_size,), device=device)


def benchmark(batch_size, device):
    """Each row's ms per step in fp32 and bf16, interleaved round by round so that drift and neighbours hit all
    alike (a turn: one untimed step, which absorbs the switch of model, then steps for some seconds), and its peak
    memory, building the model and three steps (CUDA: allocated tensors; CPU: resident memory); then bench_table."""
    cuda, sync = device.type == "cuda", torch.cuda.synchronize if device.type == "cuda" else lambda: None
    precisions = ("fp32", "bf16") if not cuda or torch.cuda.is_bf16_supported() else ("fp32",)
    if not cuda:  # freed tensors go back to the system at once, so that resident memory follows the live tensors
        ctypes.CDLL(None).mallopt(-3, 65536)  # glibc's M_MMAP_THRESHOLD
    resident = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
    for precision in precisions:  # once untimed and unmeasured: the libraries' first-use set-up
        train_step(*bench_step(*BENCH_ROWS[0], batch_size, device), 0.1, precision)
    steps, memory = {}, {}
    for row in BENCH_ROWS:
        torch.cuda.reset_peak_memory_stats() if cuda else Path("/proc/self/clear_refs").write_text("5")
        start = torch.cuda.memory_allocated() / 2**20 if cuda else resident("VmRSS:")
        try:
            steps[row] = bench_step(*row, batch_size, device)
            for precision in precisions * 3:
                train_step(*steps[row], 0.1, precision)
        except (RuntimeError, MemoryError):  # out of memory
            steps.pop(row, None)
        memory[row] = (torch.cuda.max_memory_allocated() / 2**20 if cuda else resident("VmHWM:")) - start
    times, rounds = {(*row, p): [] for row in steps for p in precisions}, 5 if cuda else 7
    for _ in tqdm(range(rounds), "benchmark rounds", disable=None, file=sys.stderr):
        for (*row, precision), t in times.items():
            train_step(*steps[tuple(row)], 0.1, precision)
            sync()
            start, n = time.perf_counter(), 0
            while n < 2 or time.perf_counter() - start < (1.0 if cuda else 3.0):
                train_step(*steps[tuple(row)], 0.1, precision)
                sync()
                n += 1
            t.append((time.perf_counter() - start) / n * 1000)
    print(f"Training step, batch {batch_size}, 32×32, channels_last, {hardware(device)}, torch {torch.__version__}, "
          f"code {CODE_VERSION}; median of {rounds} interleaved rounds; ratios: median [interquartile range] "
          f"of the per-round ratios\n\n{bench_table(times, memory, precisions)}")


def bench_table(times, memory, precisions):
    """The table of {(path, E, frozen, precision): ms a round} and {(path, E, frozen): peak MB, its model out of
    memory if it has no times}; a ratio whose interquartile range exceeds 10% of it is flagged (noisy)."""
    def ratio(a, b):
        low, r, high = statistics.quantiles([x / y for x, y in zip(a, b)], n=4, method="inclusive")
        return f"{r:.2f} [{low:.2f}–{high:.2f}]" + " (noisy)" * (high - low > 0.1 * r)
    baseline = BENCH_ROWS[0]
    lines = ["| model | LC path | precision | ms/step | × baseline | × fp32 | peak MB | × baseline |", "|---" * 8 + "|"]
    for (path, e, frozen), mb in memory.items():
        name = f"LC-x{e} {'frozen' if frozen else 'learnable'}" if e else "ResNet-20-16"
        for precision, t in [(p, times.get((path, e, frozen, p))) for p in precisions]:
            fp32 = ratio(t, times[path, e, frozen, "fp32"]) if t and precision != "fp32" else "—"
            lines.append(f"| {name} | {path} | {precision} | out of memory | | | | |" if not t else
                         f"| {name} | {path} | {precision} | {statistics.median(t):.1f} | "
                         f"{ratio(t, times[(*baseline, precision)])} | {fp32} | {mb:.0f} | {mb / memory[baseline]:.2f} |")
    noisy = sum(line.count("(noisy)") for line in lines)
    return "\n".join(lines + [f"\n{noisy} ratio(s) spread by more than 10% over the rounds: the machine was "
                              "busy. Do not trust them; rerun on a quiet machine."] * bool(noisy))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # in parse_args or the benchmark; main says how a run resumes
        sys.exit("train.py: interrupted")
    except torch.cuda.OutOfMemoryError:
        sys.exit("train.py: error: out of memory; lower --batch-size or --expansion")
