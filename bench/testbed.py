"""The testbed's acceptance table: SFT + GRPO against SFT alone at the same minutes, over seeds.

    python bench/testbed.py --seeds 0 1 2            # ~2 hours a seed on 2 cores; resumes where it stopped
    python bench/testbed.py --seeds 0 --json runs/testbed.json

Per seed S, in runs/testbed/s<S>/ (a finished run is reused, a stopped one resumed):
  sft        python train.py --mode sft --seed S                    the warm start (default flags)
  grpo       python train.py --mode grpo --seed S --model sft       RL from it (default flags)
  sft-alone  python train.py --mode sft --seed S --steps N          the same SFT given the pipeline's minutes
  sft-every  python train.py --mode sft --seed S --steps N --skip 0 the noiseless demonstrator, the same minutes
N is the SFT steps the pipeline's wall time holds: the warm start's steps x (SFT + GRPO minutes) /
SFT minutes,
each run's minutes taken from its own wall clock (timings.json), so nothing else should run
beside the warm start and GRPO; or --baseline-steps N, measured once that way (then the other
seeds may run beside other work). The two baselines then run side by side (one process and one
thread each; their own minutes do not count), evaluated every 500 steps. Both run their own
cosine schedule over all N steps: SFT alone at its strongest, not a warm start continued
through a second warm-up.
Printed: held-out success (1,000 problems, greedy, the RL budget) per seed, the mean with a t
interval over seeds, each row's paired difference to SFT + GRPO (over seeds; over problems in
brackets), then what RL changed (the means over seeds of the held-out searches' counts,
answers.SEARCH_COUNTS, and failure kinds, at the warm start and after RL) and GRPO's held-out
curve. --json OUT writes the same as bench/rl_modes.py's --json, plus "changed" and "minutes".
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))  # after the project: bench/countdown.py must not shadow countdown
import answers  # noqa: E402
from checkpoint import latest_checkpoint, load_state  # noqa: E402
from rl_modes import print_table, read_jsonl, solved_at, summarise  # noqa: E402

CHANGED = [*(f"heldout/{key}" for key in answers.SEARCH_COUNTS), "heldout/solved_with_errors",
           *(f"heldout/failed_{kind.replace(' ', '_')}" for kind in answers.FAILURES[1:])]


def finished(out):
    found = latest_checkpoint(out, say=lambda *a, **k: None)
    return found is not None and load_state(found)["finished"]


def train(*runs):
    """Run train.py for each (out, flags), side by side (each then gets one process and one
    thread: their timings do not count), resumed when `out` holds a checkpoint, unless it
    finished. A run alone keeps train.py's defaults; its wall seconds go to <out>/timings.json
    (a resumed run adds its own). Returns each run's seconds."""
    alone = len(runs) == 1
    started = []
    for out, flags in runs:
        if finished(out):
            continue
        resume = ["--resume"] if latest_checkpoint(out, say=lambda *a, **k: None) else []
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", out, *resume,
               *(() if alone else ("--procs", "1"))]
        env = dict(os.environ) if alone else {**os.environ, "OMP_NUM_THREADS": "1"}
        print("$", " ".join(cmd), flush=True)
        started.append((out, time.time(), subprocess.Popen(cmd, env=env)))
    for out, start, process in started:
        if process.wait():
            sys.exit(f"error: {out} failed (exit {process.returncode})")
        before = seconds_of(out) if os.path.exists(os.path.join(out, "timings.json")) else 0.0
        with open(os.path.join(out, "timings.json"), "w") as f:
            json.dump({"seconds": before + time.time() - start}, f)
    return [seconds_of(out) for out, _ in runs]


def seconds_of(out):
    with open(os.path.join(out, "timings.json")) as f:
        return json.load(f)["seconds"]


def final_step(out):
    return max(r["step"] for r in read_jsonl(os.path.join(out, "heldout.jsonl")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join("runs", "testbed"))
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--baseline-steps", type=int,
                    help="the baselines' SFT steps, measured once (a seed whose pipeline ran on an idle machine); "
                         "default: each seed's own minutes")
    args = ap.parse_args()
    runs = {"SFT + GRPO": {}, "SFT alone, same minutes": {}, "SFT on every move, same minutes": {}, "warm start": {}}
    minutes = {}
    for seed in args.seeds:
        base = os.path.join(args.out, f"s{seed}")
        warm, rl = os.path.join(base, "sft"), os.path.join(base, "grpo")
        (t_sft,) = train((warm, ["--mode", "sft", "--seed", str(seed)]))
        (t_rl,) = train((rl, ["--mode", "grpo", "--seed", str(seed), "--model", warm]))
        steps = args.baseline_steps or round(final_step(warm) * (t_sft + t_rl) / t_sft)
        alone, every = os.path.join(base, "sft-alone"), os.path.join(base, "sft-every")
        baseline = ["--mode", "sft", "--seed", str(seed), "--steps", str(steps), "--eval-every", "500"]
        train((alone, baseline), (every, baseline + ["--skip", "0"]))
        minutes[seed] = {"sft": t_sft / 60, "grpo": t_rl / 60, "baseline_steps": steps}
        runs["SFT + GRPO"][seed], runs["warm start"][seed] = rl, warm
        runs["SFT alone, same minutes"][seed], runs["SFT on every move, same minutes"][seed] = alone, every
    table = summarise(runs, lambda out: solved_at(out, final_step(out)))
    print("\nheld-out success (1,000 problems, greedy, the RL budget); intervals 95%; minutes per seed: "
          + ", ".join(f"s{s}: SFT {m['sft']:.1f} + GRPO {m['grpo']:.1f} (baselines {m['baseline_steps']} SFT steps)"
                      for s, m in minutes.items()) + "\n")
    print_table(table, args.seeds)
    changed = {}
    for key in CHANGED:
        at = {}
        for when, step in (("warm start", 0), ("after GRPO", None)):
            values = [[r for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if key in r][-1 if step is None else 0][key]
                      for out in runs["SFT + GRPO"].values()]
            at[when] = sum(values) / len(values)
        changed[key] = at
    print("\nwhat RL changed (held-out answers, mean over seeds)\n\n| | warm start | after GRPO |\n|---|---|---|")
    for key, at in changed.items():
        print(f"| {key} | {at['warm start']:.3f} | {at['after GRPO']:.3f} |")
    curves = [{r["step"]: r["heldout/success_rate"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
               if "heldout/success_rate" in r} for out in runs["SFT + GRPO"].values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    print("\nGRPO's held-out curve (mean over seeds): "
          + ", ".join(f"{s}: {100 * sum(c[s] for c in curves) / len(curves):.1f}" for s in steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "changed": changed, "minutes": minutes}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
