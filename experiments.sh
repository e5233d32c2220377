#!/usr/bin/env bash
""":"
# bash runs these lines and hands the file to Python (PYTHON, else python, else python3);
# Python reads them as a string. Portable sh: bash 3.2, dash.
[ -n "${PYTHON:-}" ] || command -v python >/dev/null 2>&1 || export PYTHON=python3
exec "${PYTHON:-python}" "$0" "$@"
"""
__doc__ = """\
Reproduce the CIFAR-scale results of Gavrikov & Keuper, "The Power of Linear Combinations: Learning with Random
Convolutions" (arXiv:2301.11360): the train.py runs behind its tables and figures, then $RESULTS/REPORT.md with ours
beside the paper's numbers, and plots in $RESULTS/plots.

  bash experiments.sh                     every group below, one run at a time, then the report
  bash experiments.sh kernel ablation     only these groups
  bash experiments.sh --list [GROUP...]   the train.py commands, one per line; run nothing. Many GPUs: SLURM, or
                                          parallel -j 4 'CUDA_VISIBLE_DEVICES=$(({%} - 1)) {}' < runs.txt
  bash experiments.sh report              rebuild $RESULTS/REPORT.md and its plots from the results
  SEEDS=0 bash experiments.sh recipe      the paper's recipe on all 60,000 Fashion-MNIST images, for a CPU:
                                          75 epochs, and 5 and 15 (EPOCHS and TRAIN_SUBSET do not apply)
  QUICK=1 bash experiments.sh             Table 1, Fig. 4 and the mechanism group on a 2-core CPU: Fashion-MNIST,
                                          its first 5,000 images, 5 epochs (100 SGD steps)
  QUICK=1 SEEDS="0 1 2" bash experiments.sh length    the 100-step comparison at E = 128, 3 seeds

Settings, from the environment (paper's defaults): SEEDS="0 1 2 3"  EPOCHS=75  DATASETS="cifar10 cifar100 svhn
fashionmnist" (groups keep only runs on these)  DATA_DIR=./data  RESULTS=results  TRAIN_SUBSET="" (train on the
first N images)  TRAIN_ARGS="" (added to every run, overriding it)  PYTHON=python. QUICK=1 makes the defaults
SEEDS=0 EPOCHS=5 DATASETS=fashionmnist TRAIN_SUBSET=5000 RESULTS=results-quick.

A run appends a JSON line to $RESULTS/<dataset>-<epochs>ep.jsonl (-<N> added for a subset of N images): a small
file per training setting, kept in git. A run whose config has a line there is skipped; an interrupted one resumes
from $RESULTS/checkpoints; a failed run (or report) is reported, the others go on and the exit status is 1. The
report reads every *.jsonl in $RESULTS. This file is a Python program: bash runs its first lines, which start Python.
"""
import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

MISSING = None  # the module this Python lacks: --help works without it, all else says what to install
try:
    import torch

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
# Groups: each one's runs (train.py flags without seed and paths; a config in several groups, written identically,
# runs once) and the tables that read their results. A table cell holds the runs whose config is exactly
# default_config(model) updated by the report part's setting and precision, the dataset, the table's base, the row's
# keys and the column's, every seed: runs of another value of any flag (one added to train.py later too) stay out.

# config: keys beyond the row's, as a dict, a list of dicts (their runs pooled) or a function of the row's keys
# giving either; minus: for a gain column, the keys whose metric it subtracts, seed by seed
Column = collections.namedtuple("Column", "config metric minus", defaults=("test_acc", None))


@dataclass(eq=False)  # a table is its own key: the report draws figures from some
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
    plot: str = None  # the figure drawn from it (a key of FIGURES)


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


def limit(e, **keys):  # the plain model trained as frozen LC xE's large-E limit
    return dict(expansion=0, frozen=False, lc_limit=e, **keys)


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
LC_EXPANSIONS = (1, 2, 4, 8, 16, 32, 64, 128)          # Fig. 8, the init study
KERNEL_SIZES = (3, 5, 7, 9)                            # Fig. 7-9
CONVMIXER_EXPANSIONS = (1, 8, 64)
OFF_THE_SHELF = ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2")  # Fig. 1
INIT_STUDY = ("kaiming_uniform", "center")             # the paper's init vs our centre-weighted one
LARGE_KERNEL = 9                                       # the paper's worst kernel size
MATCHED = {3: 16, 5: 44, 7: 87, 9: 144}  # E ∝ k²: m/d ≈ 1.78 in the convs of equal width, ∝ E/k² in all
FROZEN, PRECONDITIONED = dict(frozen=True), dict(frozen=True, preconditioned=True)
LC_128, FROZEN_128 = dict(expansion=128), dict(expansion=128, frozen=True)
LEARNABLE_FROZEN = {"learnable": Column({}), "frozen": Column(FROZEN)}


