#!/usr/bin/env bash
""":"
# bash runs these lines and hands the file to Python (PYTHON, else python, else python3);
# Python reads them as a string. Portable sh: bash 3.2, dash.
[ -n "${PYTHON:-}" ] || command -v python >/dev/null 2>&1 || export PYTHON=python3
exec "${PYTHON:-python}" "$0" "$@"
"""
__doc__ = """\
Reproduce Gavrikov & Keuper, "The Power of Linear Combinations: Learning with Random Convolutions" (arXiv:2301.11360):
the train.py runs behind its tables and figures, then $RESULTS/REPORT.md, ours beside the paper's, and its plots.

  bash experiments.sh                     every group below, one run at a time, then the report
  bash experiments.sh kernel ablation     only these groups
  bash experiments.sh --list [GROUP...]   the train.py commands, one per line; run nothing. Many GPUs: SLURM, or
                                          parallel -j 4 'CUDA_VISIBLE_DEVICES=$(({%} - 1)) {}' < runs.txt
  bash experiments.sh report              rebuild $RESULTS/REPORT.md and its plots from the results
  SEEDS=0 bash experiments.sh recipe      the paper's recipe on all 60,000 Fashion-MNIST images, for a CPU:
                                          75 epochs, and 5 and 15 (EPOCHS and TRAIN_SUBSET do not apply)
  SEEDS="0 1" bash experiments.sh expansion15    Fig. 4 and 5 on all of Fashion-MNIST at 15 epochs, for a CPU
  QUICK=1 bash experiments.sh             the quick group: Table 1's Fashion-MNIST row at 3 epochs on all images
  QUICK=1 bash experiments.sh expansion mechanism length    those groups at 100 SGD steps (5 epochs on the
                                          first 5,000 images): fast, but their differences are mostly seed noise

Settings, from the environment (paper's defaults): SEEDS="0 1 2 3"  EPOCHS=75  DATASETS="cifar10 cifar100 svhn
fashionmnist" (groups keep only runs on these)  DATA_DIR=./data  RESULTS=results  TRAIN_SUBSET="" (train on the
first N images)  TRAIN_ARGS="" (added to every run, overriding it)  PYTHON=python. QUICK=1 makes the defaults
SEEDS=0 EPOCHS=5 DATASETS=fashionmnist TRAIN_SUBSET=5000 RESULTS=results-quick.

A run appends a JSON line to $RESULTS/<dataset>-<epochs>ep[-<N images>].jsonl, one small file per training setting,
kept in git; a run with a line there (in either precision) is skipped, an interrupted one resumes from
$RESULTS/checkpoints, a failed one is reported and the exit status is 1. Runs go seed by seed, so that one seed's
curve is complete first. The report reads every *.jsonl in $RESULTS.
"""
import collections
import functools
import hashlib
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

MISSING = None  # the module this Python lacks: --help works without it, all else says what to install
try:
    import torch
    import torch.nn.functional as F

    import train
except ModuleNotFoundError as e:
    MISSING = e.name

# -----------------------------------------------------------------------------
# Settings: the environment, with the paper's defaults; QUICK=1 scales them to a 2-core CPU

DEFAULTS = dict(SEEDS="0 1 2 3", EPOCHS="75", DATASETS="", DATA_DIR="./data",  # DATASETS: all of train.py's
                RESULTS="results", TRAIN_ARGS="", PYTHON="python", TRAIN_SUBSET="")
QUICK_DEFAULTS = dict(SEEDS="0", EPOCHS="5", DATASETS="fashionmnist", RESULTS="results-quick", TRAIN_SUBSET="5000")


def die(message):
    """Bad input: one line on stderr, exit 2, before any work."""
    print(f"experiments.sh: {message}", file=sys.stderr)
    sys.exit(2)


def read_settings(env):
    quick = env.get("QUICK", "0") == "1"
    def get(name):  # as bash's ${NAME:-default}: unset or empty takes the default
        return env.get(name) or (quick and QUICK_DEFAULTS.get(name)) or DEFAULTS[name]
    s = types.SimpleNamespace(  # results: as given, the commands use it verbatim; env: what the runs get
        quick=quick, seeds=get("SEEDS").split(), epochs=get("EPOCHS"), train_subset=get("TRAIN_SUBSET"),
        datasets=get("DATASETS").split() or list(train.DATASETS), data_dir=get("DATA_DIR"), results=get("RESULTS"),
        train_args=get("TRAIN_ARGS"), python=get("PYTHON"), env=dict(env),
        main="fashionmnist" if quick else "cifar10")  # the dataset of the one-dataset figures
    if unknown := [d for d in s.datasets if d not in train.DATASETS]:
        die(f"DATASETS has {' '.join(unknown)}; datasets: {' '.join(train.DATASETS)}")
    try:
        shlex.split(s.train_args)
    except ValueError as e:
        die(f"TRAIN_ARGS={s.train_args!r}: {e}")
    return s


# -----------------------------------------------------------------------------
# Groups: each one's runs (train.py flags without seed and paths; a config in several groups runs once) and the
# tables that read their results. A cell holds the runs whose config is exactly default_config(model) updated by
# the report part's setting and precision, the dataset, the table's base, the row's keys and the column's, every
# seed: runs of another value of any flag (one added to train.py later too) stay out.

# config: keys beyond the row's; minus: for a gain column, the keys whose metric it subtracts, seed by seed
Column = collections.namedtuple("Column", "config metric minus", defaults=("test_acc", None))


@dataclass(eq=False)  # a table is its own key: a part shows each once
class Table:
    title: str  # what it shows, and the paper's table or figure
    row_name: str  # the first column's header
    rows: dict  # row label -> its keys
    columns: dict  # column label -> Column
    base: dict = field(default_factory=dict)  # keys every run of it has beyond default_config(model)
    found: str = ""  # what the paper found (or we ask), one fixed line
    paper: dict = field(default_factory=dict)  # row label -> {column label: the paper's number}, beside ours
    paper_dataset: str = None  # the dataset of the paper's numbers; None: the rows say it
    spans: bool = False  # rows are schedules: it reads runs of every setting (the rest the paper's)
    min_rows: int = 2  # rows with a number of ours that it takes to show the table
    plot: str = None  # "expansion" or "length": the figure drawn from it
    precision: str = None  # its runs in this precision only; None: a seed's run in either, fp32 where it has both


Group = collections.namedtuple("Group", "name figure configs tables")  # figure: what it shows, for --help
GROUPS = {}  # name -> Group, in the order a whole sweep runs them


def group(name, figure, *tables):
    """Registers the function it is given (settings -> configs) as a group with these tables."""
    def register(configs):
        GROUPS[name] = Group(name, figure, configs, tables)
        return configs
    return register


def flags(*words):
    """train.py flags from words and numbers: flags("--expansion", 8) -> ["--expansion", "8"]."""
    return [str(w) for w in words]


def pair(*words):  # the config with learnable and with frozen spatial filters
    return [flags(*words), flags(*words, "--frozen")]


def lc_init(e):  # the plain model started at that limit's filters
    return dict(expansion=0, frozen=False, lc_init=e)


PAPER_TABLE1 = {  # baseline, LC learnable x128, LC frozen x128
    "cifar10": ("91.60 ± 0.23", "91.39 ± 0.29", "91.89 ± 0.10"),
    "cifar100": ("60.84 ± 0.52", "59.44 ± 0.55", "61.31 ± 0.74"),
    "fashionmnist": ("93.65 ± 0.18", "93.44 ± 0.18", "93.65 ± 0.06"),
    "svhn": ("96.36 ± 0.04", "96.31 ± 0.08", "96.34 ± 0.11"),
}
PAPER_TABLE3 = {  # frozen, learnable; ResNet-LC-20-16x64 on CIFAR-10
    "none": ("91.71 ± 0.08", "91.18 ± 0.10"), "relu": ("92.78 ± 0.31", "93.38 ± 0.15"),
    "bn": ("91.50 ± 0.15", "91.06 ± 0.23"), "bn_relu": ("93.26 ± 0.18", "94.72 ± 0.16"),
}
EXPANSIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # Fig. 4
LC_EXPANSIONS = (1, 2, 4, 8, 16, 32, 64, 128)          # Fig. 8
KERNEL_SIZES = (3, 5, 7, 9)                            # Fig. 7-9
OFF_THE_SHELF = ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2")  # Fig. 1
FROZEN, PRECONDITIONED = dict(frozen=True), dict(frozen=True, preconditioned=True)
LC_128, FROZEN_128 = dict(expansion=128), dict(expansion=128, frozen=True)
LEARNABLE_FROZEN = {"learnable": Column({}), "frozen": Column(FROZEN)}


