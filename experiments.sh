#!/usr/bin/env bash
""":"
# bash runs these lines and hands the file to Python (PYTHON, else python, else python3);
# Python reads them as a string. Portable sh: bash 3.2, dash.
[ -n "${PYTHON:-}" ] || command -v python >/dev/null 2>&1 || export PYTHON=python3
exec "${PYTHON:-python}" "$0" "$@"
"""
__doc__ = """\
Reproduce the CIFAR-scale results of Gavrikov & Keuper, "The Power of Linear Combinations:
Learning with Random Convolutions" (arXiv:2301.11360), and compare them with the paper's
numbers in $RESULTS/REPORT.md.

  bash experiments.sh                     every group below, then the report
  bash experiments.sh kernel ablation     only these groups
  bash experiments.sh --list [GROUP...]   print every train.py command, one per line; run nothing
  bash experiments.sh report              write $RESULTS/REPORT.md from the finished runs
  QUICK=1 bash experiments.sh             Table 1, Fig. 4 and the mechanism group scaled down to
                                          Fashion-MNIST on a 2-core CPU (a 5k-image subset,
                                          5 epochs, one seed; no k = 9 part in mechanism)
  QUICK=1 bash experiments.sh length      the same 100 SGD steps beside 1,175 on all 60k images
  QUICK=1 bash experiments.sh kernel      matched m/d across k = 3 ... 9 at the QUICK scale

Settings, from the environment (paper's defaults):
  SEEDS="0 1 2 3"   EPOCHS=75   DATASETS="cifar10 cifar100 svhn fashionmnist" (groups keep only
  runs on these)   DATA_DIR=./data   RESULTS=results   TRAIN_ARGS="" (added to every run and
  overriding it, e.g. "--train-subset 5000")   GPUS="" (e.g. "0 1 2 3": one run per GPU at a time)
  PYTHON=python   QUICK=1 also trains on the first 5,000 images only (TRAIN_SUBSET=5000)

A run whose config already has a line in $RESULTS/results.jsonl is skipped; an interrupted run
resumes from its checkpoint in $RESULTS/checkpoints. A failed run (or report) is reported and the
others go on; the exit status is 1 if any failed.

The file is a Python program: bash only runs its first lines, which start Python on it.
"""
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
import time
import traceback
from dataclasses import dataclass
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
                RESULTS="results", TRAIN_ARGS="", GPUS="", PYTHON="python", TRAIN_SUBSET="")
QUICK_DEFAULTS = dict(SEEDS="0", EPOCHS="5", DATASETS="fashionmnist", RESULTS="results-quick", TRAIN_SUBSET="5000")


def die(message):
    """Bad input: one line on stderr, exit 2, before any work."""
    print(f"experiments.sh: {message}", file=sys.stderr)
    sys.exit(2)


@dataclass
class Settings:
    quick: bool
    seeds: list
    epochs: str
    train_subset: str  # "" = the whole training set
    datasets: list
    data_dir: str
    results: str  # as given: the commands use it verbatim
    train_args: str
    gpus: list
    python: str
    env: dict  # the environment the runs get

    @property
    def main(self):  # the dataset of the one-dataset figures
        return "fashionmnist" if self.quick else "cifar10"


def read_settings(env):
    quick = env.get("QUICK", "0") == "1"

    def get(name):  # as bash's ${NAME:-default}: unset or empty takes the default
        return env.get(name) or (quick and QUICK_DEFAULTS.get(name)) or DEFAULTS[name]

    s = Settings(quick, get("SEEDS").split(), get("EPOCHS"), get("TRAIN_SUBSET"),
                 get("DATASETS").split() or list(train.DATASETS),
                 get("DATA_DIR"), get("RESULTS"), get("TRAIN_ARGS"), get("GPUS").split(), get("PYTHON"), dict(env))
    unknown = [d for d in s.datasets if d not in train.DATASETS]
    if unknown:
        die(f"DATASETS has {' '.join(unknown)}; datasets: {' '.join(train.DATASETS)}")
    try:
        shlex.split(s.train_args)
    except ValueError as e:
        die(f"TRAIN_ARGS={s.train_args!r}: {e}")
    return s


# -----------------------------------------------------------------------------
# Report helpers: results are dicts with every config key, checked when loaded; select and summarise them

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
# a run's training and evaluation setting: the report has a part for each one it finds
SETTING = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "fgsm_eps",
           "pgd_steps")
METRICS = ("test_acc", "fgsm_acc", "fve_first", "fve_last", "params_learnable")  # the numbers the report reads
BASIS = ("rank", "alpha", "spread", "spread_mp")  # what it reads of each layer's random basis


def number(x):
    """x if it is a finite number, else None (a JSON line can hold NaN, Infinity or "81.5")."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def unusable(r):
    """Why the report cannot use a result line (parsed JSON), or None: it needs a JSON object whose
    config keys have the types of train.py's flags and whose test_acc is a finite number."""
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
    if "test_acc" not in r:
        return "no test_acc"
    if number(r["test_acc"]) is None:
        return f"test_acc is {r['test_acc']!r}, not a finite number"
    return None


def metrics(r):
    """The metrics the report reads, each as it expects it, or None (missing in older lines, or malformed)."""
    v, basis, figures = r.get("spatial_variance"), r.get("basis"), r.get("save_figures")
    square = isinstance(v, list) and len(v) > 0 and all(  # k×k numbers
        isinstance(row, list) and len(row) == len(v) and all(number(x) is not None for x in row) for row in v)
    layers = isinstance(basis, list) and len(basis) > 0 and all(
        isinstance(layer, dict) and all(number(layer.get(k)) is not None for k in BASIS) for layer in basis)
    return dict({k: number(r.get(k)) for k in METRICS}, spatial_variance=v if square else None,
                basis=basis if layers else None, save_figures=figures if isinstance(figures, str) else None)


def load_results(folder):
    """-> (results, skipped). results: one per (config, seed), the first usable line written, with
    every config key filled in (lines written before a flag existed lack its key) and the metrics
    checked; skipped: why each other line is not used ("line 3: no test_acc"), blank lines and
    repeats aside."""
    unique, skipped = {}, []
    for n, r in train.read_lines(Path(folder) / "results.jsonl"):
        problem = unusable(r)
        if problem:
            skipped.append(f"line {n}: {problem}")
            continue
        config = train.recipe(r)
        unique.setdefault(json.dumps(config, sort_keys=True), {**r, **config, **metrics(r)})
    return list(unique.values()), skipped


@functools.cache
def default_config(model):
    """The config of `train.py --model model`, as train.py fills it in (its flags' defaults and the
    model's own), less the keys the report splits by (SETTING) or pools (dataset, seed). The runs
    of a table match it in every other key, so those of a flag added to train.py later, at
    another value, stay out of the tables that do not ask for it."""
    config = train.recipe(train.parse_args(["--model", model]))
    return {k: v for k, v in config.items() if k not in ("dataset", "seed", *SETTING)}


