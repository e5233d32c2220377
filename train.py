"""
Train and evaluate one model of Gavrikov & Keuper (arXiv:2301.11360): one run is one point
of one of the paper's tables or figures, appended as one JSON line to --out.

The recipe is the paper's (Appendix A): 75 epochs, SGD with Nesterov momentum 0.9, lr 0.01
with cosine annealing, weight decay 0.01, batch 256, label smoothing 0.1, the last epoch
evaluated. The dataset lives on the device as one uint8 tensor and is cropped and flipped
there a batch at a time (as in airbench), so the GPU never waits for data; on CUDA the model
runs in bf16 autocast and channels_last.

    python train.py --dataset cifar10 --expansion 128 --frozen     # ResNet-LC-20-16x128, frozen
    python train.py --benchmark                                     # step time and memory vs E
"""
import argparse
import gzip
import inspect
import json
import math
import multiprocessing
import os
import resource
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

import lcconv

# -----------------------------------------------------------------------------
# Command line; defaults are the paper's recipe

MODELS = ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2")
# flags that only some models take; their defaults are those of lcconv.resnet / lcconv.convmixer
ARCH_FLAGS = {"resnet": ("depth", "width", "kernel_size"),
              "convmixer": ("dim", "depth", "kernel_size", "patch_size")}