TABLE1 = Table(
    "Table 1: ResNet-20-16 vs ResNet-LC-20-16x128, test accuracy %", "dataset",
    {ds: dict(dataset=ds) for ds in PAPER_TABLE1},
    {"baseline": Column({}), "LC learnable": Column(LC_128), "LC frozen": Column(FROZEN_128),
     "gain, LC learnable": Column(LC_128, minus={}), "gain, LC frozen": Column(FROZEN_128, minus={}),
     "frozen − learnable": Column(FROZEN_128, minus=LC_128),
     **{f"FGSM {label}": Column(config, "fgsm_acc") for label, config in [
         ("baseline", {}), ("LC learnable", LC_128), ("LC frozen", FROZEN_128)]}}, min_rows=1,
    paper={ds: dict(zip(("baseline", "LC learnable", "LC frozen"), p)) for ds, p in PAPER_TABLE1.items()},
    found="Paper (4 seeds): frozen LC x128 beats learnable LC x128 everywhere, at most 0.02 below the baseline. Gains: "
          "over the same seed's baseline; frozen − learnable: paired by seed too.")
WITHIN_BF16 = dict(precision="bf16", found="A seed whose run is in fp32 only stays out; gains pair bf16 with bf16.")
TABLE1_BF16 = replace(  # shown where it differs from TABLE1: where that one pairs across precisions
    TABLE1, title="Table 1 within bf16: every run and gain in one precision", paper={}, **WITHIN_BF16)
group("table1", "Table 1: baseline vs LC x128 learnable vs frozen, four datasets", TABLE1)(
    lambda s: (c for ds in PAPER_TABLE1 for c in [flags("--dataset", ds), *pair("--dataset", ds, "--expansion", 128)]))


# A row holds E as --expansion and --lc-init; each column unsets the one it does not mean (E = 0: the baseline)
AS_BLOCK, BASELINE = dict(lc_init=None), dict(expansion=0, lc_init=None)
FIG4_KINDS = {"frozen": dict(AS_BLOCK, **FROZEN), "learnable": AS_BLOCK,
              "preconditioned": dict(AS_BLOCK, **PRECONDITIONED), "--lc-init": dict(expansion=0)}
FIG4 = Table(
    "Fig. 4: ResNet-LC-20-16xE, test and FGSM accuracy %, gains paired by seed", "E (0: no LC)",
    {e: dict(expansion=e, lc_init=e) for e in (0, *EXPANSIONS, 2048, 8192)},
    {**{f"{name}, {kind}": Column(config, metric) for name, metric in [("test acc", "test_acc"), ("FGSM", "fgsm_acc")]
        for kind, config in FIG4_KINDS.items()},
     "gain, frozen": Column(FIG4_KINDS["frozen"], minus=BASELINE),
     "gain, learnable": Column(AS_BLOCK, minus=BASELINE),
     "frozen − learnable": Column(FIG4_KINDS["frozen"], minus=AS_BLOCK),
     "FGSM gain, frozen": Column(FIG4_KINDS["frozen"], "fgsm_acc", minus=BASELINE),
     "gain, preconditioned": Column(FIG4_KINDS["preconditioned"], minus=BASELINE),
     "FGSM gain, preconditioned": Column(FIG4_KINDS["preconditioned"], "fgsm_acc", minus=BASELINE),
     **{f"{metric}{kind} − --lc-init": Column(FIG4_KINDS[kind], key, minus=FIG4_KINDS["--lc-init"])
        for metric, key in [("", "test_acc"), ("FGSM ", "fgsm_acc")] for kind in ("frozen", "preconditioned")}},
    min_rows=3, plot="expansion", found="Paper (CIFAR-10): (a) learnable LC at or below the baseline (E = 0) at every "
    "E; (b) frozen LC above learnable from E = 8 and above the baseline at E = 128, then declining slightly; (c) frozen "
    "LC's FGSM accuracy rising with E, above both. Beyond the paper: *preconditioned* is frozen LC trained as one "
    "conv, *--lc-init* its large-E limit under BatchNorm.")
FIG4_BF16 = replace(  # shown, and drawn instead of FIG4, where it differs: where a seed's curve mixes precisions
    FIG4, title="Fig. 4 within bf16: every run and gain in one precision", **WITHIN_BF16)
FIG5 = Table(
    "Fig. 5: ResNet-LC-20-16xE, learnable parameters and FVE of the first and last spatial layer", "E (0: no LC)",
    {e: dict(expansion=e) for e in (0, *EXPANSIONS)},
    {f"{name}, {kind}": Column(config, metric) for name, metric in [
        ("params", "params_learnable"), ("FVE first", "fve_first"), ("FVE last", "fve_last")]
     for kind, config in (("frozen", FROZEN), ("learnable", {}))}, min_rows=3,
    found="Paper (CIFAR-10): (d) frozen LC's FVE stays above the baseline's and learnable LC's.")


@group("expansion", "Fig. 4 (accuracy, FGSM) and Fig. 5 (params, FVE): E = 1 ... 512", FIG4, FIG4_BF16, FIG5)
def expansion_runs(s):
    yield flags("--dataset", s.main)
    for e in (1, 4, 16, 64, 128) if s.quick else EXPANSIONS:
        yield from pair("--dataset", s.main, "--expansion", e)


@group("expansion15", "Fig. 4 and 5 on all of Fashion-MNIST at 15 epochs, for a CPU: E = 1 ... 8192", FIG4, FIG5)
def expansion15_runs(s):  # its own schedule: EPOCHS and TRAIN_SUBSET do not apply
    # learnable LC x256 and x512 (77 M and 154 M parameters) are left out: 1.9x and 2.8x a baseline step (--benchmark)
    setting = ("--dataset", "fashionmnist", "--epochs", 15)
    yield flags(*setting)
    yield from (flags(*setting, "--expansion", e, "--frozen") for e in EXPANSIONS)
    yield from (flags(*setting, "--expansion", e) for e in LC_EXPANSIONS)
    yield from (flags(*setting, "--expansion", e, "--frozen", "--preconditioned") for e in (2048, 8192))
    yield from (flags(*setting, "--lc-init", e) for e in (8, 32, 128, 512, 2048))


def scaling(key, sizes, figure, found):
    """Fig. 6: frozen vs learnable at E = 1 as one size of the ResNet grows."""
    group(key, f"{figure}: {key} = {sizes[0]} ... {sizes[-1]}, E = 1", Table(
        f"{figure}: {key}, E = 1, test accuracy %", key, {x: {key: x} for x in sizes}, LEARNABLE_FROZEN,
        base=dict(expansion=1), found=found))(
        lambda s: (c for x in sizes for c in pair("--dataset", s.main, "--expansion", 1, f"--{key}", x)))


scaling("width", (16, 32, 64, 128, 256), "Fig. 6a", "Paper: frozen catches up as W grows; break-even at W ≈ 128.")
scaling("depth", (20, 32, 56, 110, 164, 260), "Fig. 6b", "Paper: frozen catches up as D grows; break-even at D ≈ 260.")


# The paper's open question (Section 6): does an init with more variance in the kernel centre close the large-kernel
# gap? Two arms: `center` (ours), and the oracle, frozen filters drawn from the covariance Σ of the kernels that the
# baseline learned at k = 9 (lcconv.spatial_covariance), the best an init built on second moments can do. In the
# report a run of `--init FILE.json` has init "covariance"; FILE is written from the lowest seed's baseline.
CENTER_E, ORACLE_E, ORACLE_K = (0, 1, 8, 64), (1, 8, 64), 9


def covariance_file(s, setting):  # where a setting's oracle Σ is kept, beside its results
    return f"{s.results}/covariance/{setting}-k{ORACLE_K}.json"


def init_arms(*setting, covariance):
    """`center` at k = 3 and 9 (learned filters and frozen LC x1, x8, x64), the oracle at k = 9 (frozen LC)."""
    for k, e in [(k, e) for k in (3, ORACLE_K) for e in CENTER_E]:
        yield flags(*setting, "--kernel-size", k, *["--expansion", e, "--frozen"] * bool(e), "--init", "center")
    for e in ORACLE_E:
        yield flags(*setting, "--kernel-size", ORACLE_K, "--expansion", e, "--frozen", "--init", covariance)