def select(runs, base=None, **kw):
    """The runs with exactly this config: base (default: the plain ResNet's) updated by kw."""
    want = {**(base or default_config("resnet")), **kw}
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]


def family(runs, ds, base, *free):
    """The runs on ds that match base except in the keys free: one figure's runs."""
    return [r for r in runs if r["dataset"] == ds and all(r.get(k) == v for k, v in base.items() if k not in free)]


def values(rs, key):
    return [r[key] for r in rs if r.get(key) is not None]


def mean(rs, key="test_acc"):
    v = values(rs, key)
    return statistics.mean(v) if v else math.nan


def cell(rs, key="test_acc"):
    v = values(rs, key)
    if len(v) < 2:
        return f"{v[0]:.2f} (1)" if v else "—"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)})"


ONE_SEED_TOLERANCE = 0.5  # accuracy points that count as "the same" when one seed gives no spread


def tolerance(*groups):
    """How far two means may be apart and still count as equal: the seeds' spread (the larger
    std over seeds), or a fixed tolerance where a group has one seed."""
    spreads = [statistics.stdev(values(rs, "test_acc")) for rs in groups if len(values(rs, "test_acc")) > 1]
    return max(spreads) if len(spreads) == len(groups) else ONE_SEED_TOLERANCE


def agree(a, b):
    return abs(mean(a) - mean(b)) <= tolerance(a, b)


def within(*groups):
    """What tolerance() counts as equal, in words."""
    if any(len(values(rs, "test_acc")) < 2 for rs in groups):
        return f"within {ONE_SEED_TOLERANCE} points (one seed: no spread to compare with)"
    return "within the seeds' spread (the larger std over seeds)"


def listed(xs):
    return ", ".join(map(str, xs)) or "none"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def first(xs, holds):
    return next((x for x in xs if holds(x)), "— (not in the sweep)")


def sizes(rs, key):
    return sorted({r[key] for r in rs if r[key] is not None})


def centre_ratio(rs):
    """Spatial variance at the kernel centre over the mean of its outer ring (Fig. 8b); 1 = uniform."""
    ratios = []
    for v in [r["spatial_variance"] for r in rs if r["spatial_variance"]]:
        v = torch.tensor(v)
        c = len(v) // 2
        ring = torch.cat([v[0], v[-1], v[1:-1, 0], v[1:-1, -1]]) if len(v) > 1 else v.flatten()
        ratios.append((v[c, c] / ring.mean()).item())
    return f"{statistics.mean(ratios):.2f}" if ratios else "—"


def variance_range(rs):
    """The spatial variance over its mean, smallest–largest position (the heatmap's numbers; its
    grey is 1, white 4, black 1/4)."""
    v = next((r["spatial_variance"] for r in rs if r["spatial_variance"]), None)
    if v is None:
        return "—"
    v = torch.tensor(v)
    v = v / v.mean()
    return f"{v.min():.2f}–{v.max():.2f}"


def figure_links(rs, folder):
    r = next((r for r in rs if r.get("save_figures")), None)
    if r is None:
        return "—"
    d = os.path.relpath(r["save_figures"], folder)
    return f"[filters]({d}/filters.png) · [variance]({d}/spatial_variance.png)"


def plot(folder, name, xlabel, ylabel, series):
    """A line plot over E (log scale) into plots/ if matplotlib happens to be installed; -> its
    markdown image, or "" without matplotlib (plots are optional; the tables say it all)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in series.items():
        points = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    path = Path(folder, "plots", f"{name}.png")
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"\n![{name}](plots/{name}.png)\n"


@contextlib.contextmanager
def atomic_file(path):
    """A binary file written under a temporary name unique to this writer and renamed into place
    when done, so that readers (and a second sweep writing the same file) never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# The groups. Each is one table or figure: its runs (configs: train.py flags without seed and
# paths; a config in several groups, written identically, runs once) and, beside them, the
# report section that reads their results (the runs of one training setting).

EXPANSIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # Fig. 4
LC_EXPANSIONS = (1, 2, 4, 8, 16, 32, 64, 128)          # Fig. 8, the init study
KERNEL_SIZES = (3, 5, 7, 9)                            # Fig. 7-9
CONVMIXER_EXPANSIONS = (1, 8, 64)
INIT_STUDY = ("kaiming_uniform", "center")             # the paper's init vs our centre-weighted one
LARGE_KERNEL = 9                                       # the paper's worst kernel size


def flags(*words):
    """train.py flags from words and numbers: flags("--expansion", 8) -> ["--expansion", "8"]."""
    return [str(w) for w in words]


class Group:
    name = figure = ""  # the group's name on the command line; the table or figure it reproduces
    spans_settings = False  # True: its report reads the runs of every training setting at once

    def configs(self, s):
        """The group's runs under the settings s, as lists of train.py flags."""
        raise NotImplementedError

    def report(self, results, folder):
        """Its report section for each dataset the results have."""
        return "".join(self.section(results, ds, folder) for ds in dict.fromkeys(r["dataset"] for r in results))

    def section(self, results, ds, folder):
        return ""


class Table1(Group):
    name, figure = "table1", "Table 1: baseline vs LC x128 learnable vs frozen, four datasets"
    E = 128

    def configs(self, s):
        for ds in PAPER_TABLE1:
            yield flags("--dataset", ds)
            yield flags("--dataset", ds, "--expansion", self.E)
            yield flags("--dataset", ds, "--expansion", self.E, "--frozen")

    def report(self, results, folder):
        rows = []
        for ds, paper in PAPER_TABLE1.items():
            rs = [select(results, dataset=ds), select(results, dataset=ds, expansion=self.E),
                  select(results, dataset=ds, expansion=self.E, frozen=True)]
            if any(rs):
                rows.append([ds, cell(rs[0]), paper[0], cell(rs[1]), paper[1], cell(rs[2]), paper[2]])
        if not rows:
            return ""
        return (f"## Table 1: ResNet-20-16 vs ResNet-LC-20-16x{self.E}, test accuracy %\n\n" + table(
            ["dataset", "baseline", "paper", "LC learnable", "paper", "LC frozen", "paper"], rows))