# flags that do not change what a run computes: left out when results and checkpoints are matched
NOT_RECIPE = ("data_dir", "out", "checkpoint", "save_figures", "device", "compile", "skip_finished", "benchmark")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"train.py: error: {message} (see --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=list(DATASETS), help="dataset (downloaded into --data-dir if missing)")
    p.add_argument("--data-dir", default="./data", help="where the datasets are (torchvision layout)")
    p.add_argument("--model", default="resnet", choices=MODELS,
                   help="CIFAR ResNet (He et al.), ConvMixer, or a torchvision model adapted to 32x32 (paper's Fig. 1)")
    p.add_argument("--depth", type=int, help="ResNet depth 6n+2 (default 20) or ConvMixer depth (default 8)")
    p.add_argument("--width", type=int, help="ResNet width W: stages of W, 2W, 4W channels (default 16)")
    p.add_argument("--dim", type=int, help="ConvMixer channels (default 256)")
    p.add_argument("--patch-size", type=int, help="ConvMixer patch size (default 2)")
    p.add_argument("--kernel-size", type=int, help="spatial kernel size, odd (default 3 for ResNet, 9 for ConvMixer)")
    p.add_argument("--expansion", type=int, default=0, help="LC expansion E; 0 = plain spatial convs (no LC-Block)")
    p.add_argument("--frozen", action="store_true", help="keep every spatial (k>1) filter at its random init")
    p.add_argument("--init", default="kaiming_uniform", choices=lcconv.INITS, help="spatial filter init (paper: kaiming_uniform)")
    p.add_argument("--intermediate", default="none", choices=lcconv.INTERMEDIATES, help="op between the LC-Block's convs (Table 3)")
    p.add_argument("--epochs", type=int, default=75, help="training epochs (paper: 75)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (paper: 256)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate, cosine-annealed per step (paper: 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (paper: 0.01)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (paper: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="fixes the random filters, the init and the data order")
    p.add_argument("--train-subset", type=int, help="train on the first N training images only (quick runs)")
    p.add_argument("--fgsm-eps", type=float, default=1 / 255, help="l-inf radius on [0,1] images for FGSM/PGD (paper: 1/255)")
    p.add_argument("--pgd-steps", type=int, default=0, help="PGD steps for an extra robust accuracy; 0 = off")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="results.jsonl", help="append one JSON line with config and results here")
    p.add_argument("--checkpoint", help="save after every epoch here; rerunning the same command resumes")
    p.add_argument("--skip-finished", action="store_true", help="exit at once if --out already has a result for this config")
    p.add_argument("--save-figures", metavar="DIR", help="save the combined filters and the spatial variance heatmap as PNGs")
    p.add_argument("--benchmark", action="store_true",
                   help="time a training step and measure peak memory of ResNet-20-16 vs frozen ResNet-LC-20-16xE; train nothing")
    args = p.parse_args(argv)

    for flag, value in vars(args).items():
        if value is not None and flag in sum(ARCH_FLAGS.values(), ()) and flag not in ARCH_FLAGS.get(args.model, ()):
            p.error(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
    if args.model in ARCH_FLAGS:  # fill in the model's defaults, so configs are complete
        builder = getattr(lcconv, args.model)
        for flag in ARCH_FLAGS[args.model]:
            if getattr(args, flag) is None:
                setattr(args, flag, inspect.signature(builder).parameters[flag].default)
    checks = [(args.expansion >= 0, "--expansion must be >= 0 (0 = no LC-Block)"),
              (args.kernel_size is None or (args.kernel_size >= 1 and args.kernel_size % 2),
               f"--kernel-size must be odd and >= 1, got {args.kernel_size}"),
              (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
              (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
              (args.train_subset is None or args.train_subset >= 1, "--train-subset must be >= 1"),
              (args.pgd_steps >= 0, "--pgd-steps must be >= 0"),
              (args.intermediate == "none" or args.expansion >= 1, "--intermediate needs an LC-Block (--expansion >= 1)"),
              (not Path(args.out).is_dir(), f"--out {args.out} is a directory; give a file name"),
              (not args.save_figures or not Path(args.save_figures).is_file(),
               f"--save-figures {args.save_figures} is a file; give a directory")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def recipe(args):
    """The part of the config that determines the result."""
    return {k: v for k, v in vars(args).items() if k not in NOT_RECIPE}


# -----------------------------------------------------------------------------
# Data: whole splits as uint8 tensors (N, C, 32, 32) on the device

DATASETS = {  # classes, channels, pad-4 crop + flip (CIFAR only, as in the paper)
    "cifar10": dict(classes=10, channels=3, augment=True),
    "cifar100": dict(classes=100, channels=3, augment=True),
    "svhn": dict(classes=10, channels=3, augment=False),
    "fashionmnist": dict(classes=10, channels=1, augment=False),
}
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
    except Exception as e:  # no internet, a broken download, a missing package
        hint = " or `apt-get install dataset-fashion-mnist`" if args.dataset == "fashionmnist" else ""
        raise RuntimeError(f"cannot load {args.dataset} from {args.data_dir} ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}); connect "
                           f"to the internet so torchvision can download it{hint}, or pass --data-dir") from None
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
    """The network of args for its dataset, spatial convs frozen and/or LC-Blocks as asked."""
    channels, classes = DATASETS[args.dataset]["channels"], DATASETS[args.dataset]["classes"]
    lc = dict(expansion=args.expansion, frozen=args.frozen, init=args.init, intermediate=args.intermediate)
    if args.model in ARCH_FLAGS:
        arch = {flag: getattr(args, flag) for flag in ARCH_FLAGS[args.model]}
        return getattr(lcconv, args.model)(num_classes=classes, in_channels=channels, **arch, **lc)
    net = getattr(torchvision.models, args.model)(num_classes=classes)
    # adapted to 32×32 inputs: 3×3 stride-1 stem, no max-pool
    if args.model == "mobilenet_v2":
        net.features[0][0] = nn.Conv2d(channels, 32, 3, 1, 1, bias=False)
    else:
        net.conv1, net.maxpool = nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.Identity()
    # every spatial conv drawn afresh with the paper's default init, frozen or LC as asked
    return lcconv.convert(net, **lc)


# -----------------------------------------------------------------------------
# Training


def train_step(model, optimizer, x, y, label_smoothing, autocast):
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def to_device(model, device):
    """The model on the device, channels_last on CUDA (faster convs with bf16)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def to_input(images, device):
    """uint8 (B, C, H, W) -> float [0, 1], channels_last on CUDA."""
    x = images.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train_epoch(model, optimizer, scheduler, data, epoch, args, device, autocast):
    """One pass over the training set -> (mean loss, accuracy %). The data order and the
    augmentation of epoch e depend only on (seed, e), so a resumed run sees the same batches."""
    model.train()
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
        loss, logits = train_step(model, optimizer, to_input(images, device), y, args.label_smoothing, autocast)
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
def accuracy(model, images, labels, batch_size, device, autocast):
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        with autocast():
            correct += (model(to_input(x, device)).argmax(1) == y).sum().item()
    return 100 * correct / len(labels)


def robust_accuracy(model, images, labels, eps, steps, batch_size, device, autocast, seed=0):
    """Accuracy under an l∞ attack of radius eps on [0, 1] images (before normalisation):
    FGSM for steps=1 (Goodfellow et al.), else PGD from a random start with step 2.5·eps/steps
    (Madry et al.). The attack maximises plain cross-entropy."""
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    step_size = eps if steps == 1 else 2.5 * eps / steps
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        x = to_input(x, device)
        delta = torch.zeros_like(x)
        if steps > 1:
            delta = (torch.rand(x.shape, device=device, generator=generator) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
            grad, = torch.autograd.grad(loss, delta)
            delta = (delta + step_size * grad.sign()).clamp(-eps, eps).detach()
        with torch.no_grad(), autocast():
            correct += (model((x + delta).clamp(0, 1)).argmax(1) == y).sum().item()
    return 100 * correct / len(labels)


def filter_metrics(net):
    """FVE of the first and last spatial layer (Fig. 5) and the spatial variance (Fig. 8b)."""
    filters = list(lcconv.combined_filters(net).values())
    (first_raw, first), (last_raw, last) = map(lcconv.filter_variance_entropy, (filters[0], filters[-1]))
    variance = lcconv.spatial_variance(net)
    return dict(fve_first=first, fve_last=last, fve_first_raw=first_raw, fve_last_raw=last_raw,
                spatial_variance=[[round(v, 4) for v in row] for row in variance.tolist()])


def save_figures(net, directory):
    """The first layer's combined filters as a grid (Fig. 7) and the spatial variance heatmap
    (Fig. 8b), both as PNGs. The grid shows the first layer with the model's main kernel size
    (ConvMixer: its first depthwise conv rather than the patch stem)."""
    from torchvision.utils import save_image
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    variance = lcconv.spatial_variance(net)
    filters = next(f for f in lcconv.combined_filters(net).values() if f.shape[-2:] == variance.shape)
    filters = filters if filters.shape[1] in (1, 3) else filters[:, :1]  # RGB, or the first input channel
    filters = F.interpolate(filters.cpu(), scale_factor=8, mode="nearest")
    save_image(filters, directory / "filters.png", nrow=16, normalize=True, scale_each=True, pad_value=1)
    heatmap = F.interpolate(variance[None, None].cpu(), scale_factor=32, mode="nearest")
    save_image(heatmap, directory / "spatial_variance.png", normalize=True)


def peak_memory_mb(device):
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# Checkpoints and results: written whole or not at all


def save_checkpoint(path, state):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint


def load_checkpoint(path, config, device):
    """The saved state if path exists and was written by this config, else None."""
    if not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start over") from None
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    if saved != config:
        changed = sorted(k for k in config if saved.get(k) != config[k])
        raise RuntimeError(f"checkpoint {path} is from another config (differs in {', '.join(changed)}); "
                           "delete it or pass another --checkpoint")
    return state


def append_result(path, result):
    """One JSON line, in one write() on an O_APPEND file: whole even with parallel runs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(result) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(f"short write to {path}")
    finally:
        os.close(fd)


def read_results(path):
    """The results in path (a list of dicts); lines that are not JSON are skipped."""
    results = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # not ours
            continue
    return results


def has_result(results, config):
    """Whether one of the results was run with this config."""
    return any(all(r.get(k) == v for k, v in config.items()) for r in results)


# -----------------------------------------------------------------------------
# Benchmark: a training step of frozen ResNet-LC-20-16xE, folded (one conv) vs literal (two)

BENCH_EXPANSIONS = (1, 8, 32, 128)


def bench_configs():
    configs = [("ResNet-20-16", dict(), False)]
    for e in BENCH_EXPANSIONS:
        configs += [(f"LC-x{e} frozen", dict(expansion=e, frozen=True), two) for two in (False, True)]
    return configs


def bench_setup(kwargs, two_conv, batch_size, device):
    torch.manual_seed(0)
    model = to_device(lcconv.resnet(**kwargs), device)
    if two_conv:  # the literal LC-Block instead of the folded one
        for m in model.modules():
            if isinstance(m, lcconv.LCConv2d):
                m.forward = m.forward_two_conv
    optimizer = make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=0.01)
    x = to_input(torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device), device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return model, optimizer, x, y


def bench_memory(kwargs, two_conv, batch_size, device, queue):
    """In a fresh process: peak memory of three training steps, in MB. CUDA: allocated
    tensors; CPU: resident memory above the process's start-up, capped at the free memory."""
    try:
        device = torch.device(device)
        if device.type == "cpu":
            free = int(next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (int(0.9 * free), int(0.9 * free)))
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model, optimizer, x, y = bench_setup(kwargs, two_conv, batch_size, device)
        for _ in range(3):
            train_step(model, optimizer, x, y, 0.1, autocast_for(device))
        queue.put(peak_memory_mb(device) - (0 if device.type == "cuda" else start))
    except (RuntimeError, MemoryError):  # out of memory
        queue.put(None)


def benchmark(args, device):
    autocast = autocast_for(device)
    configs = bench_configs()
    # fresh processes for clean peak-memory counters; on CPU with large blocks mmap-ed, so
    # freed tensors go back to the OS and resident memory follows the live tensors
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    spawn = multiprocessing.get_context("spawn")
    memory = []
    for name, kwargs, two in configs:
        queue = spawn.Queue()
        process = spawn.Process(target=bench_memory, args=(kwargs, two, args.batch_size, str(device), queue))
        process.start()
        process.join()
        memory.append(queue.get() if process.exitcode == 0 else None)
    # time all configs that fit, interleaved round by round so that drift hits them alike;
    # each turn starts with untimed steps (they absorb the cost of switching models), then
    # runs for about `turn` seconds and at least two steps
    runs = [bench_setup(kwargs, two, args.batch_size, device) if mb else None
            for (_, kwargs, two), mb in zip(configs, memory)]
    warmup, turn, rounds = (3, 1.0, 5) if device.type == "cuda" else (1, 4.0, 3)
    times = [[] for _ in configs]
    for _ in tqdm(range(rounds), desc="benchmark rounds", disable=None, file=sys.stderr):
        for run, t in zip(runs, times):
            if run is None:
                continue
            start = time.perf_counter()
            for _ in range(warmup):
                train_step(*run, 0.1, autocast)
            sync(device)
            steps = max(2, round(turn * warmup / (time.perf_counter() - start)))
            start = time.perf_counter()
            for _ in range(steps):
                train_step(*run, 0.1, autocast)
            sync(device)
            t.append((time.perf_counter() - start) / steps * 1000)
    median = [sorted(t)[len(t) // 2] if t else None for t in times]
    print(f"Training step, batch {args.batch_size}, 32×32, {device_name(device)}, torch {torch.__version__}; "
          f"median of {rounds} interleaved rounds\n")
    print("| model | LC path | ms/step | × baseline | peak MB | × baseline |")
    print("|---|---|---|---|---|---|")
    for (name, kwargs, two), ms, mb in zip(configs, median, memory):
        path = "—" if not kwargs else ("two convs" if two else "one conv (folded)")
        if mb is None:
            print(f"| {name} | {path} | out of memory | | | |")
            continue
        print(f"| {name} | {path} | {ms:.1f} | {ms / median[0]:.2f} | {mb:.0f} | {mb / memory[0]:.2f} |")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# Main


def autocast_for(device):
    """bf16 autocast on CUDA, a no-op elsewhere; chosen once, here."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def make_optimizer(model, lr, momentum, weight_decay):
    """SGD over the learnable parameters only: frozen filters get no update at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.benchmark:
        return benchmark(args, device)
    config = recipe(args)
    if args.skip_finished and has_result(read_results(args.out), config):
        print(f"already in {args.out}: {json.dumps(config)}")
        return
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
    autocast = autocast_for(device)
    learnable, total = lcconv.count_parameters(model)
    print(f"{args.model} on {args.dataset}, {device_name(device)}: {learnable:,} learnable of {total:,} parameters")

    for epoch in range(start_epoch, args.epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(compiled, optimizer, scheduler, data, epoch, args, device, autocast)
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
    bs = args.batch_size
    result = dict(vars(args))
    result.update(
        test_acc=accuracy(compiled, data["test_x"], data["test_y"], bs, device, autocast),
        train_acc=accuracy(compiled, data["train_x"], data["train_y"], bs, device, autocast),
        fgsm_acc=robust_accuracy(compiled, data["test_x"], data["test_y"], args.fgsm_eps, 1, bs, device, autocast),
        pgd_acc=(robust_accuracy(compiled, data["test_x"], data["test_y"], args.fgsm_eps, args.pgd_steps, bs,
                                 device, autocast, args.seed) if args.pgd_steps else None),
        train_loss=train_loss, params_learnable=learnable, params_total=total,
        **filter_metrics(model.net),
        epoch_time_s=sum(epoch_times) / len(epoch_times), peak_mem_mb=peak_memory_mb(device),
        device=device_name(device), torch=torch.__version__)
    if args.save_figures:
        save_figures(model.net, args.save_figures)
    append_result(args.out, result)
    print(json.dumps({k: result[k] for k in ("test_acc", "train_acc", "fgsm_acc", "fve_first", "fve_last")}))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; rerun the same command to resume from --checkpoint")
    except torch.cuda.OutOfMemoryError:
        sys.exit("train.py: error: out of memory; lower --batch-size or --expansion")