@group("kernel", "Fig. 7-9: k = 3 ... 9, learned filters vs LCs of frozen random ones; centred and oracle inits", Table(
    "Fig. 8a: kernel size k and E, test accuracy %", "k, spatial filters",
    {**{f"{k}, {kind}": dict(kernel_size=k, frozen=kind == "frozen") for k in KERNEL_SIZES
        for kind in ("learnable", "frozen")},
     **{f"{k}, {kind}, center": dict(kernel_size=k, frozen=kind == "frozen", init="center") for k in (3, ORACLE_K)
        for kind in ("learnable", "frozen")},
     f"{ORACLE_K}, frozen, oracle": dict(kernel_size=ORACLE_K, frozen=True, init="covariance")},
    {"no LC": Column(dict(expansion=0)), **{f"E = {e}": Column(dict(expansion=e)) for e in LC_EXPANSIONS}},
    found="Paper: the frozen-vs-learnable gap grows with k and shrinks with E. Open question: does a centred init "
          "close it? *center*: ours; *oracle*: Σ that the baseline learned at k = 9.", min_rows=3))
def kernel_runs(s):
    for k, e in [(k, e) for k in KERNEL_SIZES for e in (0, *LC_EXPANSIONS)]:
        yield from pair("--dataset", s.main, "--kernel-size", k, *["--expansion", e] * bool(e))
    setting = f"{s.main}-{s.epochs}ep" + f"-{s.train_subset}" * bool(s.train_subset)
    yield from init_arms("--dataset", s.main, covariance=covariance_file(s, setting))


# The same question on a CPU: 5 epochs on all of Fashion-MNIST. A row is k and the frozen filters' init; every gap is
# to the same k's baseline (learned filters, default init), paired by seed. x512 runs preconditioned: at k = 9 its
# folded step costs twice the preconditioned one.
KERNEL5_E = (1, 8, 64, 512)
KERNEL5_INITS = {"": "kaiming_uniform", ", center": "center", ", oracle": "covariance"}
KERNEL5_FROZEN = {e: dict(expansion=e, frozen=True, preconditioned=e == 512) for e in KERNEL5_E}
LEARNED = dict(expansion=0, frozen=False, preconditioned=False)
KERNEL5 = Table(
    "Fig. 8a on a CPU: frozen LC xE against kernel size k and init, test accuracy %, gaps to the same k's baseline",
    "k, init", {f"{k}{label}": dict(kernel_size=k, init=init) for label, init in KERNEL5_INITS.items()
                for k in KERNEL_SIZES},
    {"learned filters": Column(LEARNED), **{f"frozen x{e}": Column(c) for e, c in KERNEL5_FROZEN.items()},
     "learnable x8": Column(dict(expansion=8, frozen=False, preconditioned=False)),
     **{f"gap x{e}": Column(c, minus=dict(LEARNED, init="kaiming_uniform")) for e, c in KERNEL5_FROZEN.items()},
     "gap, learnable x8": Column(dict(expansion=8, frozen=False, preconditioned=False),
                                 minus=dict(LEARNED, init="kaiming_uniform")),
     "gap, learned filters": Column(LEARNED, minus=dict(LEARNED, init="kaiming_uniform"))},
    base=dict(dataset="fashionmnist"), min_rows=2, plot="kernel",
    found="Paper (CIFAR-10, 75 epochs): (e) the gap grows with k, (f) shrinks with E. Open question: does a centred "
          "init close it? Beyond the paper: the oracle init (Σ the baseline learned at k = 9); m/d = E/k² in the "
          "convs of equal width. x512 is preconditioned. Gaps: frozen LC (of the row's init) − the baseline of the "
          "same k with the default init, seed by seed.")
KERNEL5_BF16 = replace(KERNEL5, title="Fig. 8a on a CPU within bf16: every run and gap in one precision", **WITHIN_BF16)
KERNEL5_CENTRE = replace(  # center's start: init_std(…, "center")'s centre² over its mean² (no torch here, for --help)
    KERNEL5, title="Fig. 8b on a CPU: the variance at the kernel centre over its mean over the k×k positions",
    columns={name: Column(c.config, "centre") for name, c in KERNEL5.columns.items() if c.minus is None}, plot=None,
    found="Paper (Fig. 8b, CIFAR-10): learned filters put more variance in the centre as k grows; frozen LC's "
          "stay flat. 1 is flat (i.i.d. init); center's envelope starts at 5.0 (k = 3) and 5.1 (k = 9).")


@group("kernel5", "Fig. 7-8 on all of Fashion-MNIST at 5 epochs, for a CPU: k = 3 ... 9, E = 1 ... 512, "
       "centred and oracle inits", KERNEL5, KERNEL5_BF16, KERNEL5_CENTRE)
def kernel5_runs(s):  # its own schedule: EPOCHS and TRAIN_SUBSET do not apply
    setting = ("--dataset", "fashionmnist", "--epochs", 5)
    for k in KERNEL_SIZES:
        yield flags(*setting, "--kernel-size", k)
        yield from (flags(*setting, "--kernel-size", k, "--expansion", e, "--frozen",
                          *["--preconditioned"] * (e == 512)) for e in KERNEL5_E)
        yield flags(*setting, "--kernel-size", k, "--expansion", 8)
    yield from init_arms(*setting, covariance=covariance_file(s, "fashionmnist-5ep"))


group("ablation", "Table 3: an op between the LC-Block's two convs, E = 64", Table(
    "Table 3: ResNet-LC-20-16x64, an op between the LC-Block's two convs, test accuracy %", "intermediate",
    {op: dict(intermediate=op) for op in PAPER_TABLE3}, LEARNABLE_FROZEN, base=dict(expansion=64),
    paper={op: dict(frozen=f, learnable=l) for op, (f, l) in PAPER_TABLE3.items()}, paper_dataset="cifar10",
    found="Paper (CIFAR-10): BN + ReLU between the two convs helps learnable LC most."))(
    lambda s: (c for op in PAPER_TABLE3 for c in pair("--dataset", s.main, "--expansion", 64, "--intermediate", op)))


group("offtheshelf", "Fig. 1: do nets with 1x1 convs after their spatial convs tolerate random filters?", Table(
    "Fig. 1: off-the-shelf models, learnable vs frozen random spatial convs, test accuracy %", "model",
    {m: dict(model=m) for m in OFF_THE_SHELF},
    {**LEARNABLE_FROZEN, "drop": Column({}, minus=FROZEN)}, found="Paper (CIFAR-10): nets with 1×1 convs after their "
    "spatial convs (ResNet-50, MobileNet v2) lose 1.6–1.9 points; Basic-Block nets (ResNet-18, -20) at least 16."))(
    lambda s: (c for model in OFF_THE_SHELF for c in pair("--dataset", s.main, "--model", model)))


# A frozen LC-Block trains as one conv with its gradient times the fixed P = SᵀS of its filters (--preconditioned);
# for m = E·c_out ≫ d = c_in·k², P → α·I, a plain conv (--lc-limit E), under BatchNorm a smaller init (--lc-init E).
MECHANISM_E = dict(frozen=EXPANSIONS, learnable=EXPANSIONS, limit=EXPANSIONS + (2048, 8192, 32768),
                   init=EXPANSIONS + (2048, 8192, 32768), preconditioned=(8, 128, 512, 2048, 8192, 32768))
# QUICK: frozen, learnable LC as in the expansion group; past E = 128 preconditioned, at the plain ResNet's cost
MECHANISM_QUICK_E = dict(frozen=(4, 128), learnable=(4, 128), limit=(4, 128, 512, 2048), init=(4, 128, 2048),
                         preconditioned=(128, 512, 2048))
MECHANISM_ES = (0, *sorted({*MECHANISM_E["limit"], *MECHANISM_E["preconditioned"]}))
# a row holds E in each flag that takes it; each column unsets those it does not mean
AS_LC, AS_LIMIT, AS_INIT = dict(lc_limit=None, lc_init=None), dict(expansion=0, lc_init=None), dict(expansion=0, lc_limit=None)


@group("mechanism", "why it works (beyond the paper): frozen LC xE vs its large-E limit, E = 1 ... 32768", Table(
    "Why it works: frozen LC xE vs its large-E limit, test accuracy %", "E (0: no LC)",
    {e: dict(expansion=e, lc_limit=e, lc_init=e) for e in MECHANISM_ES},
    {"frozen LC": Column(dict(AS_LC, **FROZEN)), "preconditioned": Column(dict(AS_LC, **PRECONDITIONED)),
     "learnable LC": Column(AS_LC), "limit": Column(AS_LIMIT), "init": Column(AS_INIT)}, min_rows=3,
    found="Not in the paper. *preconditioned*: frozen LC trained as one conv with its gradient times P; *limit*: "
          "`--lc-limit E`, P = α·I; *init*: `--lc-init E`, the limit under BatchNorm."), Table(
    "The random basis of frozen LC xE: lcconv.basis_summary over its spatial layers", "E, form",
    {f"{e}, {form}": dict(expansion=e, frozen=True, preconditioned=form == "preconditioned")
     for e in MECHANISM_ES[1:] for form in ("folded", "preconditioned")},
    {label: Column({}, metric) for label, metric in [
        ("rank/d, smallest", "rank"), ("α, smallest", "alpha_min"), ("α, largest", "alpha_max"),
        ("spread of P, largest", "spread"), ("Marchenko-Pastur", "spread_mp")]},
    found="Not in the paper; its reviewers asked how rank-complete the random basis is."))