class Expansion(Group):
    name, figure = "expansion", "Fig. 4 (accuracy, params, FGSM) and Fig. 5 (FVE): E = 1 ... 512"
    QUICK_EXPANSIONS = (1, 4, 16, 64, 128)

    def configs(self, s):
        yield flags("--dataset", s.main)
        for e in self.QUICK_EXPANSIONS if s.quick else EXPANSIONS:
            yield flags("--dataset", s.main, "--expansion", e)
            yield flags("--dataset", s.main, "--expansion", e, "--frozen")

    def section(self, results, ds, folder):
        rs = family(results, ds, default_config("resnet"), "expansion", "frozen")
        es = [e for e in sizes(rs, "expansion") if e > 0]
        if len(es) < 3:
            return ""
        frozen = {e: select(rs, expansion=e, frozen=True) for e in es}
        learnable = {e: select(rs, expansion=e) for e in [0] + es}
        params = lambda rs: f"{mean(rs, 'params_learnable'):,.0f}" if rs else "—"  # noqa: E731
        acc = [[e or "baseline", params(frozen.get(e, [])), params(learnable[e]), cell(frozen.get(e, [])),
                cell(learnable[e]), cell(frozen.get(e, []), "fgsm_acc"), cell(learnable[e], "fgsm_acc")] for e in [0] + es]
        fve = [[e or "baseline", cell(frozen.get(e, []), "fve_first"), cell(learnable[e], "fve_first"),
                cell(frozen.get(e, []), "fve_last"), cell(learnable[e], "fve_last")] for e in [0] + es]
        beats = first(es, lambda e: mean(frozen[e]) > mean(learnable[e]))
        beats_base = first(es, lambda e: mean(frozen[e]) > mean(learnable[0]))
        image = plot(folder, f"fig4_{ds}", "LC expansion E", "test accuracy %", {
            "frozen LC": [(e, mean(frozen[e])) for e in es], "learnable LC": [(e, mean(learnable[e])) for e in es],
            "baseline": [(e, mean(learnable[0])) for e in es]})
        return (f"## Fig. 4 and 5: ResNet-LC-20-16xE on {ds}\n\n"
                + table(["E", "learnable params, frozen", "learnable params, learnable", "frozen acc", "learnable acc",
                         "frozen FGSM", "learnable FGSM"], acc)
                + "\n" + table(["E", "FVE first, frozen", "FVE first, learnable", "FVE last, frozen", "FVE last, learnable"], fve)
                + "\nPaper: frozen LC beats learnable LC from E = 8 and the baseline at E = 128, then declines "
                  "slightly; its FGSM accuracy rises with E above both; its FVE stays higher. "
                  f"Ours: frozen beats learnable from E = {beats}, the baseline from E = {beats_base}.\n" + image)


class Scaling(Group):
    """Fig. 6: frozen vs learnable at E = 1 as one size of the ResNet grows."""

    def __init__(self, key, sizes, title, paper):
        self.name, self.key, self.sizes, self.title, self.paper = key, key, sizes, title, paper
        self.figure = f"{title} = {sizes[0]} ... {sizes[-1]}, E = 1"

    def configs(self, s):
        for x in self.sizes:
            yield flags("--dataset", s.main, "--expansion", 1, f"--{self.key}", x)
            yield flags("--dataset", s.main, "--expansion", 1, f"--{self.key}", x, "--frozen")

    def section(self, results, ds, folder):
        rs = family(results, ds, dict(default_config("resnet"), expansion=1), self.key, "frozen")
        xs = sizes(rs, self.key)
        if len(xs) < 2:
            return ""
        pairs = {x: (select(rs, expansion=1, frozen=True, **{self.key: x}), select(rs, expansion=1, **{self.key: x}))
                 for x in xs}
        even = first(xs, lambda x: mean(pairs[x][0]) >= mean(pairs[x][1]))
        return (f"## {self.title} on {ds}, E = 1\n\n"
                + table([self.key, "frozen", "learnable"], [[x, *map(cell, p)] for x, p in pairs.items()])
                + f"\nPaper: {self.paper}. Ours: frozen reaches learnable at {self.key} = {even}.\n")


class Kernel(Group):
    """Fig. 7-9, and beyond the paper: P depends on E and k only through m/d = E·c_out/(c_in·k²),
    so are the frozen-vs-learnable gaps the same at matched m/d? QUICK runs only that part."""
    name, figure = "kernel", "Fig. 7-9: k = 3 ... 9, learned filters vs LCs of frozen random ones; matched m/d"
    MATCHED = {3: 16, 5: 44, 7: 87, 9: 144}  # E ∝ k²: m/d ≈ 1.78 in the convs of equal width, ∝ E/k² in all

    def configs(self, s):
        for k in KERNEL_SIZES:
            yield flags("--dataset", s.main, "--kernel-size", k)
            for e in [] if s.quick else LC_EXPANSIONS:
                yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e)
                yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e, "--frozen")
            e = self.MATCHED[k]  # frozen in the preconditioned form at every k: the folded one is slow at k = 9
            if s.quick or e not in LC_EXPANSIONS:  # else the grid has it
                yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e)
            yield flags("--dataset", s.main, "--kernel-size", k, "--expansion", e, "--frozen", "--preconditioned")

    def section(self, results, ds, folder):
        return self.grid_section(results, ds, folder) + self.matched_section(results, ds)

    def matched_section(self, results, ds):
        rs = family(results, ds, default_config("resnet"), "kernel_size", "expansion", "frozen", "preconditioned")
        rows, gaps = [], {}
        for k, e in self.MATCHED.items():
            frozen = select(rs, kernel_size=k, expansion=e, frozen=True, preconditioned=True)
            learnable = select(rs, kernel_size=k, expansion=e)
            if frozen or learnable:
                rows.append([k, e, f"{e / k**2:.2f}", cell(select(rs, kernel_size=k)), cell(frozen), cell(learnable),
                             f"{mean(learnable) - mean(frozen):.2f}".replace("nan", "—")])
            if frozen and learnable:
                gaps[k] = (frozen, learnable)
        if len(rows) < 2:  # not a comparison across k (the expansion group has k = 3, E = 16)
            return ""
        ours = "Ours: — (fewer than two kernel sizes with both runs)."
        if len(gaps) >= 2:
            gap = {k: mean(b) - mean(a) for k, (a, b) in gaps.items()}
            spread = max(gap.values()) - min(gap.values())
            tol = 2 * tolerance(*sum(gaps.values(), ()))  # a gap is a difference of two means
            ours = (f"Ours: at matched m/d the gap (learnable − frozen) is "
                    + ", ".join(f"{g:+.2f} at k = {k}" for k, g in gap.items()) + f"; it spreads by {spread:.2f} "
                    f"points across k, against {tol:.2f} for two differences of means "
                    f"{within(*sum(gaps.values(), ()))}: "
                    + ("consistent with a gap set by m/d alone." if spread <= tol else
                       "the hypothesis fails; the spread is what the kernel size costs beyond the basis statistics."))
        return (f"\n### Matched m/d across k on {ds}\n\nP depends on E and k only through m/d = E·c_out/(c_in·k²) "
                "(its mean α = (m/d)/3, rank min(1, m/d), spread from √(d/m)); so does the init scale. Frozen LC in "
                "the preconditioned form. Test accuracy %:\n\n"
                + table(["k", "E", "m/d (equal width)", "baseline", "frozen LC", "learnable LC", "gap"], rows)
                + "\nHypothesis: the frozen-vs-learnable gap of Fig. 8a is a function of m/d alone.\n\n" + ours + "\n")

    def grid_section(self, results, ds, folder):
        rs = family(results, ds, default_config("resnet"), "kernel_size", "expansion", "frozen")
        ks = sizes(rs, "kernel_size")
        es = [e for e in sizes(rs, "expansion") if e > 0 and all(select(rs, kernel_size=k, expansion=e) for k in ks)]
        if len(ks) < 2 or not es:
            return ""
        acc = lambda k, e, frozen=False: mean(select(rs, kernel_size=k, expansion=e, frozen=frozen))  # noqa: E731
        rows = [[k, cell(select(rs, kernel_size=k))] + [f"{acc(k, e, True):.2f} / {acc(k, e):.2f}".replace("nan", "—")
                                                        for e in es] for k in ks]
        image = plot(folder, f"fig8a_{ds}", "LC expansion E", "learnable − frozen, accuracy %",
                     {f"k = {k}": [(e, acc(k, e) - acc(k, e, True)) for e in es] for k in ks})
        heat = []
        for k in ks:
            for label, config in [("learned, no LC", dict()), (f"LC x{es[-1]} learnable", dict(expansion=es[-1])),
                                  ("LC x1 frozen", dict(expansion=1, frozen=True)),
                                  (f"LC x{es[-1]} frozen", dict(expansion=es[-1], frozen=True))]:
                chosen = select(rs, kernel_size=k, **config)
                if chosen:
                    heat.append([k, label, centre_ratio(chosen), variance_range(chosen), figure_links(chosen, folder)])
        return (f"## Fig. 7-9: kernel size on {ds}; test accuracy %, frozen / learnable per E\n\n"
                + table(["k", "baseline"] + [f"E = {e}" for e in es], rows)
                + "\nPaper: the frozen-vs-learnable gap grows with k and shrinks with E.\n" + image
                + "\nSpatial variance of the combined filters (Fig. 8b), centre over outer ring (1 = uniform). "
                  "Paper: learned large kernels concentrate variance in the centre; LCs of i.i.d. random filters "
                  "stay uniform.\n\n" + table(["k", "filters", "centre / ring", "variance / mean", "figures"], heat))


