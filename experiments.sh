#!/usr/bin/env bash
# Reproduce the CIFAR-scale results of Gavrikov & Keuper, "The Power of Linear Combinations:
# Learning with Random Convolutions" (arXiv:2301.11360), and compare them with the paper's
# numbers in $RESULTS/REPORT.md.
#
#   bash experiments.sh                     every group below, then the report
#   bash experiments.sh kernel ablation     only these groups
#   bash experiments.sh --list [GROUP...]   print every train.py command, one per line; run nothing
#   bash experiments.sh report              write $RESULTS/REPORT.md from the finished runs
#   QUICK=1 bash experiments.sh             Table 1 and Fig. 4 scaled down to Fashion-MNIST on a
#                                           2-core CPU (a 10k-image subset, 5 epochs, one seed)
#
# Settings, from the environment (paper's defaults):
#   SEEDS="0 1 2 3"   EPOCHS=75   DATASETS="cifar10 cifar100 svhn fashionmnist" (groups keep only
#   runs on these)   DATA_DIR=./data   RESULTS=results   TRAIN_ARGS="" (added to every run and
#   overriding it, e.g. "--train-subset 5000")   GPUS="" (e.g. "0 1 2 3": one run per GPU at a time)
#
# A run whose config already has a line in $RESULTS/results.jsonl is skipped; an interrupted run
# resumes from its checkpoint in $RESULTS/checkpoints. A failed run is reported and the others
# go on; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")"

ALL_GROUPS="table1 expansion width depth kernel ablation offtheshelf convmixer init"
expansions="1 2 4 8 16 32 64 128 256 512"  # Fig. 4
lc_expansions="1 2 4 8 16 32 64 128"        # Fig. 8, the init study
main=cifar10                                # the dataset of the one-dataset figures
groups_default=$ALL_GROUPS
if [ "${QUICK:-0}" = 1 ]; then
  SEEDS=${SEEDS:-0} EPOCHS=${EPOCHS:-5} DATASETS=${DATASETS:-fashionmnist}
  RESULTS=${RESULTS:-results-quick} TRAIN_ARGS=${TRAIN_ARGS:---train-subset 10000}
  expansions="1 4 16 64 128" main=fashionmnist groups_default="table1 expansion"
fi
SEEDS=${SEEDS:-0 1 2 3}
EPOCHS=${EPOCHS:-75}
DATASETS=${DATASETS:-cifar10 cifar100 svhn fashionmnist}
DATA_DIR=${DATA_DIR:-./data}
RESULTS=${RESULTS:-results}
TRAIN_ARGS=${TRAIN_ARGS:-}
GPUS=${GPUS:-}
PYTHON=${PYTHON:-python}

die() { echo "experiments.sh: $*" >&2; exit 2; }

# -----------------------------------------------------------------------------
# The groups: each prints one train.py config per line (seeds are added later). A config in
# several groups (the baseline, say) runs once.

table1() {  # Table 1: baseline vs LC x128 learnable vs frozen, four datasets
  for ds in cifar10 cifar100 svhn fashionmnist; do
    echo "--dataset $ds"
    echo "--dataset $ds --expansion 128"
    echo "--dataset $ds --expansion 128 --frozen"
  done
}

expansion() {  # Fig. 4 (accuracy, params, FGSM) and Fig. 5 (FVE): E = 1 ... 512
  echo "--dataset $main"
  for e in $expansions; do
    echo "--dataset $main --expansion $e"
    echo "--dataset $main --expansion $e --frozen"
  done
}

width() {  # Fig. 6a: E = 1, W = 16 ... 256
  for w in 16 32 64 128 256; do
    echo "--dataset $main --expansion 1 --width $w"
    echo "--dataset $main --expansion 1 --width $w --frozen"
  done
}

depth() {  # Fig. 6b: E = 1, D = 20 ... 260
  for d in 20 32 56 110 164 260; do
    echo "--dataset $main --expansion 1 --depth $d"
    echo "--dataset $main --expansion 1 --depth $d --frozen"
  done
}

