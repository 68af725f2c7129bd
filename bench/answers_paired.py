"""What two cells' final policies write, answer by answer, paired over problems and seeds.

    python bench/answers_paired.py grpo-rounds4-g16 clipo-g16 --seeds 0 1 2          # B - A, place cpu
    python bench/answers_paired.py grpo-rounds4 oracle-steps2 --seeds 0 1 2 4 --place cpu

A record in results/ keeps which held-out problems a run solved, but only the means of what became
of the other answers, so a difference in guesses or process errors has no interval over problems
there. This script evaluates each cell's final checkpoint again (runs/cells/<place>/s<seed>/<cell>,
greedy, the 1,000 held-out `tiny` problems at the RL budget, as the record's evaluation did; it
stops if the solved problems differ from the record's: another machine's float path, not the same
draw), sorts each answer into a kind (solved, solved with a process error in its search, and the
failures of answers.failure), and prints per kind each seed's share for A and B and B - A with a
t interval over seeds and a normal interval over problems, clustered by problem
(eval.clustered_difference). ~20 seconds a model on one core of a 2-core VM (beside a running
cell, `OMP_NUM_THREADS=1`: two threads on a busy core wait on each other for minutes).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import answers  # noqa: E402
from checkpoint import check_model_dir  # noqa: E402
from distributed import cpu_threads  # noqa: E402
from eval import clustered_difference, evaluate, seed_interval  # noqa: E402
from model import load_model, load_tokenizer  # noqa: E402
from problems import heldout_problems  # noqa: E402
from results import interval, load, pct  # noqa: E402
from runner import run_dir  # noqa: E402

KINDS = ["solved", "solved with a process error", *[kind for kind in answers.FAILURES if kind != "solved"]]


def answer_kinds(path, problems, record):
    """{kind: [0/1 per problem]} of the greedy answers of the model at `path`."""
    result = evaluate(load_model(path), load_tokenizer(path), problems, progress=True)
    solved = "".join(str(int(s)) for s in result["solved"])
    if solved != record["solved_end"]:
        sys.exit(f"error: {path} solves other problems than its record ({solved.count('1')} against "
                 f"{record['solved_end'].count('1')}): not the record's machine or weights")
    errors = [int(s and counts["process_errors"] > 0) for s, counts in zip(result["solved"], result["search_counts"])]
    kinds = {kind: [int(k == kind) for k in result["failure_kinds"]] for kind in answers.FAILURES}
    return {"solved with a process error": errors, **kinds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the cell compared against (A)")
    ap.add_argument("b", help="the cell compared (B)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--place", default="cpu", help="the folder of results/ and runs/cells/ (cpu, h200, ...)")
    args = ap.parse_args(argv)
    found = load(args.place)
    missing = [f"{cell} s{s}" for cell in (args.a, args.b) for s in args.seeds
               if s not in found.get(cell, {}) or not os.path.isdir(run_dir(args.place, cell, s))]
    if missing:
        sys.exit(f"error: no record or run directory in {args.place} for: {', '.join(missing)}")
    cpu_threads(torch.device("cpu"))
    problems = heldout_problems(len(found[args.a][args.seeds[0]]["solved_end"]), "tiny")
    pairs = {s: [answer_kinds(check_model_dir(run_dir(args.place, cell, s)), problems, found[cell][s])
                 for cell in (args.a, args.b)] for s in args.seeds}
    print(f"\n{args.b} - {args.a} ({args.place}), held-out answers (greedy, {len(problems):,} problems): share of "
          "answers per seed (A -> B), B - A [t over seeds] [problems, clustered]")
    print("| answers | " + " | ".join(f"seed {s}" for s in args.seeds) + " | B - A [t] [problems] |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for kind in KINDS:
        per_seed = [(sum(a[kind]) / len(a[kind]), sum(b[kind]) / len(b[kind])) for a, b in pairs.values()]
        mean, lo, hi = seed_interval([y - x for x, y in per_seed])
        _, plo, phi = clustered_difference([(a[kind], b[kind]) for a, b in pairs.values()])
        print(f"| {kind} | " + " | ".join(f"{pct(x)} -> {pct(y)}" for x, y in per_seed)
              + f" | {pct(mean, True)}{interval(lo, hi)}{interval(plo, phi)} |")


if __name__ == "__main__":
    main()