class Ablation(Group):
    name, figure = "ablation", "Table 3: an op between the LC-Block's two convs, E = 64"
    E = 64

    def configs(self, s):
        for op in PAPER_TABLE3:
            yield flags("--dataset", s.main, "--expansion", self.E, "--intermediate", op)
            yield flags("--dataset", s.main, "--expansion", self.E, "--intermediate", op, "--frozen")

    def section(self, results, ds, folder):
        rs = family(results, ds, dict(default_config("resnet"), expansion=self.E), "intermediate", "frozen")
        if all(r["intermediate"] == "none" for r in rs):
            return ""
        paper = PAPER_TABLE3 if ds == "cifar10" else {op: ("—", "—") for op in PAPER_TABLE3}
        rows = [[op, cell(select(rs, expansion=self.E, frozen=True, intermediate=op)), paper[op][0],
                 cell(select(rs, expansion=self.E, intermediate=op)), paper[op][1]] for op in PAPER_TABLE3]
        return (f"## Table 3: ResNet-LC-20-16x{self.E} on {ds}, an op between the two convs\n\n"
                + table(["intermediate", "frozen", "paper", "learnable", "paper"], rows))


class OffTheShelf(Group):
    name, figure = "offtheshelf", "Fig. 1: do nets with 1x1 convs after their spatial convs tolerate random filters?"

    def configs(self, s):
        for model in train.MODELS:
            yield flags("--dataset", s.main, "--model", model)
            yield flags("--dataset", s.main, "--model", model, "--frozen")

    def section(self, results, ds, folder):
        rows = []
        for model in train.MODELS:
            base = default_config(model)
            learnable, frozen = select(results, base, dataset=ds), select(results, base, dataset=ds, frozen=True)
            if learnable or frozen:
                rows.append([model, cell(learnable), cell(frozen), f"{mean(learnable) - mean(frozen):.2f}"])
        if len(rows) < 2:
            return ""
        return (f"## Fig. 1: off-the-shelf models on {ds}, learnable vs frozen random spatial convs\n\n"
                + table(["model", "learnable", "frozen", "drop"], rows)
                + "\nPaper: nets whose spatial convs are followed by 1×1 convs (ResNet-50, MobileNet v2) lose "
                  "1.6–1.9 points; Basic-Block nets (ResNet-18, CIFAR ResNet-20) lose at least 16.\n")


class ConvMixer(Group):
    name, figure = "convmixer", "beyond the paper: the large-kernel gap in ConvMixer-256/8"

    def configs(self, s):
        for k in KERNEL_SIZES:
            yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", k)
            yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", k, "--frozen")
            for e in CONVMIXER_EXPANSIONS:
                yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", k, "--expansion", e,
                            "--frozen")

    def section(self, results, ds, folder):
        base = default_config("convmixer")
        rs = family(results, ds, base, "kernel_size", "expansion", "frozen")
        ks, es = sizes(rs, "kernel_size"), [e for e in sizes(rs, "expansion") if e > 0]
        if len(ks) < 2:
            return ""
        rows = [[k, cell(select(rs, base, kernel_size=k)), cell(select(rs, base, kernel_size=k, frozen=True))]
                + [cell(select(rs, base, kernel_size=k, expansion=e, frozen=True)) for e in es] for k in ks]
        return (f"## Beyond the paper: ConvMixer-256/8 on {ds}, kernel size\n\n"
                + table(["k", "learnable", "frozen"] + [f"LC x{e} frozen" for e in es], rows)
                + "\nDoes the large-kernel gap of frozen random filters appear here too, and do LCs close it?\n")


def frozen_large_kernel(ds, e, init):
    """Frozen ResNet-LC x e at the large kernel with this init: shared by the init and mechanism groups."""
    return flags("--dataset", ds, "--kernel-size", LARGE_KERNEL, "--expansion", e, "--frozen", "--init", init)


class Init(Group):
    name, figure = "init", "beyond the paper, its open question: does a centre-weighted init close the k = 9 gap?"

    def configs(self, s):
        yield flags("--dataset", s.main, "--kernel-size", LARGE_KERNEL)
        yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", LARGE_KERNEL)
        for i in INIT_STUDY:
            for e in LC_EXPANSIONS:
                yield frozen_large_kernel(s.main, e, i)
            yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", LARGE_KERNEL, "--frozen",
                        "--init", i)
            for e in CONVMIXER_EXPANSIONS:
                yield flags("--dataset", s.main, "--model", "convmixer", "--kernel-size", LARGE_KERNEL,
                            "--expansion", e, "--frozen", "--init", i)

    def section(self, results, ds, folder):
        out = ""
        for name, model in [("ResNet-LC-20-16", "resnet"), ("ConvMixer-256/8", "convmixer")]:
            base = default_config(model)
            rs = family(results, ds, dict(base, kernel_size=LARGE_KERNEL), "expansion", "frozen", "init")
            if not any(r["init"] == "center" for r in rs):
                continue
            learned = select(rs, base, kernel_size=LARGE_KERNEL)
            rows = [[e or "plain conv"] + [f"{cell(chosen)}, centre/ring {centre_ratio(chosen)}" for chosen in
                    (select(rs, base, kernel_size=LARGE_KERNEL, expansion=e, frozen=True, init=i) for i in INIT_STUDY)]
                    for e in sizes([r for r in rs if r["frozen"]], "expansion")]
            out += (f"## Beyond the paper: a centre-weighted init for {name}, k = {LARGE_KERNEL}, on {ds}\n\n"
                    f"Learned filters (no LC): {cell(learned)}, spatial variance centre/ring {centre_ratio(learned)}.\n\n"
                    + table(["E", "frozen, kaiming_uniform", "frozen, center"], rows)
                    + "\nThe paper's open question: does an init with more variance in the kernel centre close the "
                      "large-kernel gap of frozen random filters?\n\n")
        return out