kernel() {  # Fig. 7-9: k = 3 ... 9, learned filters vs LCs of frozen random ones
  for k in 3 5 7 9; do
    echo "--dataset $main --kernel-size $k"
    for e in $lc_expansions; do
      echo "--dataset $main --kernel-size $k --expansion $e"
      echo "--dataset $main --kernel-size $k --expansion $e --frozen"
    done
  done
}

ablation() {  # Table 3: an op between the LC-Block's two convs, E = 64
  for op in none relu bn bn_relu; do
    echo "--dataset $main --expansion 64 --intermediate $op"
    echo "--dataset $main --expansion 64 --intermediate $op --frozen"
  done
}

offtheshelf() {  # Fig. 1: do nets with 1x1 convs after their spatial convs tolerate random filters?
  for model in resnet convmixer resnet18 resnet50 mobilenet_v2; do
    echo "--dataset $main --model $model"
    echo "--dataset $main --model $model --frozen"
  done
}

convmixer() {  # beyond the paper: the large-kernel gap in ConvMixer-256/8
  for k in 3 5 7 9; do
    echo "--dataset $main --model convmixer --kernel-size $k"
    echo "--dataset $main --model convmixer --kernel-size $k --frozen"
    for e in 1 8 64; do
      echo "--dataset $main --model convmixer --kernel-size $k --expansion $e --frozen"
    done
  done
}

init() {  # beyond the paper, its open question: does a centre-weighted init close the k = 9 gap?
  echo "--dataset $main --kernel-size 9"
  echo "--dataset $main --model convmixer --kernel-size 9"
  for i in kaiming_uniform center; do
    for e in $lc_expansions; do
      echo "--dataset $main --kernel-size 9 --expansion $e --frozen --init $i"
    done
    echo "--dataset $main --model convmixer --kernel-size 9 --frozen --init $i"
    for e in 1 8 64; do
      echo "--dataset $main --model convmixer --kernel-size 9 --expansion $e --frozen --init $i"
    done
  done
}

# -----------------------------------------------------------------------------
# From configs to commands: "GROUP<TAB>python train.py ..." per run; every run saves its
# combined filters and spatial variance as PNGs (two small files)

commands() {
  local group config seed ds name id
  for group in "$@"; do
    "$group" | while read -r config; do
      ds=$(sed -E 's/.*--dataset ([a-z0-9]+).*/\1/' <<<"$config")
      [[ " $DATASETS " == *" $ds "* ]] || continue
      for seed in $SEEDS; do
        name=$(sed 's/--//g; s/ /_/g' <<<"$config seed $seed")
        id=$(md5sum <<<"$config --seed $seed --epochs $EPOCHS $TRAIN_ARGS" | cut -c1-8)
        printf '%s\t%s train.py %s --seed %s --epochs %s --data-dir %s --out %s/results.jsonl' \
          "$group" "$PYTHON" "$config" "$seed" "$EPOCHS" "$DATA_DIR" "$RESULTS"
        printf ' --checkpoint %s/checkpoints/%s-%s.pt --save-figures %s/figures/%s-%s --skip-finished' \
          "$RESULTS" "$name" "$id" "$RESULTS" "$name" "$id"
        printf '%s\n' "${TRAIN_ARGS:+ $TRAIN_ARGS}"
      done
    done
  done
}

# -----------------------------------------------------------------------------
# Running: one run per GPU at a time (or one at a time without GPUS)

failures=0
declare -A slot_of=() cmd_of=()