group("table1", "Table 1: baseline vs LC x128 learnable vs frozen, four datasets", Table(
    "Table 1: ResNet-20-16 vs ResNet-LC-20-16x128, test accuracy %", "dataset",
    {ds: dict(dataset=ds) for ds in PAPER_TABLE1},
    {"baseline": Column({}), "LC learnable": Column(LC_128), "LC frozen": Column(FROZEN_128)}, min_rows=1,
    paper={ds: dict(zip(("baseline", "LC learnable", "LC frozen"), p)) for ds, p in PAPER_TABLE1.items()},
    found="Paper (4 seeds): frozen LC x128 beats learnable LC x128 everywhere, at most 0.02 below the baseline."))(
    lambda s: (c for ds in PAPER_TABLE1 for c in [flags("--dataset", ds), *pair("--dataset", ds, "--expansion", 128)]))


@group("expansion", "Fig. 4 (accuracy, params, FGSM) and Fig. 5 (FVE): E = 1 ... 512", Table(
    "Fig. 4 and 5: ResNet-LC-20-16xE, learnable parameters, test and FGSM accuracy %, FVE of the first and last "
    "spatial layer", "E (0: no LC)", {e: dict(expansion=e) for e in (0, *EXPANSIONS)},
    {f"{name}, {kind}": Column(config, metric) for name, metric in [
        ("params", "params_learnable"), ("test acc", "test_acc"), ("FGSM", "fgsm_acc"), ("FVE first", "fve_first"),
        ("FVE last", "fve_last")] for kind, config in (("frozen", FROZEN), ("learnable", {}))}, min_rows=3,
    plot="expansion", found="Paper: frozen beats learnable from E = 8 and the baseline (E = 0) at E = 128, then "
    "declines slightly; its FGSM accuracy rises with E, above both; its FVE stays above theirs."))
def expansion_runs(s):
    yield flags("--dataset", s.main)
    for e in (1, 4, 16, 64, 128) if s.quick else EXPANSIONS:
        yield from pair("--dataset", s.main, "--expansion", e)


def scaling(key, sizes, figure, found):
    """Fig. 6: frozen vs learnable at E = 1 as one size of the ResNet grows."""
    group(key, f"{figure}: {key} = {sizes[0]} ... {sizes[-1]}, E = 1", Table(
        f"{figure}: {key}, E = 1, test accuracy %", key, {x: {key: x} for x in sizes}, LEARNABLE_FROZEN,
        base=dict(expansion=1), found=found))(
        lambda s: (c for x in sizes for c in pair("--dataset", s.main, "--expansion", 1, f"--{key}", x)))


scaling("width", (16, 32, 64, 128, 256), "Fig. 6a", "Paper: frozen catches up as W grows; break-even at W ≈ 128.")
scaling("depth", (20, 32, 56, 110, 164, 260), "Fig. 6b", "Paper: frozen catches up as D grows; break-even at D ≈ 260.")


@group("kernel", "Fig. 7-9: k = 3 ... 9, learned filters vs LCs of frozen random ones; matched m/d", Table(
    "Fig. 8a: kernel size k and E, test accuracy %", "k, spatial filters",
    {f"{k}, {kind}": dict(kernel_size=k, frozen=kind == "frozen") for k in KERNEL_SIZES
     for kind in ("learnable", "frozen")},
    {"no LC": Column(dict(expansion=0)), **{f"E = {e}": Column(dict(expansion=e)) for e in LC_EXPANSIONS}},
    found="Paper: the frozen-vs-learnable gap grows with k and shrinks with E.", min_rows=3),
    Table(  # P depends on E and k only through m/d: is the gap of Fig. 8a a function of m/d?
        "Beyond the paper: kernel sizes at matched m/d = E·c_out/(c_in·k²), test accuracy %", "k (E, m/d)",
        {f"{k} (E = {e}, m/d {e / k**2:.2f})": dict(kernel_size=k, expansion=e) for k, e in MATCHED.items()},
        {"baseline": Column(dict(expansion=0)), "frozen LC, preconditioned": Column(PRECONDITIONED),
         "learnable LC": Column({}), "gap": Column({}, minus=PRECONDITIONED)},
        found="Not in the paper. Our hypothesis: the frozen-vs-learnable gap of Fig. 8a depends on m/d alone."))
def kernel_runs(s):  # QUICK runs only the matched m/d part
    for k in KERNEL_SIZES:
        yield flags("--dataset", s.main, "--kernel-size", k)
        for e in [] if s.quick else LC_EXPANSIONS:
            yield from pair("--dataset", s.main, "--kernel-size", k, "--expansion", e)
        e = MATCHED[k]  # frozen in the preconditioned form at every k: the folded one is slow at k = 9
        if s.quick or e not in LC_EXPANSIONS:  # else the grid has it
            yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e)
        yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e, "--frozen", "--preconditioned")


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