class Mechanism(Group):
    """A frozen LC-Block trains exactly as one conv whose gradient is multiplied by the fixed
    P = SᵀS of its random filters (--preconditioned runs it in that form); for m = E·c_out much
    larger than d = c_in·k², P tends to α·I, a plain conv with an E-dependent learning rate
    (--lc-limit E). Does that limit explain Fig. 4?"""
    name, figure = "mechanism", "why it works (beyond the paper): frozen LC xE vs its large-E limit, E = 1 ... 32768"
    # which E each kind of run gets; QUICK: a Fashion-MNIST subset that still shows the result
    E = dict(frozen=EXPANSIONS, learnable=EXPANSIONS, limit=EXPANSIONS + (2048, 8192, 32768),
             init=EXPANSIONS + (2048, 8192, 32768), preconditioned=(8, 128, 512, 2048, 8192, 32768),
             large_kernel=(8, 64, 512))
    # QUICK: frozen and learnable LC are the expansion group's runs; past E = 128 frozen LC runs in
    # the preconditioned form, at the plain ResNet's cost; E = 4 is below m = d (E = 9)
    QUICK_E = dict(frozen=(4, 128), learnable=(4, 128), limit=(4, 128, 512, 2048), init=(4, 128, 2048),
                   preconditioned=(128, 512, 2048), large_kernel=())
    PEAK = 128  # Fig. 4: frozen LC peaks here, then declines slightly

    def configs(self, s):
        es, ds = self.QUICK_E if s.quick else self.E, s.main
        yield flags("--dataset", ds)
        for e in es["frozen"]:
            yield flags("--dataset", ds, "--expansion", e, "--frozen")
        for e in es["limit"]:
            yield flags("--dataset", ds, "--lc-limit", e)
        for e in es["init"]:
            yield flags("--dataset", ds, "--lc-init", e)
        for e in es["learnable"]:
            yield flags("--dataset", ds, "--expansion", e)
        for e in es["preconditioned"]:
            yield flags("--dataset", ds, "--expansion", e, "--frozen", "--preconditioned")
        if es["large_kernel"]:
            yield flags("--dataset", ds, "--kernel-size", LARGE_KERNEL)
        for i in INIT_STUDY:
            for e in es["large_kernel"]:
                yield frozen_large_kernel(ds, e, i)
                yield flags("--dataset", ds, "--kernel-size", LARGE_KERNEL, "--lc-limit", e, "--init", i)

    def trend(self, runs):
        """Accuracy from E = PEAK to the largest E past it (runs: {E: runs}): declines, holds or rises."""
        past = [e for e in runs if e > self.PEAK and runs[e]]
        if not runs.get(self.PEAK) or not past:
            return "— (not in the sweep)"
        at_peak, last = runs[self.PEAK], runs[past[-1]]
        change = mean(last) - mean(at_peak)
        word = "holds" if abs(change) <= tolerance(at_peak, last) else "declines" if change < 0 else "rises"
        return f"{word} ({mean(at_peak):.2f} at E = {self.PEAK}, {mean(last):.2f} at E = {past[-1]})"

    def section(self, results, ds, folder):
        rs = family(results, ds, default_config("resnet"), "expansion", "frozen", "preconditioned", "lc_limit", "lc_init")
        if not any(r["lc_limit"] for r in rs):
            return ""
        es = sorted({r["expansion"] or r["lc_limit"] or r["lc_init"] for r in rs} - {0, None})
        baseline = select(rs)
        frozen = {e: select(rs, expansion=e, frozen=True) for e in es}
        preconditioned = {e: select(rs, expansion=e, frozen=True, preconditioned=True) for e in es}
        limit = {e: select(rs, lc_limit=e) for e in es}
        init = {e: select(rs, lc_init=e) for e in es}
        learnable = {e: select(rs, expansion=e) for e in es}
        acc = [["baseline", "—", "—", "—", "—", cell(baseline), "—", "—", cell(baseline, "fgsm_acc")]]
        acc += [[e] + [cell(k[e]) for k in (frozen, preconditioned, limit, init, learnable)]
                + [cell(k[e], "fgsm_acc") for k in (frozen, limit, learnable)] for e in es]
        fve = [["baseline", "—", "—", cell(baseline, "fve_first"), "—", "—", cell(baseline, "fve_last")]]
        fve += [[e] + [cell(k[e], key) for key in ("fve_first", "fve_last") for k in (frozen, limit, learnable)]
                for e in es]
        basis = [[e] + self.basis_cells(frozen[e] + preconditioned[e]) for e in es if frozen[e] + preconditioned[e]]

        # ours: where the limit tracks frozen LC, whether the preconditioned form matches the
        # folded one (the identity at scale), whether both decline past the peak like Fig. 4
        frozen_either_form = {e: frozen[e] or preconditioned[e] for e in es}  # past 512 only preconditioned runs
        both = [e for e in es if frozen_either_form[e] and limit[e]]
        tracks = [e for e in both if agree(frozen_either_form[e], limit[e])]
        pairs = [e for e in es if frozen[e] and preconditioned[e]]
        matches = [e for e in pairs if agree(frozen[e], preconditioned[e])]
        twins = [e for e in es if limit[e] and init[e]]
        same = [e for e in twins if agree(limit[e], init[e])]
        equal = within(*(k[e] for k in (frozen, preconditioned, limit) for e in es if k[e]))
        ours = (f"Ours, counting means {equal} as equal: the limit tracks frozen LC (folded, or preconditioned "
                f"where only that ran) at E = {listed(tracks)}; "
                f"not at E = {listed([e for e in both if e not in tracks])}. "
                f"The preconditioned form matches folded frozen LC at E = {listed(matches)}; "
                f"differs at E = {listed([e for e in pairs if e not in matches])}. "
                f"The init form matches the limit at E = {listed(same)}; differs at "
                f"E = {listed([e for e in twins if e not in same])}. "
                f"Past E = {self.PEAK}, frozen LC {self.trend(frozen_either_form)}; the limit {self.trend(limit)}.")
        image = plot(folder, f"mechanism_{ds}", "LC expansion E", "test accuracy %", {
            "frozen LC": [(e, mean(frozen[e])) for e in es],
            "preconditioned": [(e, mean(preconditioned[e])) for e in es],
            "limit (--lc-limit E)": [(e, mean(limit[e])) for e in es],
            "init (--lc-init E)": [(e, mean(init[e])) for e in es],
            "learnable LC": [(e, mean(learnable[e])) for e in es], "baseline": [(e, mean(baseline)) for e in es]})
        return (f"## Why it works: frozen LC xE vs its large-E limit on {ds}\n\n"
                "A frozen LC-Block trains exactly as one conv whose gradient is multiplied by P = SᵀS (S: its "
                "frozen filters, m = E·c_out rows of d = c_in·k²); *preconditioned* runs it in that form. For "
                "m ≫ d, P → α·I with α = E·c_out/(3·c_in·k²): a plain conv with learning rate α·lr, the *limit* "
                "(`--lc-limit E`); under BatchNorm that is exactly the plain ResNet started at the limit's "
                "filters / √α, the *init* form (`--lc-init E`). Test accuracy % and FGSM accuracy:\n\n"
                + table(["E", "frozen LC", "preconditioned", "limit", "init", "learnable LC", "FGSM frozen",
                         "FGSM limit", "FGSM learnable"], acc)
                + "\n" + table(["E", "FVE first, frozen", "limit", "learnable", "FVE last, frozen", "limit",
                                "learnable"], fve)
                + "\nThe random basis of each frozen LC run (lcconv.basis_summary, over its spatial layers): "
                  "the share of the filter space its m filters span (rank/d), P's mean eigenvalue α (the "
                  "learning-rate factor), and the spread of P's nonzero eigenvalues (largest/smallest) against "
                  "the Marchenko-Pastur value for i.i.d. filters:\n\n"
                + table(["E", "rank/d, smallest", "α, smallest–largest", "spread, largest", "Marchenko-Pastur"], basis)
                + "\nExpected: the limit tracks frozen LC at large E and not at small E, where m < d "
                  "(below E = 9 in the 3×3 convs of equal width) and the filters span only a subspace; the "
                  "preconditioned runs match the frozen ones; the init form matches the limit up to BatchNorm's eps "
                  "and float32 rounding; if the decline past E = 128 in Fig. 4 is the growing effective learning "
                  "rate, the limit declines too.\n\n" + ours + "\n" + image
                + self.large_kernel_section(results, ds))

    @staticmethod
    def basis_cells(rs):
        """One run's random basis, over its layers: smallest rank share, α range, largest spread."""
        layers = next((r["basis"] for r in rs if r.get("basis")), None)
        if not layers:
            return ["—"] * 4
        alphas = [layer["alpha"] for layer in layers]
        return [f"{min(layer['rank'] for layer in layers):.2f}", f"{min(alphas):.2f}–{max(alphas):.2f}",
                f"{max(layer['spread'] for layer in layers):.3g}", f"{max(layer['spread_mp'] for layer in layers):.3g}"]

    def large_kernel_section(self, results, ds):
        base = dict(default_config("resnet"), kernel_size=LARGE_KERNEL)
        rs = family(results, ds, base, "expansion", "frozen", "init", "lc_limit")
        es = sizes(rs, "lc_limit")
        if not es:
            return ""
        rows = [[e] + [cell(select(rs, kernel_size=LARGE_KERNEL, init=i, **kind)) for i in INIT_STUDY
                       for kind in (dict(expansion=e, frozen=True), dict(lc_limit=e))] for e in es]
        return (f"\n### k = {LARGE_KERNEL}: frozen LC vs its limit, default and centre-weighted init\n\n"
                f"Learned filters (no LC): {cell(select(rs, kernel_size=LARGE_KERNEL))}.\n\n"
                + table(["E"] + [f"{kind}, {i}" for i in INIT_STUDY for kind in ("frozen LC", "limit")], rows)
                + "\nDoes the limit reproduce the large-kernel gap, and does it predict what the centre init does "
                  "(for `center`, E[P] is α·diag(g²): a higher learning rate at the kernel centre)?\n")


