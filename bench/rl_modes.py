"""RL modes side by side on the built-in tiny model: same budget, several seeds, one table.

    python bench/rl_modes.py --modes grpo critic oracle --seeds 0 1 2 --steps 100
    python bench/rl_modes.py --modes grpo "critic --critic-credit process" --steps 100 --plot runs/modes.png
    python bench/rl_modes.py --modes grpo clipo --steps 40 --common "--prompts-per-step 8"   # a smaller budget

Each (mode, seed) runs `python train.py --mode ... --seed S --steps N --out runs/modes/<name>-s<S>`
from the default warm start; a run already finished there is reused, so the script resumes
after an interruption. The table gives the held-out success of the warm start (step 0, greedy)
and at the end of each run, per seed and as mean +- std over seeds; --plot draws each mode's
held-out curve, averaged over seeds.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def final_row(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1] if rows and "heldout/success_rate" in rows[-1] else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["grpo"], help='each: a mode, optionally with flags, quoted')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=os.path.join("runs", "modes"))
    ap.add_argument("--common", default="", help="flags for every run, quoted (e.g. a smaller budget)")
    ap.add_argument("--plot", help="also draw each mode's mean held-out curve into this PNG (needs matplotlib)")
    args = ap.parse_args()
    table = {}
    for spec in args.modes:
        mode, *flags = shlex.split(spec)
        name = "-".join([mode.replace("+", "-")] + [f.lstrip("-") for f in flags])
        for seed in args.seeds:
            out = os.path.join(args.out, f"{name}-s{seed}")
            if final_row(os.path.join(out, "metrics.jsonl")) is None or \
                    final_row(os.path.join(out, "metrics.jsonl"))["step"] < args.steps:
                resume = ["--resume"] if os.path.exists(os.path.join(out, "model", "trainer_state.pt")) else []
                cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--mode", mode, *flags, "--seed", str(seed),
                       "--steps", str(args.steps), "--out", out, *shlex.split(args.common), *resume]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                base = json.loads(f.readline())["heldout/success_rate"]  # step 0: the warm start
            table.setdefault(name, []).append(final_row(os.path.join(out, "metrics.jsonl"))["heldout/success_rate"])
    print(f"\nheld-out success (200 problems, greedy), {args.steps} RL steps, warm start {base:.3f}\n")
    print("| mode | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | std | gain |")
    print("|---|" + "---|" * (len(args.seeds) + 3))
    for name, values in table.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        mean = statistics.mean(values)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {mean:.3f} | {std:.3f} | {mean - base:+.3f} |")
    if args.plot:
        plot({name: [os.path.join(args.out, f"{name}-s{s}", "metrics.jsonl") for s in args.seeds] for name in table},
             args.plot, f"{args.steps} RL steps, mean of seeds {', '.join(map(str, args.seeds))}")


def plot(runs, path, title):
    """Each mode's held-out success against steps, averaged over its seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib, an optional extra: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, paths in runs.items():
        curves = []
        for p in paths:
            with open(p) as f:
                curves.append({r["step"]: r["heldout/success_rate"] for r in map(json.loads, f) if "heldout/success_rate" in r})
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker=".", label=name)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out success (greedy)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