@group("convmixer", "beyond the paper: the large-kernel gap in ConvMixer-256/8", Table(
    "Beyond the paper: ConvMixer-256/8, kernel size, test accuracy %", "k",
    {k: dict(kernel_size=k) for k in KERNEL_SIZES},
    {**LEARNABLE_FROZEN, **{f"LC x{e} frozen": Column(dict(expansion=e, frozen=True)) for e in CONVMIXER_EXPANSIONS}},
    base=dict(model="convmixer"), found="Not in the paper, which finds the large-kernel gap in ResNets (Fig. 8a)."))
def convmixer_runs(s):
    for k in KERNEL_SIZES:
        yield from pair("--dataset", s.main, "--model", "convmixer", "--kernel-size", k)
        for e in CONVMIXER_EXPANSIONS:
            yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", k, "--expansion", e, "--frozen")


def init_table(name, model, es, limits=()):  # limits: frozen LC's limit too, the mechanism group's k = 9 runs
    return Table(
        f"Beyond the paper: a centre-weighted init for {name}, k = {LARGE_KERNEL}", "spatial filters",
        {"learned, no LC": {}, "frozen, no LC": FROZEN, **{f"frozen LC x{e}": dict(FROZEN, expansion=e) for e in es}},
        {**{f"test acc, {i}": Column(dict(init=i)) for i in INIT_STUDY},
         **{f"its limit, {i}": Column(lambda row, i=i: limit(row.get("expansion", 0), init=i)) for i in limits},
         **{f"centre/ring, {i}": Column(dict(init=i), "centre_ring") for i in INIT_STUDY}},
        base=dict(model=model, kernel_size=LARGE_KERNEL),
        found="The paper's open question: would more variance in the kernel centre close the large-kernel gap?")


@group("init", "beyond the paper, its open question: does a centre-weighted init close the k = 9 gap?",
       init_table("ResNet-LC-20-16", "resnet", (*LC_EXPANSIONS, 512), INIT_STUDY),
       init_table("ConvMixer-256/8", "convmixer", CONVMIXER_EXPANSIONS))
def init_runs(s):
    large = flags("--dataset", s.main, "--kernel-size", LARGE_KERNEL)  # written as in the mechanism group
    convmixer = flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", LARGE_KERNEL)
    yield from [large, convmixer]
    for i in INIT_STUDY:
        yield from (flags(*large, "--expansion", e, "--frozen", "--init", i) for e in LC_EXPANSIONS)
        yield convmixer + ["--frozen", "--init", i]
        yield from (convmixer + flags("--expansion", e, "--frozen", "--init", i) for e in CONVMIXER_EXPANSIONS)


# A frozen LC-Block trains as one conv with its gradient times the fixed P = SᵀS of its filters (--preconditioned);
# for m = E·c_out ≫ d = c_in·k², P → α·I, a plain conv (--lc-limit E), under BatchNorm a smaller init (--lc-init E).
MECHANISM_E = dict(frozen=EXPANSIONS, learnable=EXPANSIONS, limit=EXPANSIONS + (2048, 8192, 32768),
                   init=EXPANSIONS + (2048, 8192, 32768), preconditioned=(8, 128, 512, 2048, 8192, 32768),
                   large_kernel=(8, 64, 512))
# QUICK: frozen, learnable LC as in the expansion group; past E = 128 preconditioned, at the plain ResNet's cost
MECHANISM_QUICK_E = dict(frozen=(4, 128), learnable=(4, 128), limit=(4, 128, 512, 2048), init=(4, 128, 2048),
                         preconditioned=(128, 512, 2048), large_kernel=())
MECHANISM_ROWS = {e: dict(expansion=e) for e in (0, *sorted({*MECHANISM_E["limit"], *MECHANISM_E["preconditioned"]}))}


@group("mechanism", "why it works (beyond the paper): frozen LC xE vs its large-E limit, E = 1 ... 32768", Table(
    "Why it works: frozen LC xE vs its large-E limit, test accuracy %", "E (0: no LC)", MECHANISM_ROWS,
    {"frozen LC": Column(FROZEN), "preconditioned": Column(PRECONDITIONED), "learnable LC": Column({}),
     "limit": Column(lambda row: limit(row["expansion"])), "init": Column(lambda row: lc_init(row["expansion"]))},
    min_rows=3,
    found="Not in the paper. *preconditioned*: frozen LC trained as one conv with its gradient times P; *limit*: "
          "`--lc-limit E`, P = α·I; *init*: `--lc-init E`, the limit under BatchNorm."), Table(
    "The random basis of frozen LC xE: lcconv.basis_summary over its spatial layers, folded and preconditioned runs "
    "pooled", "E", {e: dict(expansion=e, frozen=True) for e in MECHANISM_ROWS if e},
    {label: Column([{}, dict(preconditioned=True)], metric) for label, metric in [
        ("rank/d, smallest", "rank"), ("α, smallest", "alpha_min"), ("α, largest", "alpha_max"),
        ("spread of P, largest", "spread"), ("Marchenko-Pastur", "spread_mp")]},
    found="Not in the paper; its reviewers asked how rank-complete the random basis is."))  # k = 9: the init tables