def steps(r):
    """SGD steps of a run, and its schedule: (steps, epochs, training images)."""
    images = r["train_subset"] or train.DATASETS[r["dataset"]]["train_images"]
    return r["epochs"] * math.ceil(images / r["batch_size"]), r["epochs"], images


def gained(rs, baseline):
    """A cell with the gain over the baseline: "82.13 (1) +4.93"."""
    return f"{cell(rs)} {mean(rs) - mean(baseline):+.2f}" if rs and baseline else cell(rs)


class Length(Group):
    """Is the mechanism the paper's at the paper's length? Under BatchNorm the large-E limit of
    frozen LC xE is exactly a smaller init of the plain ResNet (--lc-init E), which in a BN network
    is a larger effective learning rate early on. Either training forgets it and the gain fades
    with length, or the early phase picks a solution that the long run keeps."""
    name, figure = "length", "why it works over time (beyond the paper): E = 4, 128, 2048 at 5, 15 and EPOCHS epochs"
    E, QUICK_E = (4, 128, 2048), (128,)
    SHORT_EPOCHS = (5, 15)  # beside EPOCHS (75), the paper's
    spans_settings = True  # its report compares runs of several schedules

    def configs(self, s):
        # [] is the settings' own schedule: QUICK's 100 steps, beside 5 epochs on all 60,000
        # images (1,175 steps); else 5 and 15 epochs beside EPOCHS
        schedules = [[], flags("--epochs", 5)] if s.quick else [flags("--epochs", e) for e in self.SHORT_EPOCHS] + [[]]
        for schedule in schedules:
            yield flags("--dataset", s.main, *schedule)
            for e in self.QUICK_E if s.quick else self.E:
                preconditioned = ["--preconditioned"] if s.quick or e > Mechanism.PEAK else []
                yield flags("--dataset", s.main, "--expansion", e, "--frozen", *preconditioned, *schedule)
                yield flags("--dataset", s.main, "--lc-init", e, *schedule)
                if not s.quick:
                    yield flags("--dataset", s.main, "--lc-limit", e, *schedule)
                    yield flags("--dataset", s.main, "--expansion", e, *schedule)

    def section(self, results, ds, folder):
        rs = family(results, ds, default_config("resnet"), "expansion", "frozen", "preconditioned", "lc_limit", "lc_init", *SETTING)
        schedules = {}
        for r in rs:
            schedules.setdefault(steps(r), []).append(r)
        es = sorted({r["lc_init"] for r in rs} - {None})
        if len(schedules) < 2 or not es:
            return ""
        rows, at_peak = [], {}
        for (n, epochs, images), runs in sorted(schedules.items()):
            baseline = select(runs)
            for e in es:
                kinds = [select(runs, expansion=e, frozen=True) or select(runs, expansion=e, frozen=True,
                                                                          preconditioned=True),
                         select(runs, lc_limit=e), select(runs, lc_init=e), select(runs, expansion=e)]
                rows.append([f"{epochs} epochs, {images:,} images", f"{n:,}", e, cell(baseline)]
                            + [gained(k, baseline) for k in kinds])
                if e == Mechanism.PEAK and baseline and kinds[0]:
                    at_peak[n] = (baseline, kinds[0], kinds[2])
        ours = "Ours: — (no two schedules with frozen LC and the baseline at E = 128)."
        if len(at_peak) >= 2:
            (short, (b0, f0, i0)), (long, (b1, f1, i1)) = min(at_peak.items()), max(at_peak.items())
            gain0, gain1 = mean(f0) - mean(b0), mean(f1) - mean(b1)
            change, tol = gain1 - gain0, tolerance(b0, f0, b1, f1)
            word = "holds" if abs(change) <= tol else "shrinks" if change < 0 else "grows"
            tracks = [f"{n:,}" for n, (_, f, i) in sorted(at_peak.items()) if i and agree(f, i)]
            apart = [f"{n:,}" for n, (_, f, i) in sorted(at_peak.items()) if i and not agree(f, i)]
            ours = (f"Ours, counting differences {within(b0, f0, b1, f1)} as equal: at E = {Mechanism.PEAK} frozen "
                    f"LC gains {gain0:+.2f} points over the baseline after {short:,} SGD steps and {gain1:+.2f} after "
                    f"{long:,}: the gain {word} with length. `--lc-init` tracks frozen LC after {listed(tracks)} "
                    f"steps" + (f"; not after {listed(apart)}." if apart else "."))
        return (f"## Why it works, over time: frozen LC xE vs the init it reduces to, on {ds}\n\n"
                "Test accuracy % and the gain over the baseline of the same schedule. Frozen LC runs folded or, "
                "past E = 128 (and in QUICK), preconditioned; *limit* is `--lc-limit E`, *init* `--lc-init E` (the "
                "plain ResNet started at the limit's filters / √α, the same training under BatchNorm).\n\n"
                + table(["schedule", "SGD steps", "E", "baseline", "frozen LC", "limit", "init", "learnable LC"], rows)
                + "\nOpen: does the gain fade as training forgets the init, or does the early phase pick a solution "
                  "the long run keeps?\n\n" + ours + "\n")