def mechanism_runs(s):
    es, ds = MECHANISM_QUICK_E if s.quick else MECHANISM_E, s.main
    yield flags("--dataset", ds)
    for kind, flag, *rest in [("frozen", "--expansion", "--frozen"), ("limit", "--lc-limit"), ("init", "--lc-init"),
                              ("learnable", "--expansion"), ("preconditioned", "--expansion", "--frozen",
                                                             "--preconditioned")]:
        yield from (flags("--dataset", ds, flag, e, *rest) for e in es[kind])


# Over time: does the gain fade as training forgets the init, or does the early phase pick a solution that the long
# run keeps? Rows are schedules, the rest of the setting the paper's; the first: QUICK's 100 SGD steps.
LENGTH_KINDS = {"frozen LC x128": FROZEN_128, "learnable LC x128": LC_128,
                "preconditioned x128": dict(FROZEN_128, preconditioned=True), "--lc-init 128": lc_init(128)}
LENGTH_FASHIONMNIST = Table(
    f"The length axis on fashionmnist: {', '.join(LENGTH_KINDS)} against the baseline, test accuracy %", "schedule",
    {"5 epochs on 5,000 images": dict(epochs=5, train_subset=5000),
     **{f"{n} epochs": dict(epochs=n) for n in (3, 5, 15, 75)}},
    {"baseline": Column({}), **{name: column for label, config in LENGTH_KINDS.items() for name, column in
                                [(label, Column(config)), (f"gain, {label}", Column(config, minus={}))]},
     **{f"FGSM {label}": Column(LENGTH_KINDS.get(label, {}), "fgsm_acc") for label in
        ("baseline", "frozen LC x128", "learnable LC x128", "--lc-init 128")},
     "FGSM gain, frozen LC x128": Column(FROZEN_128, "fgsm_acc", minus={})}, base=dict(dataset="fashionmnist"), spans=True,
    found="Paper: at 75 epochs only, frozen LC x128 +0.00 over the baseline (Table 1).", min_rows=1, plot="length")
# Is the init forgotten? Under BatchNorm a filter's scale sets only its effective learning rate, and weight decay pulls
# every norm to one equilibrium; frozen LC xE trains as the plain net from K/sqrt(alpha), which is --lc-init E
FORGOTTEN_FASHIONMNIST = Table(
    "Is the init forgotten? RMS of the first layer's filters: the baseline, --lc-init 128, and frozen LC x128's "
    "combined filters over sqrt(alpha)", "schedule", LENGTH_FASHIONMNIST.rows,
    {"baseline": Column({}, "first_rms"), "--lc-init 128": Column(lc_init(128), "first_rms"),
     "frozen LC x128 / sqrt(alpha)": Column(FROZEN_128, "first_rms_limit")}, base=dict(dataset="fashionmnist"),
    spans=True, min_rows=1, found="Not in the paper. At init (the 3x3 stem on 1 channel): 0.192, 0.0128, 0.0128. "
    "Forgotten: the second meets the first; trained as the large-E limit: the third tracks the second.")


@group("recipe", "the paper's recipe on all of Fashion-MNIST, for a CPU: 75 epochs, and 5 and 15", TABLE1,
       TABLE1_BF16, LENGTH_FASHIONMNIST, FORGOTTEN_FASHIONMNIST)
def recipe_runs(s):  # its own schedules on all 60,000 images: EPOCHS and TRAIN_SUBSET do not apply
    for epochs in (75, 5, 15):
        for kind in [[], ["--expansion", 128, "--frozen"], ["--expansion", 128], ["--lc-init", 128]]:
            yield flags("--dataset", "fashionmnist", "--epochs", epochs, *kind)


@group("quick", "what QUICK=1 runs: Table 1's Fashion-MNIST row at 3 epochs on all 60,000 images", TABLE1,
       LENGTH_FASHIONMNIST)
def quick_runs(s):  # its own schedule, on all images: about 10 minutes on a 2-core CPU with native bf16
    for kind in [[], ["--expansion", 128, "--frozen"], ["--expansion", 128]]:
        yield flags("--dataset", "fashionmnist", "--epochs", 3, *kind)


@group("length", "the length axis at the settings' schedule (QUICK: its 100-step row, for more seeds)",
       LENGTH_FASHIONMNIST, FORGOTTEN_FASHIONMNIST)
def length_runs(s):
    for kind in [[], ["--expansion", 128, "--frozen"], ["--expansion", 128, "--frozen", "--preconditioned"],
                 ["--expansion", 128], ["--lc-init", 128]]:
        yield flags("--dataset", "fashionmnist", *kind)


QUICK_GROUPS = ("quick",)
TABLES = list(dict.fromkeys(t for g in GROUPS.values() for t in g.tables))  # each once, in the groups' order

# -----------------------------------------------------------------------------
# Runs: each config on the chosen datasets, once per seed, with its paths

Run = collections.namedtuple("Run", "group argv out checkpoint log")  # argv: train.py's; out: its results file


def setting_name(c):  # a training setting as its results file is named
    return f"{c['dataset']}-{c['epochs']}ep" + f"-{c['train_subset']}" * bool(c["train_subset"])


def runs_of(groups, s):
    """The groups' runs, seed by seed, each config once (groups share some), in its first group."""
    runs = {}
    for seed, group, config in [(seed, group, config) for seed in s.seeds for group in groups
                                for config in group.configs(s)]:
        if config[config.index("--dataset") + 1] not in s.datasets:
            continue
        text = " ".join(config)
        # the settings' schedule, unless the config brings its own (--epochs and all images)
        epochs = [] if "--epochs" in config else flags("--epochs", s.epochs)
        subset = flags("--train-subset", s.train_subset) if epochs and s.train_subset else []
        recipe, extra = [*config, "--seed", seed, *epochs, *subset], shlex.split(s.train_args)
        digest = hashlib.md5(shlex.join(recipe + extra).encode()).hexdigest()[:8]  # the name is unique to the run
        name = f"{text.replace('--', '').replace(' ', '_').replace('/', '_')}_seed_{seed}-{digest}"  # a file, not a folder
        args = train.PARSER.parse_args(recipe + extra)  # the schedule after TRAIN_ARGS; a bad flag: exit 2
        out, checkpoint = f"{s.results}/{setting_name(vars(args))}.jsonl", f"{s.results}/checkpoints/{name}.pt"
        argv = [*recipe, "--data-dir", s.data_dir, "--out", out, "--checkpoint", checkpoint, "--skip-finished", *extra]
        runs.setdefault(json.dumps(vars(args)), Run(group.name, argv, out, checkpoint, f"{s.results}/logs/{name}.log"))
    return list(runs.values())


def seed_run(config):  # a config less its precision: the report counts one run a seed, and so does a sweep
    return json.dumps({**train.recipe(config), "precision": None}, sort_keys=True)


def unfinished(runs):
    """(run, its arguments) for the runs without a usable line of their config in their results file, in either
    precision (a bad SEEDS, EPOCHS or TRAIN_ARGS: one line, exit 2); train.py's --skip-finished asks again, for
    its own precision, for a second sweep on the same RESULTS."""
    done = {seed_run(line) for out in {run.out for run in runs} for _, line in train.read_lines(out) if not train.unusable(line)}
    return [(run, args) for run in runs if seed_run(args := train.parse_args(run.argv)) not in done]


# -----------------------------------------------------------------------------
# The oracle's Σ: a file written once from a baseline's result line, then kept beside the results (in git)

LC_FLAGS = {"--expansion": 1, "--frozen": 0, "--preconditioned": 0, "--init": 1}  # flag: the values it takes