def mechanism_runs(s):
    es, ds = MECHANISM_QUICK_E if s.quick else MECHANISM_E, s.main
    yield flags("--dataset", ds)
    for kind, flag, *rest in [("frozen", "--expansion", "--frozen"), ("limit", "--lc-limit"), ("init", "--lc-init"),
                              ("learnable", "--expansion"), ("preconditioned", "--expansion", "--frozen",
                                                             "--preconditioned")]:
        yield from (flags("--dataset", ds, flag, e, *rest) for e in es[kind])
    large = flags("--dataset", ds, "--kernel-size", LARGE_KERNEL)  # written as in the init group
    yield from [large] * bool(es["large_kernel"])
    for i, e in [(i, e) for i in INIT_STUDY for e in es["large_kernel"]]:
        yield flags(*large, "--expansion", e, "--frozen", "--init", i)
        yield flags(*large, "--lc-limit", e, "--init", i)


# Over time: does the gain fade as training forgets the init, or does the early phase pick a solution that the long
# run keeps? Rows are schedules, the rest of the setting the paper's.
SCHEDULES = {f"{n} epochs": dict(epochs=n) for n in (5, 15, 75)}


def length_table(ds, kinds, rows=SCHEDULES, fgsm=(), **keys):
    """Test accuracy by schedule: the baseline, then each kind and its gain over the baseline; FGSM of some."""
    columns = {"baseline": Column({})}
    for label, config in kinds.items():
        columns[label], columns[f"gain, {label}"] = Column(config), Column(config, minus={})
    columns.update({f"FGSM {label}": Column(kinds.get(label, {}), "fgsm_acc") for label in fgsm})
    return Table(f"The length axis on {ds}: {', '.join(kinds)} against the baseline, test accuracy %", "schedule",
                 rows, columns, base=dict(dataset=ds), spans=True, **keys)