GROUPS = {g.name: g for g in [
    Table1(), Expansion(),
    Scaling("width", (16, 32, 64, 128, 256), "Fig. 6a: width",
            "frozen catches up as W grows, break-even near W = 128"),
    Scaling("depth", (20, 32, 56, 110, 164, 260), "Fig. 6b: depth",
            "frozen catches up as D grows, break-even near D = 260"),
    Kernel(), Ablation(), OffTheShelf(), ConvMixer(), Init(), Mechanism(), Length()]}
QUICK_GROUPS = ("table1", "expansion", "mechanism")


# -----------------------------------------------------------------------------
# From configs to runs: each config on the chosen datasets, once per seed, with its paths


@dataclass
class Run:
    group: str
    argv: list  # train.py's arguments
    checkpoint: str
    log: str

    def command(self, python):
        return shlex.join([python, "train.py", *self.argv])


def runs_of(group, s):
    runs = []
    for config in group.configs(s):
        if config[config.index("--dataset") + 1] not in s.datasets:
            continue
        text = " ".join(config)
        # the settings' schedule, unless the config brings its own (--epochs and all images)
        epochs = [] if "--epochs" in config else flags("--epochs", s.epochs)
        subset = flags("--train-subset", s.train_subset) if epochs and s.train_subset else []
        for seed in s.seeds:
            # names as the bash version made them: flags without dashes, and 8 hex digits of the
            # md5 of the recipe's text (`md5sum <<<"..."` hashed a trailing newline too)
            hashed = f"{' '.join([text, '--seed', seed, *epochs])} {' '.join(subset + [s.train_args]).strip()}\n"
            digest = hashlib.md5(hashed.encode()).hexdigest()[:8]
            name = f"{text.replace('--', '').replace(' ', '_')}_seed_{seed}-{digest}"
            checkpoint = f"{s.results}/checkpoints/{name}.pt"
            argv = [*config, "--seed", seed, *epochs, *subset, "--data-dir", s.data_dir,
                    "--out", f"{s.results}/results.jsonl", "--checkpoint", checkpoint,
                    "--save-figures", f"{s.results}/figures/{name}", "--skip-finished", *shlex.split(s.train_args)]
            runs.append(Run(group.name, argv, checkpoint, f"{s.results}/logs/{name}.log"))
    return runs


def unfinished(runs, s):
    """The runs without a result yet, with their parsed arguments. This is the sweep's one skip
    check; train.py's --skip-finished asks the same question (train.has_result) again only for
    a command run by hand or a second sweep on the same RESULTS."""
    results = train.read_results(Path(s.results) / "results.jsonl")
    todo = []
    for run in runs:
        args = train.parse_args(run.argv)  # a bad SEEDS, EPOCHS or TRAIN_ARGS: one line, exit 2
        if not train.has_result(results, train.recipe(args)):
            todo.append((run, args))
    return todo


# -----------------------------------------------------------------------------
# The plan: runs and estimated GPU-hours per group

REFERENCE_SECONDS = 90  # one 75-epoch ResNet-20-16 run on CIFAR-10 on one H100 (the project's speed goal)