def covariance_ready(run):
    """Whether the Σ file of a run of `--init FILE.json` is there (any other run: True), writing it if it is missing
    from the spatial_covariance of the lowest seed's baseline in the run's results file: the run's own flags less
    the LC flags and --init, learned filters at the default init."""
    init = train.PARSER.parse_args(run.argv).init
    if not init.endswith(".json") or Path(init).exists():
        return True
    argv, i = [], 0
    while i < len(run.argv):
        flag = run.argv[i]
        argv += [] if flag in LC_FLAGS else [flag]
        i += 1 + LC_FLAGS.get(flag, 0)
    key = lambda config: json.dumps({**train.recipe(config), "seed": None, "precision": None}, sort_keys=True)
    baseline = key(train.parse_args(argv))
    lines = sorted((line for _, line in train.read_lines(run.out) if not train.unusable(line) and key(line) == baseline
                    and tensor(line.get("spatial_covariance"), 2) is not None), key=lambda line: line["seed"])
    if lines:
        source = {k: lines[0].get(k) for k in ("dataset", "epochs", "train_subset", "kernel_size", "seed", "precision",
                                               "hardware", "code", "test_acc")}
        write_whole(Path(init), json.dumps(dict(covariance=lines[0]["spatial_covariance"], baseline=source)).encode())
    return bool(lines)


# -----------------------------------------------------------------------------
# The plan: runs and SGD steps per group; the time they take depends on the machine and the model


def print_plan(runs, todo):
    print("| group | runs | to run | SGD steps to run |\n|---|---|---|---|")
    for g in [*dict.fromkeys(r.group for r in runs), "all"]:
        args = [a for r, a in todo if g in (r.group, "all")]
        print(f"| {g} | {sum(g in (r.group, 'all') for r in runs)} | {len(args)} | {sum(sgd_steps(vars(a)) for a in args):,} |")
    print("\nA ResNet-20-16 training step at batch 256 is about 63 GFLOP (3 x 256 x 40.8 M multiply-adds x 2); folded "
          "frozen LC costs about as much at any E, learnable LC grows with E: `python train.py --benchmark` times them.\n")


# -----------------------------------------------------------------------------
# Running: one run at a time


def run_one(run, s):
    """-> whether the run succeeded; its output goes to its log, its last line here."""
    Path(run.log).parent.mkdir(parents=True, exist_ok=True)
    with open(run.log, "a") as log:  # append: a rerun after a failure (or a second sweep's wait) adds to it
        process = subprocess.run([s.python, "train.py", *run.argv], stdout=log, stderr=subprocess.STDOUT, env=s.env)
    last = (Path(run.log).read_text(errors="replace").splitlines() or [""])[-1]
    if process.returncode:
        print(f"  FAILED (exit {process.returncode}): {last}  [{run.log}]")
        return False
    print(f"  done: {last}")
    Path(run.checkpoint).unlink(missing_ok=True)  # the run is finished; checkpoints of large E are large
    return True


# -----------------------------------------------------------------------------
# The report: every usable line of every results file, one run a seed, in one part per training setting,
# every table rendered by one function, then the figures and where each run ran

# a run's training and evaluation setting: the report has a part for each one it finds
SETTING = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "fgsm_eps")
FORMATS = dict(params_learnable="{:,.0f}", spread="{:.3g}", spread_mp="{:.3g}", first_rms="{:.3f}",
               first_rms_limit="{:.3f}")  # else "{:.2f}"
# value: the mean (or gain); values: one a seed, of the seeds in `seeds`
Cell = collections.namedtuple("Cell", "text value values seeds", defaults=((),))


def number(x):  # x if it is a finite number, else None (a JSON line can hold NaN, Infinity or "81.5")
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def tensor(x, dim):  # x as a float64 tensor of dim dimensions with finite entries, or None (malformed, missing)
    try:
        t = torch.tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return t if t.dim() == dim and t.numel() and t.isfinite().all() else None