LENGTH_FASHIONMNIST = length_table(  # its first row: the QUICK length group's 100 SGD steps
    "fashionmnist", {"frozen LC x128": FROZEN_128, "learnable LC x128": LC_128,
                     "preconditioned x128": dict(FROZEN_128, preconditioned=True), "--lc-init 128": lc_init(128)},
    {"5 epochs on 5,000 images": dict(epochs=5, train_subset=5000), **SCHEDULES},
    fgsm=("baseline", "frozen LC x128", "--lc-init 128"),
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


@group("recipe", "the paper's recipe on all of Fashion-MNIST, for a CPU: 75 epochs, and 5 and 15", Table(
    "Table 1, Fashion-MNIST, at the paper's recipe (75 epochs, all 60,000 images), test accuracy %", "model",
    {"baseline": {}, "LC learnable x128": LC_128, "LC frozen x128": FROZEN_128, "--lc-init 128": lc_init(128)},
    {"ours": Column({})}, base=dict(dataset="fashionmnist"), spans=True, min_rows=1,
    paper={label: dict(ours=p) for label, p in zip(("baseline", "LC learnable x128", "LC frozen x128"),
                                                  PAPER_TABLE1["fashionmnist"])},
    found="Paper (4 seeds): frozen LC x128 ties the baseline; learnable LC x128 is 0.21 below."), LENGTH_FASHIONMNIST,
    FORGOTTEN_FASHIONMNIST)
def recipe_runs(s):  # its own schedules on all 60,000 images: EPOCHS and TRAIN_SUBSET do not apply
    for epochs in (75, 5, 15):
        for kind in [[], ["--expansion", 128, "--frozen"], ["--expansion", 128], ["--lc-init", 128]]:
            yield flags("--dataset", "fashionmnist", "--epochs", epochs, *kind)


@group("length", "why it works over time (beyond the paper): E = 4, 128, 2048 at 5, 15 and EPOCHS epochs; QUICK: "
       "its 100-step runs at E = 128", LENGTH_FASHIONMNIST, FORGOTTEN_FASHIONMNIST,
       *(length_table(  # past E = 128 frozen LC preconditioned
           "cifar10", {f"frozen LC x{e}": dict(expansion=e, frozen=True, preconditioned=e > 128), "limit": limit(e),
                       "init": lc_init(e), "learnable LC": dict(expansion=e)},
           found="Not in the paper, which trains 75 epochs.") for e in (4, 128, 2048)))
def length_runs(s):
    if s.quick:  # the settings' schedule (QUICK's 100 SGD steps), to be run with more seeds
        yield from (flags("--dataset", s.main, *kind) for kind in [[], ["--expansion", 128, "--frozen"],
                    ["--expansion", 128, "--frozen", "--preconditioned"], ["--lc-init", 128]])
        return
    for schedule in [flags("--epochs", 5), flags("--epochs", 15), []]:  # []: EPOCHS
        yield flags("--dataset", s.main, *schedule)
        for e in (4, 128, 2048):
            preconditioned = ["--preconditioned"] if e > 128 else []
            yield flags("--dataset", s.main, "--expansion", e, "--frozen", *preconditioned, *schedule)
            for kind in ("--lc-init", "--lc-limit", "--expansion"):
                yield flags("--dataset", s.main, kind, e, *schedule)


QUICK_GROUPS = ("table1", "expansion", "mechanism")
TABLES = list(dict.fromkeys(t for g in GROUPS.values() for t in g.tables))  # each once, in the groups' order

# -----------------------------------------------------------------------------
# Runs: each config on the chosen datasets, once per seed, with its paths

Run = collections.namedtuple("Run", "group argv out checkpoint log")  # argv: train.py's; out: its results file


def runs_of(groups, s):
    """The groups' runs, each config once (groups share some), in its first group."""
    runs = {}
    for group, config in [(group, config) for group in groups for config in group.configs(s)]:
        if config[config.index("--dataset") + 1] not in s.datasets:
            continue
        text = " ".join(config)
        # the settings' schedule, unless the config brings its own (--epochs and all images)
        epochs = [] if "--epochs" in config else flags("--epochs", s.epochs)
        subset = flags("--train-subset", s.train_subset) if epochs and s.train_subset else []
        for seed in s.seeds:
            # names as the bash version made them: flags without dashes, and 8 hex digits of the md5 of the
            # recipe's text (`md5sum <<<"..."` hashed a trailing newline too)
            hashed = f"{' '.join([text, '--seed', seed, *epochs])} {' '.join(subset + [s.train_args]).strip()}\n"
            digest = hashlib.md5(hashed.encode()).hexdigest()[:8]
            name = f"{text.replace('--', '').replace(' ', '_')}_seed_{seed}-{digest}"
            recipe, extra = [*config, "--seed", seed, *epochs, *subset], shlex.split(s.train_args)
            args = train.PARSER.parse_args(recipe + extra)  # the schedule after TRAIN_ARGS; a bad flag: exit 2
            setting = f"{args.dataset}-{args.epochs}ep" + f"-{args.train_subset}" * bool(args.train_subset)
            out, checkpoint = f"{s.results}/{setting}.jsonl", f"{s.results}/checkpoints/{name}.pt"
            argv = [*recipe, "--data-dir", s.data_dir, "--out", out, "--checkpoint", checkpoint,
                    "--save-figures", f"{s.results}/figures/{name}", "--skip-finished", *extra]
            runs.setdefault(json.dumps(vars(args)), Run(group.name, argv, out, checkpoint, f"{s.results}/logs/{name}.log"))
    return list(runs.values())


def unfinished(runs):
    """The runs without a line in their results file yet, with their arguments: the sweep's skip check (train.py's
    --skip-finished asks again, for a second sweep on the same RESULTS)."""
    done, todo = {}, []
    for run in runs:
        args = train.parse_args(run.argv)  # a bad SEEDS, EPOCHS or TRAIN_ARGS: one line, exit 2
        if run.out not in done:
            done[run.out] = {json.dumps(train.recipe(r), sort_keys=True) for r in train.read_results(run.out)}
        if json.dumps(train.recipe(args), sort_keys=True) not in done[run.out]:
            todo.append((run, args))
    return todo


# -----------------------------------------------------------------------------
# The plan: runs and estimated GPU-hours per group

REFERENCE_SECONDS = 90  # one 75-epoch ResNet-20-16 run on CIFAR-10 on one H100 (the project's speed goal)


def step_flops(args, cache={}):
    """FLOPs of one training step: 3× the forward (backward ≈ 2× forward; torch's counter overcounts grouped-conv
    backward), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    key = json.dumps({k: v for k, v in train.recipe(args).items() if k != "seed"})
    if key not in cache:
        with torch.device("meta"):
            net = train.build_net(args)
            x = torch.empty(args.batch_size, train.DATASETS[args.dataset]["channels"], 32, 32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x)
        cache[key] = 3 * counter.get_total_flops()
    return cache[key]


def run_flops(args):
    """Training plus evaluation (test, FGSM, train accuracy) FLOPs of one run."""
    data = train.DATASETS[args.dataset]
    n_train = min(data["train_images"], args.train_subset or math.inf)
    evaluation = (n_train + 5 * data["test_images"] + 3 * args.pgd_steps * data["test_images"]) / 3
    return step_flops(args) / args.batch_size * (n_train * args.epochs + evaluation)


def print_plan(runs, todo):
    hours = REFERENCE_SECONDS / run_flops(train.parse_args(["--dataset", "cifar10"])) / 3600  # per FLOP
    rows = [(g, sum(r.group == g for r in runs), [a for r, a in todo if r.group == g])
            for g in dict.fromkeys(r.group for r in runs)]
    print("| group | runs | to run | est. GPU-hours to run |\n|---|---|---|---|")
    for g, n, args in rows + [("all", len(runs), [a for _, a in todo])]:
        print(f"| {g} | {n} | {len(args)} | {sum(map(run_flops, args)) * hours:.1f} |")
    print(f"\nGPU-hours are estimates: FLOPs relative to a 75-epoch ResNet-20-16 run taken as {REFERENCE_SECONDS} s "
          "on one H100." + ("" if torch.cuda.is_available() else " There is no GPU here: a CPU is far slower."))


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
# The report: every usable line of every results file, in one part per (training setting,
# precision), every table rendered by one function, then the figures

# a run's training and evaluation setting: the report has a part for each one it finds
SETTING = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "fgsm_eps",
           "pgd_steps")
FORMATS = dict(params_learnable="{:,.0f}", spread="{:.3g}", spread_mp="{:.3g}", first_rms="{:.3f}",
               first_rms_limit="{:.3f}")  # else "{:.2f}"
Cell = collections.namedtuple("Cell", "text value")  # value: the mean (or gain) a figure draws


def number(x):  # x if it is a finite number, else None (a JSON line can hold NaN, Infinity or "81.5")
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def unusable(r):
    """Why the report cannot use a result line (parsed JSON), or None: it needs a JSON object whose config keys have
    the types of train.py's flags and whose test_acc is a finite number."""
    if not isinstance(r, dict):
        return "not a JSON object"
    for action in train.PARSER._actions:
        if action.dest not in train.CONFIG_KEYS:
            continue
        value = r.get(action.dest, action.default)  # lines from before a flag lack its key
        kind = action.type or (str if action.default is None else type(action.default))  # store_true: bool
        if value is None and action.default is None or not isinstance(kind, type):
            continue  # an unset flag, or a type argparse gets from a function: nothing to check
        ok = number(value) is not None if kind is float else type(value) is kind  # an int is a float, a bool no int
        if not ok:
            return f"{action.dest} is {value!r}, not {kind.__name__}"
        if action.choices and value not in action.choices or action.dest in ("epochs", "batch_size") and value < 1:
            return f"{action.dest} is {value!r}, not a value train.py takes"
    if "test_acc" not in r:
        return "no test_acc"
    if number(r["test_acc"]) is None:
        return f"test_acc is {r['test_acc']!r}, not a finite number"
    return None


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
    f = tensor(r.get("first_filters"), 4)  # the first layer's filters: their RMS, and over sqrt(alpha) for frozen LC
    out["first_rms"] = number(f.square().mean().sqrt().item()) if f is not None else None
    first_alpha = number(layers[0].get("alpha")) if layers else None
    out["first_rms_limit"] = (out["first_rms"] / math.sqrt(first_alpha) if out["first_rms"] is not None
                              and (first_alpha or 0) > 0 else None)  # a malformed alpha draws nothing
    v, out["centre_ring"] = tensor(r.get("spatial_variance"), 2), None  # Fig. 8b: centre over outer ring
    if v is not None and v.shape[0] == v.shape[1]:
        ring, c = torch.cat([v[0], v[-1], v[1:-1, 0], v[1:-1, -1]]), len(v) // 2
        out["centre_ring"] = number((v[c, c] / ring.mean()).item())
    return out


def load_results(folder):
    """-> (runs, skipped, files). runs: one per (config, seed), the first usable line, every config key filled in
    (older lines lack the newer keys), its metrics checked; skipped: where and why each other line is not used."""
    files, runs, skipped = sorted(Path(folder).glob("*.jsonl")), {}, []
    for path in files:
        for n, r in train.read_lines(path):
            if problem := unusable(r):
                skipped.append(f"{path.name} line {n}: {problem}")
                continue
            config = train.recipe(r)  # a line without "precision": fp32 from a CPU, else bf16
            runs.setdefault(json.dumps(config, sort_keys=True), {**r, **config, **metrics(r)})
    return list(runs.values()), skipped, files


def default_config(model):
    """`train.py --model model`'s config, less what a part (SETTING, precision) or a table (dataset) fixes, and seed."""
    config = train.recipe(train.parse_args(["--model", model]))
    return {k: v for k, v in config.items() if k not in ("dataset", "seed", "precision", *SETTING)}


def finder(runs):
    """-> find(keys, column config): the runs of exactly default_config(model) updated by keys and the column's."""
    index = collections.defaultdict(list)
    for r in sorted(runs, key=lambda r: r["seed"]):
        index[frozenset((k, r[k]) for k in train.CONFIG_KEYS if k != "seed")].append(r)
    defaults = functools.cache(default_config)  # per report: train.py's flags are read afresh
    def find(keys, config):
        config = config(keys) if callable(config) else config
        return [r for c in (config if isinstance(config, list) else [config])
                for r in index[frozenset({**defaults({**keys, **c}.get("model", "resnet")), **keys, **c}.items())]]
    return find


def evaluate(table, find, context):
    """[(row label, the row's keys, {column label: Cell})] in one part (context: setting, precision, dataset)."""
    rows = []
    for label, row in table.rows.items():
        keys, cells = {**context, **table.base, **row}, {}
        for name, column in table.columns.items():
            found = [r for r in find(keys, column.config) if r[column.metric] is not None]
            values = [r[column.metric] for r in found]
            mean, f = statistics.mean(values) if values else None, FORMATS.get(column.metric, "{:.2f}").format
            spread = f" ± {f(statistics.stdev(values))}" if len(values) > 1 else ""  # over seeds
            cells[name] = Cell(f"{f(mean)}{spread} ({len(values)})" if values else "—", mean)
            if column.minus is not None:  # paired by seed: the mean difference over the seeds both have
                others = {r["seed"]: r[column.metric] for r in find(keys, column.minus) if r[column.metric] is not None}
                gains = [r[column.metric] - others[r["seed"]] for r in found if r["seed"] in others]
                gain = statistics.mean(gains) if gains else None
                cells[name] = Cell("—" if gain is None else f"{gain:+.2f} ({len(gains)})", gain)
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
                      *lines[1:], *[f"\n{table.found}"] * bool(table.found)]) + "\n"