def step_flops(args, cache={}):
    """FLOPs of one training step at the run's batch size: 3× the forward (backward ≈ 2×
    forward; torch's counter overcounts grouped-conv backward), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    key = json.dumps({k: v for k, v in train.recipe(args).items() if k != "seed"})
    if key not in cache:
        spec = train.DATASETS[args.dataset]
        with torch.device("meta"):
            net = train.build_net(args)
            x = torch.empty(args.batch_size, spec["channels"], 32, 32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x)
        cache[key] = 3 * counter.get_total_flops()
    return cache[key]


def run_flops(args):
    """Training plus evaluation (test, FGSM, train accuracy) FLOPs of one run."""
    data = train.DATASETS[args.dataset]
    n_train = min(data["train_images"], args.train_subset or math.inf)
    per_image = step_flops(args) / args.batch_size
    evaluation = (n_train + 5 * data["test_images"] + 3 * args.pgd_steps * data["test_images"]) / 3
    return per_image * (n_train * args.epochs + evaluation)


def print_plan(runs, todo):
    seconds_per_flop = REFERENCE_SECONDS / run_flops(train.parse_args(["--dataset", "cifar10"]))
    print("| group | runs | to run | est. GPU-hours to run |\n|---|---|---|---|")
    total = [0, 0, 0.0]
    for group in dict.fromkeys(run.group for run in runs):
        n = sum(run.group == group for run in runs)
        group_todo = [args for run, args in todo if run.group == group]
        hours = sum(run_flops(args) for args in group_todo) * seconds_per_flop / 3600
        print(f"| {group} | {n} | {len(group_todo)} | {hours:.1f} |")
        total = [total[0] + n, total[1] + len(group_todo), total[2] + hours]
    print(f"| all | {total[0]} | {total[1]} | {total[2]:.1f} |\n")
    print(f"GPU-hours are estimates: FLOPs relative to a 75-epoch ResNet-20-16 run taken as "
          f"{REFERENCE_SECONDS} s on one H100.")


# -----------------------------------------------------------------------------
# Running: one run per GPU of GPUS at a time (one at a time without GPUS)


def fetch(datasets, data_dir):
    """Load each dataset once, before parallel runs would download it side by side."""
    for name in datasets:
        try:
            train.load_data(train.parse_args(["--dataset", name, "--data-dir", data_dir]), "cpu")
        except RuntimeError as e:
            print(f"experiments.sh: {e}; its runs will fail", file=sys.stderr)


def run_all(runs, s):
    """-> how many of the runs failed; a failure is reported and the others go on."""
    free = list(s.gpus) or [None]  # a GPU id per slot; one slot without GPUS
    running = {}  # process -> (run, its GPU)
    failed = 0
    for n, run in enumerate(runs, 1):
        if not free:
            failed += finish_one(running, free)
        gpu = free.pop(0)
        print(f"[{n}/{len(runs)}] " + (f"GPU {gpu}: " if gpu is not None else "") + run.command(s.python))
        env = s.env if gpu is None else dict(s.env, CUDA_VISIBLE_DEVICES=gpu)
        Path(run.log).parent.mkdir(parents=True, exist_ok=True)
        # append: a rerun after a failure (or a second sweep waiting on this run) adds to the log
        with open(run.log, "a") as log:
            process = subprocess.Popen([s.python, "train.py", *run.argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        running[process] = (run, gpu)
    while running:
        failed += finish_one(running, free)
    return failed


def finish_one(running, free):
    """Wait for any one run to end, report it and free its GPU; -> 1 if it failed, else 0."""
    while not (ended := [p for p in running if p.poll() is not None]):
        time.sleep(0.2)
    process = ended[0]
    run, gpu = running.pop(process)
    free.append(gpu)
    lines = Path(run.log).read_text(errors="replace").splitlines() or [""]
    if process.returncode == 0:  # its result is in results.jsonl (from this run or, on a shared RESULTS, another)
        print(f"  done: {lines[-1]}")
        Path(run.checkpoint).unlink(missing_ok=True)  # the run is finished; checkpoints of large E are large
        return 0
    print(f"  FAILED (exit {process.returncode}): {lines[-1]}  [{run.log}]")
    return 1


def check_gpus(gpus):
    count = torch.cuda.device_count()
    missing = [g for g in gpus if not (g.isdigit() and int(g) < count)]
    if missing:
        die(f"GPUS=\"{' '.join(gpus)}\": no GPU {' '.join(missing)} here (torch sees {count} GPU(s))")


def check_results_folder(results):
    problem = train.unwritable(Path(results), "directory")  # creates nothing
    if problem:
        die(f"RESULTS={results}: {problem}; give a folder")


# -----------------------------------------------------------------------------
# The report: ours beside the paper's, for each training setting in the results


def write_report(folder):
    runs, skipped = load_results(folder)
    settings = {}
    for r in runs:
        settings.setdefault(tuple(r[k] for k in SETTING), []).append(r)
    shown = 10  # the lines not used that the report names
    unused = (f" {len(skipped)} line(s) not used: " + "; ".join(skipped[:shown])
              + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "") + ".") if skipped else ""
    parts = [f"# lcconv: our results beside the paper's\n\nEach cell: mean ± std over seeds (number of "
             f"seeds). {len(runs)} finished runs in results.jsonl.{unused} Paper: Gavrikov & Keuper, "
             f"arXiv:2301.11360.\n"]
    for setting, rs in settings.items():
        sections = [group.report(rs, folder) for group in GROUPS.values() if not group.spans_settings]
        if not any(sections):  # runs no table shows (of another --width, say): no empty heading
            continue
        s = dict(zip(SETTING, setting))
        # the rest of the setting where it is not the paper's, so that no two parts have one heading
        rest = "".join(f", {k.replace('_', ' ')} {s[k]}" for k in ("momentum", "label_smoothing", "fgsm_eps",
                       "pgd_steps") if s[k] != train.PARSER.get_default(k))
        parts.append(f"# Runs of {s['epochs']} epoch(s) on " + (f"the first {s['train_subset']} training images"
                     if s["train_subset"] else "the full training set")
                     + f", batch {s['batch_size']}, lr {s['lr']}, weight decay {s['weight_decay']}{rest}\n")
        parts += sections
    parts += [group.report(runs, folder) for group in GROUPS.values() if group.spans_settings]
    with atomic_file(Path(folder, "REPORT.md")) as f:
        f.write("\n".join(p for p in parts if p).encode())
    print(f"wrote {folder}/REPORT.md" + (f" ({len(skipped)} line(s) of results.jsonl not used, named there)"
                                         if skipped else ""))


# -----------------------------------------------------------------------------
# Main


def usage():
    groups = "\n".join(f"  {name:<12}{group.figure}" for name, group in GROUPS.items())
    return f"{__doc__}\nGroups (QUICK=1 runs {' '.join(QUICK_GROUPS)} by default):\n{groups}\n"


def main(argv, env):
    """-> the exit status."""
    list_only = report_only = False
    names = []
    for arg in argv:
        if arg == "--list":
            list_only = True
        elif arg == "report":
            report_only = True
        elif arg in ("-h", "--help"):
            print(usage(), end="")
            return 0
        elif arg in GROUPS:
            names.append(arg)
        else:
            die(f"unknown group '{arg}'; groups: {' '.join(GROUPS)}, report, --list")
    if MISSING:
        die(f"{sys.executable} has no module '{MISSING}': pip install -r requirements.txt for it, or set PYTHON "
            f"to a Python that has them")
    s = read_settings(env)
    groups = [GROUPS[n] for n in names or (QUICK_GROUPS if s.quick else GROUPS)]
    if list_only:
        for group in groups:
            for run in runs_of(group, s):
                print(run.command(s.python))
        return 0
    if report_only:
        check_results_folder(s.results)
        write_report(s.results)
        return 0
    check_gpus(s.gpus)
    check_results_folder(s.results)
    runs = [run for group in groups for run in runs_of(group, s)]
    todo = unfinished(runs, s)
    if not s.quick:
        print_plan(runs, todo)
        if not torch.cuda.is_available():
            print("WARNING: no GPU found; the full recipe takes days on a CPU (QUICK=1 scales it down)",
                  file=sys.stderr)
    fetch(dict.fromkeys(args.dataset for _, args in todo), s.data_dir)
    failed, report_failed = 0, False
    for group in groups:
        print(f"== {group.name}")
        # again per group: a config that an earlier group shares has its result by now
        failed += run_all([run for run, _ in unfinished(runs_of(group, s), s)], s)
        try:
            write_report(s.results)
        except Exception as e:  # a bug in the report must not stop the later groups' runs; it is said, not hidden
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"experiments.sh: the report failed ({type(e).__name__}: {e}, in {where.name} at "
                  f"{Path(where.filename).name}:{where.lineno}); the sweep goes on", file=sys.stderr)
            report_failed = True
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