def metrics(r):
    """The numbers the tables read, each a finite number or None (missing in older lines, or malformed)."""
    out = {k: number(r.get(k)) for k in ("test_acc", "fgsm_acc", "fve_first", "fve_last", "params_learnable")}
    layers = [layer for layer in r["basis"] if isinstance(layer, dict)] if isinstance(r.get("basis"), list) else []
    for name, key, pick in [("rank", "rank", min), ("alpha_min", "alpha", min), ("alpha_max", "alpha", max),
                            ("spread", "spread", max), ("spread_mp", "spread_mp", max)]:  # over the layers
        values = [v for v in (number(layer.get(key)) for layer in layers) if v is not None]
        out[name] = pick(values) if values else None
    v = tensor(r.get("spatial_variance"), 2)  # Fig. 8b's map: its centre over its mean, 1 where it is flat
    out["centre"] = number((v[v.shape[0] // 2, v.shape[1] // 2] / v.mean()).item()) if v is not None else None
    f = tensor(r.get("first_filters"), 4)  # the first layer's filters: their RMS, and over sqrt(alpha) for frozen LC
    out["first_rms"] = number(f.square().mean().sqrt().item()) if f is not None else None
    first_alpha = number(layers[0].get("alpha")) if layers else None
    out["first_rms_limit"] = (out["first_rms"] / math.sqrt(first_alpha) if out["first_rms"] is not None
                              and (first_alpha or 0) > 0 else None)  # a malformed alpha draws nothing
    return out


def load_results(folder):
    """-> (runs, lines, skipped, files). lines: every usable line, every config key filled in (older lines lack the
    newer keys), its metrics checked; runs: the first line of each (config, seed) whatever its precision, fp32 where
    a seed has both (bf16 and fp32 agreed within 0.4 points seed by seed at 5 epochs); skipped: why each other is
    not used."""
    files, lines, skipped = sorted(Path(folder).glob("*.jsonl")), [], []
    for path in files:
        for n, r in train.read_lines(path):
            if problem := train.unusable(r):
                skipped.append(f"{path.name} line {n}: {problem}")
            else:  # a line without "precision": fp32 from a CPU, else bf16; `--init FILE.json`: "covariance"
                config = train.recipe(r)
                config["init"] = "covariance" if config["init"].endswith(".json") else config["init"]
                lines.append({**r, **config, **metrics(r)})
    return one_a_seed(sorted(lines, key=lambda r: r["precision"] != "fp32")), lines, skipped, files


def one_a_seed(lines):
    """The first line of each seed's run."""
    runs = {}
    for r in lines:
        runs.setdefault(seed_run(r), r)
    return list(runs.values())


def default_config(model):
    """`train.py --model model`'s config, less what a part (SETTING) or a table (dataset) fixes, seed and precision."""
    config = train.recipe(train.parse_args(["--model", model]))
    return {k: v for k, v in config.items() if k not in ("dataset", "seed", "precision", *SETTING)}


def finder(runs):
    """-> find(keys, column config): the runs of exactly default_config(model) updated by keys and the column's."""
    index = collections.defaultdict(list)
    for r in sorted(runs, key=lambda r: r["seed"]):
        index[frozenset((k, r[k]) for k in train.CONFIG_KEYS if k not in ("seed", "precision"))].append(r)
    defaults = functools.cache(default_config)  # per report: train.py's flags are read afresh
    def find(keys, config):
        keys = {**keys, **config}
        return index[frozenset({**defaults(keys.get("model", "resnet")), **keys}.items())]
    return find


def evaluate(table, find, context):
    """[(row label, the row's keys, {column label: Cell})] in one part (context: setting, dataset)."""
    rows = []
    for label, row in table.rows.items():
        keys, cells = {**context, **table.base, **row}, {}
        for name, column in table.columns.items():
            values = {r["seed"]: r[column.metric] for r in find(keys, column.config) if r[column.metric] is not None}
            f = FORMATS.get(column.metric, "{:.2f}").format
            if column.minus is not None:  # paired by seed: the difference on the seeds both have; none from itself
                base = find(keys, column.minus)
                others = {} if base == find(keys, column.config) else {
                    r["seed"]: r[column.metric] for r in base if r[column.metric] is not None}
                values = {seed: v - others[seed] for seed, v in values.items() if seed in others}
            seeds, values = list(values), list(values.values())
            mean = statistics.mean(values) if values else None
            spread = f" ± {f(statistics.stdev(values))}" if len(values) > 1 else ""  # over seeds
            text = f"{'+' * (column.minus is not None and mean >= 0)}{f(mean)}{spread} ({len(values)})" if values else "—"
            cells[name] = Cell(text, mean, values, seeds)
        rows.append((label, keys, cells))
    return rows


def sgd_steps(c):
    images = c["train_subset"] or train.DATASETS[c["dataset"]]["train_images"]
    return c["epochs"] * math.ceil(images / c["batch_size"])


def render(table, rows, ds):
    """The table in markdown, the paper's numbers beside ours; "" if under min_rows rows have a number."""
    shown = [row for row in rows if any(c.value is not None for c in row[2].values())]
    if len(shown) < table.min_rows:
        return ""
    paper = table.paper if table.paper_dataset in (None, ds) else {}
    beside = {name for numbers in paper.values() for name in numbers}
    header = [table.row_name, *["SGD steps"] * table.spans]
    for name in table.columns:
        header += [name, *["paper"] * (name in beside)]
    lines = [header]
    for label, keys, cells in shown:
        lines.append([str(label), *[f"{sgd_steps(keys):,}"] * table.spans])
        for name, c in cells.items():
            lines[-1] += [c.text, *[paper.get(label, {}).get(name, "—")] * (name in beside)]
    lines = [f"| {' | '.join(line)} |" for line in lines]
    return "\n".join([f"## {table.title}{f', on {ds}' if ds else ''}\n", lines[0], "|" + "---|" * len(header),
                      *lines[1:], *[f"\n{table.found}"] * bool(table.found)]) + "\n" + seed_by_seed(table, shown)


def seed_by_seed(table, shown):
    """The gain columns of a rendered table's rows, a cell its gains seed by seed ("0: +0.36, 1: +0.31"); "" if none."""
    gains = {name: FORMATS.get(c.metric, "{:.2f}").format for name, c in table.columns.items() if c.minus is not None}
    rows = [[str(label), *[", ".join(f"{seed}: {'+' * (v >= 0)}{f(v)}" for seed, v in zip(cells[name].seeds,
                                                                                      cells[name].values)) or "—"
                           for name, f in gains.items()]]
            for label, _, cells in shown if any(cells[name].values for name in gains)]
    if not rows:
        return ""
    lines = [f"| {' | '.join(line)} |" for line in [[table.row_name, *gains], *rows]]
    return "\n".join(["", f"### Seed by seed: {table.title}\n", lines[0], "|" + "---|" * len(gains) + "---|",
                      *lines[1:]]) + "\n"


def describe(c):  # a training setting in words
    rest = "".join(f", {k.replace('_', ' ')} {c[k]}" for k in ("momentum", "label_smoothing", "fgsm_eps")
                   if c[k] != train.PARSER.get_default(k))
    images = f"the first {c['train_subset']:,} training images" if c["train_subset"] else "the full training set"
    return (f"{c['epochs']} epoch(s) on {images}, batch {c['batch_size']}, lr {c['lr']}, weight decay "
            f"{c['weight_decay']}{rest}")


def write_whole(path, data):
    """data (bytes) written under a name unique to this writer, then renamed into place: readers (and a second
    sweep writing the same file) never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pyplot():  # matplotlib's, or None: it is optional (the tables say it all)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def save_figure(fig, folder, name):
    fig.savefig(png := io.BytesIO(), format="png", dpi=120, bbox_inches="tight")
    write_whole(Path(folder, "plots", f"{name}.png"), png.getvalue())
    pyplot().close(fig)


def draw(ax, curves, baseline, xlabel, ylabel, log_base):
    """Each curve's means, in its style (matplotlib's line arguments), with a dot for each seed; the baseline (a Cell)
    as a dashed line at its mean in a grey band from its lowest seed to its highest, each in the legend.
    curves: label -> ([(x, Cell)], style)."""
    dots = False
    for label, (points, style) in curves.items():
        if points := [(x, cell) for x, cell in points if cell.value is not None]:
            line, = ax.plot([x for x, _ in points], [c.value for _, c in points], label=label, **style)
            seeds = [(x, v) for x, c in points for v in c.values if len(c.values) > 1]
            ax.scatter(*zip(*seeds), s=12, color=line.get_color(), alpha=0.5) if seeds else None
            dots = dots or bool(seeds)
    ax.scatter([], [], s=12, color="black", alpha=0.5, label="a dot: one seed") if dots else None
    ax.axhline(baseline.value, color="grey", linestyle="--", label="baseline, mean over seeds" if baseline.values
               else "baseline")
    if len(baseline.values) > 1:
        ax.axhspan(min(baseline.values), max(baseline.values), color="grey", alpha=0.2, linewidth=0,
                   label="baseline, lowest to highest seed")
    ax.set_xscale("log", base=log_base)
    ax.set(xlabel=xlabel, ylabel=ylabel)


# Fig. 4's kinds: the paper's two as lines, the exact form and the large-E limit as points apart
FIG4_STYLES = {"frozen": dict(marker="o"), "learnable": dict(marker="o"),
               "preconditioned": dict(marker="s", linestyle="none", markerfacecolor="none"),
               "--lc-init": dict(marker="^", linestyle=":")}


def seeds_of(rows):  # how many seeds the cells of these rows have: "2", or "1–2" where they differ
    counts = {len(cell.values) for _, _, cells in rows for cell in cells.values() if cell.values} or {0}
    return f"{min(counts)}–{max(counts)}" if len(counts) > 1 else f"{max(counts)}"


def precision_of(where):  # the runs' precision, as the last words of where (write_report) say it
    return where.rsplit(", ", 1)[-1].removesuffix(" only").removesuffix(" runs")


def expansion_figure(folder, rows, where):
    """Fig. 4's shape from its table's rows: test and FGSM accuracy against E, side by side; m/d = 1 marked."""
    baseline, c = rows[0][2], rows[0][1]  # the row E = 0
    if baseline["test acc, learnable"].value is None or not (plt := pyplot()):
        return ""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("test acc", "FGSM")):
        curves = {f"{kind} LC" if kind in ("frozen", "learnable") else kind: (
            [(keys["expansion"], cells[f"{metric}, {kind}"]) for _, keys, cells in rows[1:]], style)
            for kind, style in FIG4_STYLES.items()}
        draw(ax, curves, baseline[f"{metric}, learnable"], "E (LC expansion)", f"{metric} %", 2)
        ax.axvline(9, color="black", linestyle=":", linewidth=1, label="m/d = 1")  # E·c_out = c_in·3·3
        ax.xaxis.set_major_formatter("{x:.0f}")  # 1, 4, 16, ... rather than powers of 2
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Accuracy against E: {c['dataset']}, {c['epochs']} epochs, {seeds_of(rows)} seed(s), "
                 f"{precision_of(where)}", fontsize=10)
    name = f"expansion_{setting_name(c)}"
    save_figure(fig, folder, name)
    return (f"![{name}](plots/{name}.png)\n\nTest accuracy (left) and FGSM accuracy at ε = {c['fgsm_eps'] * 255:.3g}/255 "
            f"(right) against E on {c['dataset']}, runs {where} (Fig. 4): the mean over seeds, a dot for each seed; the "
            "grey band spans the baseline's seeds; dotted, m/d = 1 in the 3×3 convs of equal width (E = 9).\n")


def length_figure(folder, rows, where):
    """Each kind's gain over the baseline against its row's length, in epochs of the whole training set (SGD steps
    on top)."""
    if not (plt := pyplot()):
        return ""
    c = rows[0][1]
    epoch = sgd_steps({**c, "epochs": 1, "train_subset": None})  # SGD steps in an epoch of the whole training set
    curves = {name.removeprefix("gain, "): ([(sgd_steps(keys) / epoch, cells[name]) for _, keys, cells in rows],
                                            dict(marker="o")) for name in rows[0][2] if name.startswith("gain, ")}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    draw(ax, curves, Cell("", 0, []), "epochs of all training images", "test accuracy % − the baseline's", 10)
    ax.secondary_xaxis("top", functions=(lambda x: x * epoch, lambda x: x / epoch)).set_xlabel("SGD steps")
    ax.xaxis.set_major_formatter("{x:.3g}")
    ax.legend(fontsize=7)
    ax.set_title(f"Gain over the baseline against length: {c['dataset']}, {seeds_of(rows)} seeds, "
                 f"{precision_of(where)}", fontsize=9, pad=30)
    name = f"length_{rows[0][1]['dataset']}"
    save_figure(fig, folder, name)
    return (f"![{name}](plots/{name}.png)\n\nGain over the same seed's baseline against training length on "
            f"{rows[0][1]['dataset']}, runs {where}: the mean over seeds, a dot for each seed.\n")


def kernel_figure(folder, rows, where):
    """Fig. 8a's shape from KERNEL5's rows: each frozen LC's gap to its k's baseline against E (left) and against
    m/d = E/k² (right), a line per k and init, a dot per seed; learnable LC x8's gap as a cross."""
    if not (plt := pyplot()):
        return ""
    c = rows[0][1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = dict(zip(KERNEL_SIZES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = {"kaiming_uniform": dict(marker="o"), "center": dict(marker="s", linestyle="--", markerfacecolor="none"),
              "covariance": dict(marker="*", markersize=10, linestyle=":")}
    names = {"kaiming_uniform": "", "center": ", center init", "covariance": ", oracle init"}
    for ax, per_d in zip(axes, (False, True)):
        curves = {}
        for _, keys, cells in rows:
            k, init = keys["kernel_size"], keys["init"]
            x = (lambda e: e / k**2) if per_d else (lambda e: e)
            curves[f"k = {k}{names[init]}"] = ([(x(e), cells[f"gap x{e}"]) for e in KERNEL5_E],
                                              dict(styles[init], color=colours[k]))
            if init == "kaiming_uniform":
                curves[f"k = {k}, learnable LC x8"] = ([(x(8), cells["gap, learnable x8"])],
                                                       dict(marker="x", linestyle="none", color=colours[k]))
        draw(ax, curves, Cell("", 0, []), "m/d = E/k² (convs of equal width)" if per_d else "E (LC expansion)",
             "test accuracy % − the same k's baseline", 2)
        if per_d:
            ax.axvline(1, color="black", linestyle=":", linewidth=1, label="m/d = 1")
        ax.xaxis.set_major_formatter("{x:.3g}")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Frozen LC's gap to learned filters by kernel size: {c['dataset']}, {c['epochs']} epochs, "
                 f"{seeds_of(rows)} seed(s), {precision_of(where)}", fontsize=10)
    name = f"kernel_{setting_name(c)}"
    save_figure(fig, folder, name)
    return (f"![{name}](plots/{name}.png)\n\nFrozen LC's gap to the baseline of the same kernel size, runs {where} "
            "(Fig. 8a): the mean over seeds, a dot for each seed; x512 is preconditioned.\n")


def kernel_maps_figure(folder, runs, ds):
    """Fig. 7 and 8b at k = 9, from one seed and setting: each run's spatial variance on one colour scale, and its
    first layer's combined filters, for the baseline, frozen LC x8 and x512, and x8 under the center and oracle inits."""
    kinds = {"baseline": dict(expansion=0, frozen=False, init="kaiming_uniform"),
             "frozen LC x8": dict(expansion=8, frozen=True, init="kaiming_uniform"),
             "frozen LC x512": dict(expansion=512, frozen=True, preconditioned=True, init="kaiming_uniform"),
             "x8, center init": dict(expansion=8, frozen=True, init="center"),
             "x8, oracle init": dict(expansion=8, frozen=True, init="covariance")}
    base = {**default_config("resnet"), "dataset": ds, "kernel_size": ORACLE_K}
    found = collections.defaultdict(dict)  # (setting, seed) -> kind -> (variance, filters)
    for r in runs:
        for kind, config in kinds.items():
            variance, filters = tensor(r.get("spatial_variance"), 2), tensor(r.get("first_filters"), 4)
            if all(r[k] == v for k, v in {**base, "preconditioned": False, **config}.items()) and variance is not None \
                    and filters is not None:
                found[tuple(r[k] for k in SETTING), r["seed"]][kind] = (variance, filters, r["precision"])
    if not found or not (plt := pyplot()):
        return ""
    (setting, seed), maps = max(found.items(), key=lambda f: (len(f[1]), -f[0][1]))
    if "baseline" not in maps or len(maps) < 2:
        return ""
    fig, axes = plt.subplots(2, len(maps), figsize=(2.4 * len(maps), 4.6), squeeze=False)
    scale = max(v.max().item() for v, _, _ in maps.values())
    for column, (kind, (variance, filters, _)) in enumerate(maps.items()):
        image = axes[0, column].imshow(variance.numpy(), vmin=0, vmax=scale, cmap="viridis")
        axes[1, column].imshow(filter_grid(filters[:16], nrow=4).permute(1, 2, 0).numpy())
        axes[0, column].set_title(kind, fontsize=9)
        for ax in axes[:, column]:
            ax.axis("off")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="variance over all kernels")
    fig.colorbar(image, ax=axes[1].tolist(), shrink=0.8).remove()  # the same room taken below: columns align
    epochs = dict(zip(SETTING, setting))["epochs"]
    precisions = "/".join(sorted({precision for _, _, precision in maps.values()}))
    fig.suptitle(f"9×9 filters, {ds}, {epochs} epochs, seed {seed}, {precisions}\nspatial variance (top, one scale), "
                 "16 first-layer filters (bottom, 0 is grey)", fontsize=10)
    name = f"kernel_maps_{ds}"
    save_figure(fig, folder, name)
    return (f"![{name}](plots/{name}.png)\n\nAt k = 9, seed {seed}, {describe(dict(zip(SETTING, setting)))} "
            "(Fig. 7, 8b): the variance of each kernel position over all the model's kernels, each layer's over its "
            "std, on one colour scale; below, 16 of the first layer's combined filters, each grid on its own scale.\n")


def filter_grid(filters, nrow=8):
    """(n, 1 or 3, k, k) filters -> an nrow-wide (3, H, W) image grid on one shared scale, 0 = grey (Fig. 7)."""
    from torchvision.utils import make_grid
    scale = filters.abs().max().clamp(min=1e-12).item()
    tiles = F.interpolate(filters.float(), scale_factor=max(1, 48 // filters.shape[-1]), mode="nearest")
    return make_grid(tiles, nrow=nrow, normalize=True, value_range=(-scale, scale), pad_value=1)


def filters_figure(folder, runs, ds):
    """The first layer's combined filters of frozen and learnable LC x128 from one seed and setting, side by side:
    the paper's recipe where both ran, else the longest schedule, the lowest seed (Fig. 7)."""
    lc_128, pairs = {**default_config("resnet"), "dataset": ds, "expansion": 128}, collections.defaultdict(dict)
    for r in runs:
        if all(r[k] == v for k, v in lc_128.items() if k != "frozen") and (f := tensor(r.get("first_filters"), 4)) is not None:
            pairs[tuple(r[k] for k in (*SETTING, "seed"))][r["frozen"]] = (r, f)
    paper = [train.PARSER.get_default(k) for k in SETTING]
    both = [(pair[True][0], [pair[True][1], pair[False][1]],  # frozen's run, both filters, their precisions
             " and ".join(dict.fromkeys(pair[kind][0]["precision"] for kind in (True, False))))
            for pair in pairs.values() if len(pair) == 2]
    if not both or not (plt := pyplot()):
        return ""
    r, filters, precision = max(both, key=lambda b: ([b[0][k] for k in SETTING] == paper, sgd_steps(b[0]), -b[0]["seed"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.2))
    for ax, f, title in zip(axes, filters, ["frozen LC x128: combinations of random filters",
                                            "learnable LC x128: filters and combinations learned"]):
        ax.imshow(filter_grid(f).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"First-layer filters after {r['epochs']} epoch(s), {sgd_steps(r):,} SGD steps ({ds}, seed {r['seed']}, "
                 f"{precision}); 0 is grey", fontsize=10)
    save_figure(fig, folder, f"filters_{ds}")
    return (f"![filters_{ds}](plots/filters_{ds}.png)\n\nFirst-layer combined filters on {ds}, frozen and learnable "
            f"LC x128 from one seed (the same draw at the start), seed {r['seed']}, {describe(r)}; each grid on its own "
            "scale.\n")


def name(r):  # a run's LC flags, in words
    flags = [f"{k.replace('_', '-')} {r[k]}" for k in ("expansion", "lc_init", "lc_limit") if r[k]]
    return ", ".join(flags + [k for k in ("frozen", "preconditioned") if r[k]]) or "baseline"


def provenance(runs):
    """Which machine ran each run of the paper's setting on all images, in which precision, at what speed."""
    recipe = {k: train.PARSER.get_default(k) for k in SETTING if k not in ("epochs", "train_subset")}
    rows = sorted((r for r in runs if r["train_subset"] is None and all(r[k] == v for k, v in recipe.items())),
                  key=lambda r: (r["dataset"], r["epochs"], name(r), r["seed"], r["precision"]))
    lines = ["| dataset | epochs | run | seed | precision | hardware | s/epoch | test acc | FGSM |", "|---" * 9 + "|"]
    for r in rows:
        epoch = (f"{r['epoch_time_median_s']:.0f}" if "epoch_time_median_s" in r else
                 f"{r['epoch_time_s']:.0f} (mean, pauses in)" if "epoch_time_s" in r else "—")
        lines.append(f"| {r['dataset']} | {r['epochs']} | {name(r)} | {r['seed']} | "
                     f"{r['precision']} | {r.get('hardware', '—')} | {epoch} | {r['test_acc']:.2f} | "
                     f"{r['fgsm_acc'] if r['fgsm_acc'] is None else format(r['fgsm_acc'], '.2f')} |")
    return "# Provenance: every run at the paper's setting on all training images\n\n" + "\n".join(lines) + (
        "\n\ns/epoch: the median of the run's epochs, or for older lines their mean, pauses of the machine included.\n")


def precision_pairs(lines):
    """Runs made in both precisions, seed by seed: bf16 is another trajectory, not a rounding of fp32."""
    both = collections.defaultdict(dict)
    for r in lines:
        both[seed_run(r)].setdefault(r["precision"], r)
    rows = sorted(((pair["fp32"], pair["bf16"]) for pair in both.values() if len(pair) == 2),
                  key=lambda p: (p[0]["dataset"], p[0]["epochs"], p[0]["train_subset"] or 0, name(p[0]), p[0]["seed"]))
    if not rows:
        return ""
    table = ["| dataset | schedule | run | seed | test fp32 | test bf16 | bf16 − fp32 | FGSM fp32 | FGSM bf16 | "
             "bf16 − fp32 |", "|---" * 10 + "|"]
    for fp32, bf16 in rows:
        cells = []
        for metric in ("test_acc", "fgsm_acc"):
            a, b = fp32[metric], bf16[metric]
            cells += [f"{a:.2f}", f"{b:.2f}", f"{'+' * (b >= a)}{b - a:.2f}"] if None not in (a, b) else ["—"] * 3
        schedule = f"{fp32['epochs']} ep" + (f" on {fp32['train_subset']:,}" if fp32["train_subset"] else "")
        table.append(f"| {fp32['dataset']} | {schedule} | {name(fp32)} | {fp32['seed']} | {' | '.join(cells)} |")
    return ("# Precision pairs: runs made in both fp32 and bf16\n\n" + "\n".join(table) +
            "\n\nThe tables take the fp32 run; a table 'within bf16' the bf16 one.\n")


def write_report(folder):
    runs, lines, skipped, files = load_results(folder)
    datasets, parts, figures = sorted({r["dataset"] for r in runs}), [], []
    finds = {p: finder(one_a_seed(r for r in lines if r["precision"] == p) if p else runs)
             for p in {t.precision for t in TABLES}}
    settings = collections.Counter(tuple(r[k] for k in SETTING) for r in runs).most_common()  # most runs first
    for where, context, spans in [*((f"of {describe(dict(zip(SETTING, s)))}", dict(zip(SETTING, s)), False)
                                    for s, _ in settings),
                                  ("across training lengths (the rest of the setting the paper's)",
                                   {k: train.PARSER.get_default(k) for k in SETTING}, True)]:
        sections, plots = [], collections.defaultdict(list)  # (plot, dataset) -> [(rows, where)] of its tables
        for table in (t for t in TABLES if t.spans == spans):
            fixed = "dataset" in table.base or any("dataset" in row for row in table.rows.values())
            for ds in [None] if fixed else datasets:
                rows = evaluate(table, finds[table.precision], {**context, "dataset": ds})
                if table.precision and rows == evaluate(table, finds[None], {**context, "dataset": ds}):
                    continue  # every run of it is in that precision already
                sections += [text] if (text := render(table, rows, ds)) else []
                if text and table.plot:  # where, and in which precision: a figure's title says it
                    kinds = {r["precision"] for r in runs if ds in (None, r["dataset"])
                             and (spans or all(r[k] == v for k, v in context.items()))}
                    only = (f", {table.precision} runs only" if table.precision else
                            f", {kinds.pop()} runs" if len(kinds) == 1 else ", fp32 where a seed has both")
                    plots[table.plot, ds].append((rows, where + only))
        for (plot, _), shown in plots.items():  # the last that draws: within one precision, if it has a baseline
            draw = dict(expansion=expansion_figure, length=length_figure, kernel=kernel_figure)[plot]
            figures.append(next((f for rows, where in reversed(shown) if (f := draw(folder, rows, where))), ""))
        if sections:  # runs no table shows (of another --width, say): no empty heading
            parts.append(f"# Runs {where}\n\n" + "\n".join(sections))
    figures = [f for f in [*figures, *(figure(folder, runs, ds) for ds in datasets
                                        for figure in (filters_figure, kernel_maps_figure))] if f]
    unused = (f" {len(skipped)} line(s) not used: " + "; ".join(skipped[:10])  # the first 10 named
              + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "") + ".") if skipped else ""
    head = (f"# lcconv: our results beside the paper's\n\nEach cell: mean ± std over seeds (number of seeds), one "
            f"run a seed, fp32 or bf16 (fp32 where a seed has both; the provenance table at the end says which). "
            f"{len(lines)} finished runs in {len(files)} results file(s) ({', '.join(f.name for f in files) or 'none'})."
            f"{unused} Paper: Gavrikov & Keuper, arXiv:2301.11360.\n")
    figures = figures or ["No figures: matplotlib is not installed (`pip install matplotlib`, then "
                          "`bash experiments.sh report`)."] * (pyplot() is None)
    sections = [head, *["## Figures\n\n" + "\n".join(figures)] * bool(figures), *parts, precision_pairs(lines),
                provenance(lines)]
    write_whole(Path(folder, "REPORT.md"), "\n".join(section for section in sections if section).encode())
    print(f"wrote {folder}/REPORT.md" + f" ({len(skipped)} line(s) of the results files not used, named there)"
          * bool(skipped))


# -----------------------------------------------------------------------------
# Main


def main(argv, env):
    """-> the exit status."""
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__}\nGroups (QUICK=1 runs {' '.join(QUICK_GROUPS)} by default):")
        print("".join(f"  {name:<12}{group.figure}\n" for name, group in GROUPS.items()), end="")
        return 0
    if unknown := [arg for arg in argv if arg not in (*GROUPS, "--list", "report")]:
        die(f"unknown group '{unknown[0]}'; groups: {' '.join(GROUPS)}, report, --list")
    if MISSING:
        die(f"{sys.executable} has no module '{MISSING}': pip install -r requirements.txt for it, or set PYTHON "
            f"to a Python that has them")
    s = read_settings(env)
    groups = [GROUPS[n] for n in [a for a in argv if a in GROUPS] or (QUICK_GROUPS if s.quick else GROUPS)]
    if "--list" in argv:
        print("".join(shlex.join([s.python, "train.py", *run.argv]) + "\n" for run in runs_of(groups, s)), end="")
        return 0
    if problem := train.unwritable(Path(s.results), "directory"):  # creates nothing
        die(f"RESULTS={s.results}: {problem}; give a folder")
    if "report" in argv:
        write_report(s.results)
        return 0
    runs = runs_of(groups, s)
    if not s.quick:
        print_plan(runs, unfinished([run for run in runs if covariance_ready(run)]))
    failed = report_failed = 0
    for group in groups:
        print(f"== {group.name}")
        tried = []  # read again after each run: a config another sweep finished, a Σ file its baseline made possible
        while todo := [run for run, _ in unfinished([run for run in runs_of([group], s) if covariance_ready(run)])
                       if run not in tried]:
            tried.append(todo[0])  # once a sweep: a failed run is not tried again
            print(f"[{len(tried)}/{len(tried) + len(todo) - 1}] {shlex.join([s.python, 'train.py', *todo[0].argv])}")
            failed += not run_one(todo[0], s)
        if waiting := [run for run in runs_of([group], s) if not covariance_ready(run)]:
            print(f"  {len(waiting)} run(s) wait for the baseline whose learned covariance they draw from (--init "
                  f"{train.PARSER.parse_args(waiting[0].argv).init}): rerun once it is in {waiting[0].out}")
        try:
            write_report(s.results)
        except Exception as e:  # a bug in the report must not stop the later groups' runs; it is said, not hidden
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"experiments.sh: the report failed ({type(e).__name__}: {e}, at line {where.lineno}); the sweep "
                  "goes on", file=sys.stderr)
            report_failed = 1
    if failed:
        print(f"{failed} run(s) failed; rerun the same command to retry them (finished runs are skipped)",
              file=sys.stderr)
    return 1 if failed or report_failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly, as a shell tool does
    os.chdir(Path(__file__).parent)  # paths in commands and settings are relative to this folder
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    try:
        sys.exit(main(sys.argv[1:], os.environ))
    except KeyboardInterrupt:
        sys.exit("experiments.sh: interrupted; rerun the same command to resume (finished runs are skipped)")