def describe(c):  # a training setting and precision in words
    rest = "".join(f", {k.replace('_', ' ')} {c[k]}" for k in ("momentum", "label_smoothing", "fgsm_eps", "pgd_steps")
                   if c[k] != train.PARSER.get_default(k))
    images = f"the first {c['train_subset']:,} training images" if c["train_subset"] else "the full training set"
    return (f"{c['epochs']} epoch(s) on {images}, batch {c['batch_size']}, lr {c['lr']}, weight decay "
            f"{c['weight_decay']}{rest}, {c['precision']}")


@contextlib.contextmanager
def atomic_file(path):
    """A binary file written under a name unique to this writer, then renamed into place: readers (and a second
    sweep writing the same file) never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def plot(folder, name, caption, xlabel, ylabel, curves, baseline, log_base):
    """A line plot into plots/ -> its markdown; "" without matplotlib, which is optional (the tables say it all)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in curves.items():
        if points := [(x, y) for x, y in points if y is not None]:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(baseline, color="grey", linestyle="--", label="baseline")
    ax.set_xscale("log", base=log_base)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    with atomic_file(Path(folder, "plots", f"{name}.png")) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"![{name}](plots/{name}.png)\n\n{caption}\n"


def expansion_figure(folder, rows, ds, where):
    """Fig. 4's shape: test accuracy against E, frozen and learnable LC, the baseline as a line."""
    curves = {f"{kind} LC": [(keys["expansion"], cells[f"test acc, {kind}"].value) for _, keys, cells in rows
                             if keys["expansion"]] for kind in ("frozen", "learnable")}
    baseline = next(cells["test acc, learnable"].value for _, keys, cells in rows if not keys["expansion"])
    return plot(folder, f"expansion_{ds}", f"Test accuracy against E on {ds}, runs {where} (Fig. 4).",
                "LC expansion E", "test accuracy %", curves, baseline, 2) if baseline is not None else ""