log_of() {  # the run's log: named like its checkpoint
  local checkpoint=${1##*--checkpoint }
  checkpoint=${checkpoint%% *}
  echo "$RESULTS/logs/$(basename "$checkpoint" .pt).log"
}

finish() {  # wait for any one run to end and report it
  local pid status
  while :; do
    wait -n -p pid
    status=$?
    [ -n "${cmd_of[$pid]+set}" ] && break  # one of ours, not some other child
  done
  local cmd=${cmd_of[$pid]}
  if [ "$status" = 0 ]; then
    echo "  done: $(tail -n 1 "$(log_of "$cmd")")"
    local checkpoint=${cmd##*--checkpoint }
    rm -f "${checkpoint%% *}"  # the result is in results.jsonl; checkpoints of large E are large
  else
    failures=$((failures + 1))
    echo "  FAILED (exit $status): $(tail -n 1 "$(log_of "$cmd")")  [$(log_of "$cmd")]"
  fi
  free_slots+=("${slot_of[$pid]}")
  unset "slot_of[$pid]" "cmd_of[$pid]"
}

run_all() {  # the commands on stdin; one at a time, or one per GPU of GPUS
  local -a todo
  mapfile -t todo
  mkdir -p "$RESULTS/logs"
  read -r -a free_slots <<<"${GPUS:-default}"
  local n=0 slot
  for cmd in "${todo[@]}"; do
    [ ${#free_slots[@]} = 0 ] && finish
    slot=${free_slots[0]}
    free_slots=("${free_slots[@]:1}")
    n=$((n + 1))
    echo "[$n/${#todo[@]}] ${GPUS:+GPU $slot: }$cmd"
    if [ -n "$GPUS" ]; then
      CUDA_VISIBLE_DEVICES=$slot bash -c "$cmd" >"$(log_of "$cmd")" 2>&1 &
    else
      bash -c "$cmd" >"$(log_of "$cmd")" 2>&1 &
    fi
    slot_of[$!]=$slot
    cmd_of[$!]=$cmd
  done
  while [ ${#cmd_of[@]} -gt 0 ]; do finish; done
}

# -----------------------------------------------------------------------------
# Python helpers: fetching datasets, which runs are pending, the plan, the report (at the end)

helper() { "$PYTHON" -c "$HELPER" "$@"; }

main() {
  local list=0 report_only=0
  local -a groups=()
  for arg in "$@"; do
    case $arg in
      --list) list=1 ;;
      report) report_only=1 ;;
      -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) [[ " $ALL_GROUPS " == *" $arg "* ]] || die "unknown group '$arg'; groups: $ALL_GROUPS, report, --list"
         groups+=("$arg") ;;
    esac
  done
  [ ${#groups[@]} = 0 ] && read -r -a groups <<<"$groups_default"
  if [ $list = 1 ]; then
    commands "${groups[@]}" | cut -f2-
    return
  fi
  mkdir -p "$RESULTS"
  if [ $report_only = 1 ]; then
    helper report "$RESULTS" && echo "wrote $RESULTS/REPORT.md"
    return
  fi
  if [ "${QUICK:-0}" != 1 ]; then
    commands "${groups[@]}" | helper plan "$RESULTS" || exit 1
    "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
      echo "WARNING: no GPU found; the full recipe takes days on a CPU (QUICK=1 scales it down)" >&2
  fi
  # fetch every dataset once, before parallel runs would download it side by side
  commands "${groups[@]}" | helper fetch "$DATA_DIR"
  for group in "${groups[@]}"; do
    echo "== $group"
    run_all < <(commands "$group" | helper pending "$RESULTS")
    helper report "$RESULTS" && echo "wrote $RESULTS/REPORT.md"
  done
  if [ $failures -gt 0 ]; then
    echo "$failures run(s) failed; rerun the same command to retry them (finished runs are skipped)" >&2
    exit 1
  fi
}

read -r -d '' HELPER <<'PYTHON'
import json, math, shlex, statistics, sys
from pathlib import Path

import torch

import train

mode, results_dir = sys.argv[1], Path(sys.argv[2])  # fetch: the data dir


def load_runs():
    return train.read_results(results_dir / "results.jsonl")


def parse(cmd):  # "python train.py ARGS" -> the run's arguments
    return train.parse_args(shlex.split(cmd)[2:])


def read_commands():  # "GROUP<TAB>COMMAND" lines -> [(group, command, args)]
    return [(group, cmd, parse(cmd)) for group, cmd in (line.rstrip("\n").split("\t") for line in sys.stdin)]


def is_finished(args, runs):
    return train.has_result(runs, train.recipe(args))


# -- plan: runs and estimated GPU-hours per group --------------------------------------------

TRAIN_IMAGES = dict(cifar10=50_000, cifar100=50_000, svhn=73_257, fashionmnist=60_000)
TEST_IMAGES = dict(cifar10=10_000, cifar100=10_000, svhn=26_032, fashionmnist=10_000)
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
    n_train = min(TRAIN_IMAGES[args.dataset], args.train_subset or math.inf)
    per_image = step_flops(args) / args.batch_size
    evaluation = (n_train + 5 * TEST_IMAGES[args.dataset] + 3 * args.pgd_steps * TEST_IMAGES[args.dataset]) / 3
    return per_image * (n_train * args.epochs + evaluation)


def plan():
    commands, runs = read_commands(), load_runs()
    seconds_per_flop = REFERENCE_SECONDS / run_flops(train.parse_args(["--dataset", "cifar10"]))
    print("| group | runs | to run | est. GPU-hours to run |\n|---|---|---|---|")
    total = [0, 0, 0.0]
    for group in dict.fromkeys(g for g, _, _ in commands):
        todo = [a for g, _, a in commands if g == group and not is_finished(a, runs)]
        hours = sum(run_flops(a) for a in todo) * seconds_per_flop / 3600
        n = sum(g == group for g, _, _ in commands)
        print(f"| {group} | {n} | {len(todo)} | {hours:.1f} |")
        total = [total[0] + n, total[1] + len(todo), total[2] + hours]
    print(f"| all | {total[0]} | {total[1]} | {total[2]:.1f} |\n")
    print(f"GPU-hours are estimates: FLOPs relative to a 75-epoch ResNet-20-16 run taken as "
          f"{REFERENCE_SECONDS} s on one H100.")


# -- report: ours beside the paper's ---------------------------------------------------------

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
RESNET = dict(model="resnet", depth=20, width=16, kernel_size=3, expansion=0, frozen=False,
              init="kaiming_uniform", intermediate="none")
CONVMIXER = dict(RESNET, model="convmixer", depth=8, kernel_size=9, dim=256, patch_size=2, width=None)
SETTING = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay", "label_smoothing", "fgsm_eps")


def select(runs, base=RESNET, **kw):
    """The runs with exactly this config (base updated by kw)."""
    want = {**base, **kw}
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]


def family(runs, ds, base, *free):
    """The runs on ds that match base except in the keys free: one figure's runs."""
    return [r for r in runs if r["dataset"] == ds and all(r.get(k) == v for k, v in base.items() if k not in free)]


def mean(rs, key="test_acc"):
    v = [r[key] for r in rs if r.get(key) is not None]
    return statistics.mean(v) if v else math.nan


def cell(rs, key="test_acc"):
    v = [r[key] for r in rs if r.get(key) is not None]
    if len(v) < 2:
        return f"{v[0]:.2f} (1)" if v else "—"
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f} ({len(v)})"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def first(xs, holds):
    return next((x for x in xs if holds(x)), "— (not in the sweep)")


def centre_ratio(rs):
    """Spatial variance at the kernel centre over the mean of its outer ring (Fig. 8b); 1 = uniform."""
    ratios = []
    for r in rs:
        v = torch.tensor(r["spatial_variance"])
        c = len(v) // 2
        ring = torch.cat([v[0], v[-1], v[1:-1, 0], v[1:-1, -1]]) if len(v) > 1 else v.flatten()
        ratios.append((v[c, c] / ring.mean()).item())
    return f"{statistics.mean(ratios):.2f}" if ratios else "—"


def figure_links(rs):
    r = next((r for r in rs if r.get("save_figures")), None)
    if r is None:
        return "—"
    d = Path(r["save_figures"]).resolve().relative_to(results_dir.resolve())
    return f"[filters]({d}/filters.png) · [variance]({d}/spatial_variance.png)"


def sizes(rs, key):
    return sorted({r[key] for r in rs if r[key] is not None})


def section_table1(runs):
    rows = []
    for ds, paper in PAPER_TABLE1.items():
        rs = [select(runs, dataset=ds), select(runs, dataset=ds, expansion=128), select(runs, dataset=ds, expansion=128, frozen=True)]
        if any(rs):
            rows.append([ds, cell(rs[0]), paper[0], cell(rs[1]), paper[1], cell(rs[2]), paper[2]])
    return rows and ("## Table 1: ResNet-20-16 vs ResNet-LC-20-16x128, test accuracy %\n\n" + table(
        ["dataset", "baseline", "paper", "LC learnable", "paper", "LC frozen", "paper"], rows))


def section_expansion(runs, ds):
    rs = family(runs, ds, RESNET, "expansion", "frozen")
    es = [e for e in sizes(rs, "expansion") if e > 0]
    if len(es) < 3:
        return ""
    frozen = {e: select(rs, expansion=e, frozen=True) for e in es}
    learnable = {e: select(rs, expansion=e) for e in [0] + es}
    params = lambda rs: f"{mean(rs, 'params_learnable'):,.0f}" if rs else "—"
    acc = [[e or "baseline", params(frozen.get(e, [])), params(learnable[e]), cell(frozen.get(e, [])),
            cell(learnable[e]), cell(frozen.get(e, []), "fgsm_acc"), cell(learnable[e], "fgsm_acc")] for e in [0] + es]
    fve = [[e or "baseline", cell(frozen.get(e, []), "fve_first"), cell(learnable[e], "fve_first"),
            cell(frozen.get(e, []), "fve_last"), cell(learnable[e], "fve_last")] for e in [0] + es]
    beats = first(es, lambda e: mean(frozen[e]) > mean(learnable[e]))
    beats_base = first(es, lambda e: mean(frozen[e]) > mean(learnable[0]))
    plot(f"fig4_{ds}", "LC expansion E", "test accuracy %", {
        "frozen LC": [(e, mean(frozen[e])) for e in es], "learnable LC": [(e, mean(learnable[e])) for e in es],
        "baseline": [(e, mean(learnable[0])) for e in es]})
    return (f"## Fig. 4 and 5: ResNet-LC-20-16xE on {ds}\n\n"
            + table(["E", "learnable params, frozen", "learnable params, learnable", "frozen acc", "learnable acc",
                     "frozen FGSM", "learnable FGSM"], acc)
            + "\n" + table(["E", "FVE first, frozen", "FVE first, learnable", "FVE last, frozen", "FVE last, learnable"], fve)
            + "\nPaper: frozen LC beats learnable LC from E = 8 and the baseline at E = 128, then declines "
              "slightly; its FGSM accuracy rises with E above both; its FVE stays higher. "
              f"Ours: frozen beats learnable from E = {beats}, the baseline from E = {beats_base}.\n" + image(f"fig4_{ds}"))


def section_sweep(runs, ds, key, title, paper):
    rs = family(runs, ds, dict(RESNET, expansion=1), key, "frozen")
    xs = sizes(rs, key)
    if len(xs) < 2:
        return ""
    pairs = {x: (select(rs, expansion=1, frozen=True, **{key: x}), select(rs, expansion=1, **{key: x})) for x in xs}
    even = first(xs, lambda x: mean(pairs[x][0]) >= mean(pairs[x][1]))
    return (f"## {title} on {ds}, E = 1\n\n" + table([key, "frozen", "learnable"], [[x, *map(cell, p)] for x, p in pairs.items()])
            + f"\nPaper: {paper}. Ours: frozen reaches learnable at {key} = {even}.\n")


def section_kernel(runs, ds):
    rs = family(runs, ds, RESNET, "kernel_size", "expansion", "frozen")
    ks = sizes(rs, "kernel_size")
    es = [e for e in sizes(rs, "expansion") if e > 0 and all(select(rs, kernel_size=k, expansion=e) for k in ks)]
    if len(ks) < 2 or not es:
        return ""
    acc = lambda k, e, frozen=False: mean(select(rs, kernel_size=k, expansion=e, frozen=frozen))
    rows = [[k, cell(select(rs, kernel_size=k))] + [f"{acc(k, e, True):.2f} / {acc(k, e):.2f}".replace("nan", "—")
                                                    for e in es] for k in ks]
    plot(f"fig8a_{ds}", "LC expansion E", "learnable − frozen, accuracy %",
         {f"k = {k}": [(e, acc(k, e) - acc(k, e, True)) for e in es] for k in ks})
    heat = []
    for k in ks:
        for label, config in [("learned, no LC", dict()), (f"LC x{es[-1]} learnable", dict(expansion=es[-1])),
                              ("LC x1 frozen", dict(expansion=1, frozen=True)),
                              (f"LC x{es[-1]} frozen", dict(expansion=es[-1], frozen=True))]:
            chosen = select(rs, kernel_size=k, **config)
            if chosen:
                heat.append([k, label, centre_ratio(chosen), figure_links(chosen)])
    return (f"## Fig. 7-9: kernel size on {ds}; test accuracy %, frozen / learnable per E\n\n"
            + table(["k", "baseline"] + [f"E = {e}" for e in es], rows)
            + "\nPaper: the frozen-vs-learnable gap grows with k and shrinks with E.\n" + image(f"fig8a_{ds}")
            + "\nSpatial variance of the combined filters (Fig. 8b), centre over outer ring (1 = uniform). "
              "Paper: learned large kernels concentrate variance in the centre; LCs of i.i.d. random filters "
              "stay uniform.\n\n" + table(["k", "filters", "centre / ring", "figures"], heat))


def section_ablation(runs, ds):
    rs = family(runs, ds, dict(RESNET, expansion=64), "intermediate", "frozen")
    if all(r["intermediate"] == "none" for r in rs):
        return ""
    paper = PAPER_TABLE3 if ds == "cifar10" else {op: ("—", "—") for op in PAPER_TABLE3}
    rows = [[op, cell(select(rs, expansion=64, frozen=True, intermediate=op)), paper[op][0],
             cell(select(rs, expansion=64, intermediate=op)), paper[op][1]] for op in PAPER_TABLE3]
    return (f"## Table 3: ResNet-LC-20-16x64 on {ds}, an op between the two convs\n\n"
            + table(["intermediate", "frozen", "paper", "learnable", "paper"], rows))


def section_offtheshelf(runs, ds):
    rows = []
    for model in ("resnet", "convmixer", "resnet18", "resnet50", "mobilenet_v2"):
        base = {"resnet": RESNET, "convmixer": CONVMIXER}.get(model, dict(model=model, expansion=0))
        learnable, frozen = select(runs, base, dataset=ds), select(runs, base, dataset=ds, frozen=True)
        if learnable or frozen:
            rows.append([model, cell(learnable), cell(frozen), f"{mean(learnable) - mean(frozen):.2f}"])
    if len(rows) < 2:
        return ""
    return (f"## Fig. 1: off-the-shelf models on {ds}, learnable vs frozen random spatial convs\n\n"
            + table(["model", "learnable", "frozen", "drop"], rows)
            + "\nPaper: nets whose spatial convs are followed by 1×1 convs (ResNet-50, MobileNet v2) lose "
              "1.6–1.9 points; Basic-Block nets (ResNet-18, CIFAR ResNet-20) lose at least 16.\n")


def section_convmixer(runs, ds):
    rs = family(runs, ds, CONVMIXER, "kernel_size", "expansion", "frozen")
    ks, es = sizes(rs, "kernel_size"), [e for e in sizes(rs, "expansion") if e > 0]
    if len(ks) < 2:
        return ""
    rows = [[k, cell(select(rs, CONVMIXER, kernel_size=k)), cell(select(rs, CONVMIXER, kernel_size=k, frozen=True))]
            + [cell(select(rs, CONVMIXER, kernel_size=k, expansion=e, frozen=True)) for e in es] for k in ks]
    return (f"## Beyond the paper: ConvMixer-256/8 on {ds}, kernel size\n\n"
            + table(["k", "learnable", "frozen"] + [f"LC x{e} frozen" for e in es], rows)
            + "\nDoes the large-kernel gap of frozen random filters appear here too, and do LCs close it?\n")


def section_init(runs, ds):
    out = ""
    for name, base in [("ResNet-LC-20-16", RESNET), ("ConvMixer-256/8", CONVMIXER)]:
        rs = family(runs, ds, dict(base, kernel_size=9), "expansion", "frozen", "init")
        if not any(r["init"] == "center" for r in rs):
            continue
        learned = select(rs, base, kernel_size=9)
        rows = [[e or "plain conv"] + [f"{cell(chosen)}, centre/ring {centre_ratio(chosen)}" for chosen in
                (select(rs, base, kernel_size=9, expansion=e, frozen=True, init=i) for i in ("kaiming_uniform", "center"))]
                for e in sizes([r for r in rs if r["frozen"]], "expansion")]
        out += (f"## Beyond the paper: a centre-weighted init for {name}, k = 9, on {ds}\n\n"
                f"Learned filters (no LC): {cell(learned)}, spatial variance centre/ring {centre_ratio(learned)}.\n\n"
                + table(["E", "frozen, kaiming_uniform", "frozen, center"], rows)
                + "\nThe paper's open question: does an init with more variance in the kernel centre close the "
                  "large-kernel gap of frozen random filters?\n\n")
    return out


plots = []


def plot(name, xlabel, ylabel, series):
    """A line plot over E (log scale) into plots/, if matplotlib happens to be installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the tables say it all
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in series.items():
        points = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    (results_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(results_dir / "plots" / f"{name}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    plots.append(name)


def image(name):
    return f"\n![{name}](plots/{name}.png)\n" if name in plots else ""


def report():
    runs = load_runs()
    settings = {}
    for r in runs:
        settings.setdefault(tuple(r.get(k) for k in SETTING), []).append(r)
    parts = [f"# lcconv: our results beside the paper's\n\nEach cell: mean ± std over seeds (number of "
             f"seeds). {len(runs)} finished runs in results.jsonl. Paper: Gavrikov & Keuper, arXiv:2301.11360.\n"]
    for setting, rs in settings.items():
        s = dict(zip(SETTING, setting))
        parts.append(f"# Runs of {s['epochs']} epoch(s) on " + (f"the first {s['train_subset']} training images"
                     if s["train_subset"] else "the full training set")
                     + f", batch {s['batch_size']}, lr {s['lr']}, weight decay {s['weight_decay']}\n")
        parts.append(section_table1(rs) or "")
        for ds in dict.fromkeys(r["dataset"] for r in rs):
            parts += [section_expansion(rs, ds),
                      section_sweep(rs, ds, "width", "Fig. 6a: width", "frozen catches up as W grows, break-even near W = 128"),
                      section_sweep(rs, ds, "depth", "Fig. 6b: depth", "frozen catches up as D grows, break-even near D = 260"),
                      section_kernel(rs, ds), section_ablation(rs, ds), section_offtheshelf(rs, ds),
                      section_convmixer(rs, ds), section_init(rs, ds)]
    tmp = results_dir / "REPORT.md.tmp"
    tmp.write_text("\n".join(p for p in parts if p))
    tmp.replace(results_dir / "REPORT.md")


if mode == "fetch":  # here the second argument is the data dir
    for name in dict.fromkeys(args.dataset for _, _, args in read_commands()):
        try:
            train.load_data(train.parse_args(["--dataset", name, "--data-dir", sys.argv[2]]), "cpu")
        except RuntimeError as e:
            print(f"experiments.sh: {e}; its runs will fail", file=sys.stderr)
elif mode == "pending":
    runs = load_runs()
    for _, cmd, args in read_commands():
        if not is_finished(args, runs):
            print(cmd)
elif mode == "plan":
    plan()
elif mode == "report":
    report()
PYTHON

main "$@"
