"""RL modes side by side: same budget, several seeds, one table with 95% intervals.

    python bench/rl_modes.py --modes grpo critic oracle --seeds 0 1 2 --steps 40
    python bench/rl_modes.py --modes grpo "oracle --critic-credit move" --seeds 0 1 2 --json runs/modes.json
    python bench/rl_modes.py --modes grpo clipo --steps 40 --common "--prompts-per-step 8" --plot runs/modes.png

Each (mode, seed) runs `python train.py --mode ... --seed S --steps N --out runs/modes/<name>-s<S>`
from the default warm start (or --model DIR); a finished run there is reused and a stopped one resumed, so the
script picks up after an interruption. Per mode: the final held-out success (greedy, the same
held-out problems for every run) of each seed, their mean with a 95% t interval over seeds,
and the paired difference to the first mode: per seed, the mean over problems of (mode - first)
on the same problems from the same warm start, then their mean with a 95% t interval over
seeds (training noise included), and, in brackets, the interval over problems alone (the
evaluation's noise; what a single seed could claim). --json OUT writes
{mode: {"seeds": {seed: success}, "mean": m, "ci": [lo, hi], "diff": d, "diff_ci": [lo, hi],
"diff_ci_problems": [lo, hi], "warm_start": w, "curve": {step: mean success}, "ood": {the same
for --ood}}}. --ood (default tiny-wide: numbers 1..12, so two-digit inputs the tiny model never
saw as inputs; tiny-ood's targets 51..99 are out of its reach altogether) evaluates each run's
final checkpoint on that preset's held-out problems too (greedy; cached in the run directory):
the generalisation column.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import countdown  # noqa: E402
from checkpoint import check_model_dir, latest_checkpoint  # noqa: E402
from run import DEFAULT_MODEL  # noqa: E402
from eval import evaluate, paired_difference, seed_interval  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(out, steps):
    rows = [r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "heldout/success_rate" in r]
    return bool(rows) and rows[-1]["step"] >= steps


def solved_at(out, step):
    """Per-problem 0/1 of the held-out evaluation at `step` (heldout.jsonl)."""
    rows = [r for r in read_jsonl(os.path.join(out, "heldout.jsonl")) if r["step"] == step]
    return [int(c) for c in rows[-1]["solved"]]


def ood_solved(out, preset, n):
    """Per-problem 0/1 of the run's final checkpoint on `n` held-out problems of `preset` (greedy),
    cached in <out>/ood-<preset>.json."""
    cache = os.path.join(out, f"ood-{preset}.json")
    if not os.path.exists(cache):
        path = check_model_dir(out)
        result = evaluate(load_model(path), load_tokenizer(path), countdown.heldout_problems(n, preset), progress=True)
        with open(cache, "w") as f:
            json.dump([int(x) for x in result["solved"]], f)
    with open(cache) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["grpo"], help='each: a mode, optionally with flags, quoted')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run (9 runs of 40: ~1 hour on 2 cores)")
    ap.add_argument("--out", default=os.path.join("runs", "modes"))
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the warm start every run starts from (the default one is "
                    "trained first when missing)")
    ap.add_argument("--common", default="--eval-every 20", help="flags for every run, quoted (e.g. a smaller budget)")
    ap.add_argument("--ood", default="tiny-wide", help="preset of the out-of-distribution held-out set ('' for none)")
    ap.add_argument("--ood-problems", type=int, default=1000)
    ap.add_argument("--json", help="write the table (and mean curves) here")
    ap.add_argument("--plot", help="also draw each mode's mean held-out curve into this PNG (needs matplotlib)")
    args = ap.parse_args()
    runs = {}
    for spec in args.modes:
        mode, *flags = shlex.split(spec)
        name = "-".join([mode.replace("+", "-")] + [f.lstrip("-") for f in flags])
        runs[name] = {}
        for seed in args.seeds:
            out = os.path.join(args.out, f"{name}-s{seed}")
            if not finished(out, args.steps):
                resume = ["--resume"] if latest_checkpoint(out, say=lambda *a, **k: None) else []
                cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--mode", mode, *flags, "--seed", str(seed),
                       "--steps", str(args.steps), "--out", out, *shlex.split(args.common), *resume,
                       *(["--model", args.model] if args.model != DEFAULT_MODEL else [])]  # the default: trained if missing
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            runs[name][seed] = out
    table = summarise(runs, lambda out: solved_at(out, args.steps), curves=True)
    first = next(iter(table))
    n = len(solved_at(runs[first][args.seeds[0]], args.steps))
    print(f"\nheld-out success ({n} problems, greedy) after {args.steps} RL steps; warm start "
          f"{100 * table[first]['warm_start']:.1f}%; intervals 95%\n")
    print_table(table, args.seeds)
    if args.ood:
        ood = summarise(runs, lambda out: ood_solved(out, args.ood, args.ood_problems))
        print(f"\nout of distribution: {args.ood_problems} held-out {args.ood} problems {countdown.PRESETS[args.ood]} "
              f"(greedy); warm start {100 * sum(ood_solved(check_model_dir(args.model), args.ood, args.ood_problems)) / args.ood_problems:.1f}%\n")
        print_table(ood, args.seeds)
        for name in table:
            table[name]["ood"] = {k: v for k, v in ood[name].items() if k != "warm_start"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(table, args.plot, f"{args.steps} RL steps, mean of seeds {', '.join(map(str, args.seeds))}")


def print_table(table, seeds):
    first = next(iter(table))
    print("| mode | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean [t over seeds] | vs {first}: paired "
          "difference [over seeds] [over problems] |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for name, row in table.items():
        cells = " | ".join(f"{100 * row['seeds'][s]:.1f}" for s in seeds)
        diff = "—" if name == first else (f"{100 * row['diff']:+.1f} [{100 * row['diff_ci'][0]:+.1f}, "
                                          f"{100 * row['diff_ci'][1]:+.1f}] [{100 * row['diff_ci_problems'][0]:+.1f}, "
                                          f"{100 * row['diff_ci_problems'][1]:+.1f}]")
        print(f"| {name} | {cells} | {100 * row['mean']:.1f} [{100 * row['ci'][0]:.1f}, {100 * row['ci'][1]:.1f}] "
              f"| {diff} |")


def summarise(runs, solved, curves=False):
    """The --json table: per mode, `solved(out)` (per-problem 0/1) of each seed's run, their mean
    with a t interval over seeds, and the paired difference to the first mode; with `curves`,
    the held-out curve of metrics.jsonl too."""
    table, first = {}, None
    for name, outs in runs.items():
        finals = {seed: solved(out) for seed, out in outs.items()}
        success = {seed: sum(v) / len(v) for seed, v in finals.items()}
        mean, lo, hi = seed_interval(list(success.values()))
        row = {"seeds": success, "mean": mean, "ci": [lo, hi]}
        if curves:
            logged = [{r["step"]: r["heldout/success_rate"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
                       if "heldout/success_rate" in r} for out in outs.values()]
            common = sorted(set.intersection(*(set(c) for c in logged)))
            row.update(warm_start=logged[0].get(0, float("nan")),  # step 0: the starting checkpoint
                       curve={s: sum(c[s] for c in logged) / len(logged) for s in common})
        if first is None:
            first = finals
        else:
            per_seed = [paired_difference(first[s], finals[s]) for s in finals]
            diff, dlo, dhi = seed_interval([d[0] for d in per_seed])
            pooled = paired_difference([x for s in finals for x in first[s]], [x for s in finals for x in finals[s]])
            row.update(diff=diff, diff_ci=[dlo, dhi], diff_ci_problems=[pooled[1], pooled[2]])
        table[name] = row
    return table


def plot(table, path, title):
    """Each mode's held-out success against steps, averaged over its seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib, an optional extra: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in table.items():
        ax.plot(list(row["curve"]), list(row["curve"].values()), marker=".", label=name)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