def length_figure(folder, rows, ds, where):
    """Each kind's gain over the baseline against the SGD steps of its row."""
    curves = {name.removeprefix("gain, "): [(sgd_steps(keys), cells[name].value) for _, keys, cells in rows]
              for name in rows[0][2] if name.startswith("gain, ")}
    return plot(folder, f"length_{ds}", f"Gain over the baseline against SGD steps on {ds}, runs {where}.",
                "SGD steps", "test accuracy % − the baseline's", curves, 0, 10)


FIGURES = dict(expansion=expansion_figure, length=length_figure)


def filters_figure(folder, runs, ds):
    """The first layer's combined filters of frozen (left) and learnable LC x128 (right) of one setting: the paper's
    recipe where both ran, else the longest schedule that has both (Fig. 7)."""
    from torchvision.utils import save_image
    lc_128, found = {**default_config("resnet"), "dataset": ds, "expansion": 128}, {}
    for r in sorted(runs, key=lambda r: -r["seed"]):  # the lowest seed last: it stays
        f = tensor(r.get("first_filters"), 4) if all(r[k] == v for k, v in lc_128.items() if k != "frozen") else None
        if f is not None and f.shape[1] in (1, 3):
            found[tuple(r[k] for k in (*SETTING, "precision")), r["frozen"]] = (r, f)
    both = [key for key, frozen in found if frozen and (key, False) in found]
    if not both:
        return ""
    paper = tuple(train.PARSER.get_default(k) for k in SETTING)
    key = max(both, key=lambda key: (key[:len(SETTING)] == paper, sgd_steps(found[key, True][0])))
    (r, frozen), (_, learnable) = found[key, True], found[key, False]
    left, right = (train.filter_grid(f.float()) for f in (frozen, learnable))  # one model: one shape
    with atomic_file(Path(folder, "plots", f"filters_{ds}.png")) as f:
        save_image(torch.cat([left, torch.ones(3, left.shape[1], 24), right], 2), f, format="png")  # a white gap
    return (f"![filters_{ds}](plots/filters_{ds}.png)\n\nFirst-layer combined filters on {ds}, frozen LC x128 (left) "
            f"and learnable LC x128 (right), seed {r['seed']}, {describe(r)}; 0 is grey, each on its own scale.\n")


def write_report(folder):
    runs, skipped, files = load_results(folder)
    find, parts, figures = finder(runs), [], {}  # figures: (plot, dataset) -> markdown, from the first part showing it
    def part(where, context, datasets, tables):
        sections = []
        for table in tables:
            fixed = "dataset" in table.base or any("dataset" in row for row in table.rows.values())
            for ds in [None] if fixed else datasets:
                rows = evaluate(table, find, {**context, "dataset": ds})
                sections += [text] if (text := render(table, rows, ds)) else []
                if text and table.plot and (key := (table.plot, rows[0][1]["dataset"])) not in figures:
                    figures[key] = FIGURES[table.plot](folder, rows, key[1], where)
        if sections:  # runs no table shows (of another --width, say): no empty heading
            parts.append(f"# Runs {where}\n\n" + "\n".join(sections))
    parts_of = collections.defaultdict(list)  # (setting, precision) -> its runs
    for r in runs:
        parts_of[tuple(r[k] for k in (*SETTING, "precision"))].append(r)
    for key, rs in sorted(parts_of.items(), key=lambda p: -len(p[1])):  # the parts with the most runs first
        context = dict(zip((*SETTING, "precision"), key))
        part(f"of {describe(context)}", context, sorted({r["dataset"] for r in rs}), [t for t in TABLES if not t.spans])
    for precision, _ in collections.Counter(r["precision"] for r in runs).most_common():
        context = {**{k: train.PARSER.get_default(k) for k in SETTING}, "precision": precision}
        part(f"across training lengths, {precision} (the rest of the setting the paper's)", context, [],
             [t for t in TABLES if t.spans])
    figures = [*figures.values(), *(filters_figure(folder, runs, ds) for ds in sorted({r["dataset"] for r in runs}))]
    figures = [f for f in figures if f]
    unused = (f" {len(skipped)} line(s) not used: " + "; ".join(skipped[:10])  # the first 10 named
              + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "") + ".") if skipped else ""
    head = (f"# lcconv: our results beside the paper's\n\nEach cell: mean ± std over seeds (number of seeds). "
            f"{len(runs)} finished runs in {len(files)} results file(s) ({', '.join(f.name for f in files) or 'none'})."
            f"{unused} Paper: Gavrikov & Keuper, arXiv:2301.11360.\n")
    with atomic_file(Path(folder, "REPORT.md")) as f:
        f.write("\n".join([head, *["## Figures\n\n" + "\n".join(figures)] * bool(figures), *parts]).encode())
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
    todo = unfinished(runs)
    if not s.quick:
        print_plan(runs, todo)
    failed = report_failed = 0
    for group in groups:
        print(f"== {group.name}")
        todo = unfinished(runs_of([group], s))  # again per group: a config an earlier group shares is done by now
        for n, (run, _) in enumerate(todo, 1):
            print(f"[{n}/{len(todo)}] {shlex.join([s.python, 'train.py', *run.argv])}")
            failed += not run_one(run, s)
        try:
            write_report(s.results)
        except Exception as e:  # a bug in the report must not stop the later groups' runs; it is said, not hidden
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"experiments.sh: the report failed ({type(e).__name__}: {e}, in {where.name} at "
                  f"{Path(where.filename).name}:{where.lineno}); the sweep goes on", file=sys.stderr)
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
