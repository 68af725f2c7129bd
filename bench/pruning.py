"""The testbed's room: what not writing dead ends is worth under the token budget, what blind
skipping costs the demonstrator, and what a model's searches write and pass over.

    python bench/pruning.py                                      # ceilings and demonstrators (no model), ~1 minute
    python bench/pruning.py --model runs/tiny-sft --model runs/grpo   # and each model's answers

Ceilings, on the 1,000 held-out `tiny` problems (compact style, LongProc's order, the whole answer
with its <Solution> block and EOS, the tiny tokenizer): the share whose answer fits each budget
when the search writes every move (the reference search), every move but the leaves that miss
(a one-step lookahead: the exact oracle decides), and also no 2-number state that cannot reach,
with the median answer length. Demonstrators: the share of problems solved within the RL
budget when each move is passed over with probability P, blind to the target
(countdown.search_trace(skip=P)), over 3 draws of the skips, with the mean moves written, leaf
misses, moves passed over to dead ends and to live states, the share that ends with
countdown.NO_SOLUTION and the share longer than the SFT cut (2x the budget).
With --model (greedy, at --budget): success [95% Wilson], what became of the answers
(answers.failure) and the mean per answer of answers.SEARCH_COUNTS, plus the share of answers
that verify with a process error.
"""
import argparse
import pathlib
import random
import re
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import answers  # noqa: E402
import countdown  # noqa: E402
from checkpoint import check_model_dir  # noqa: E402
from distributed import cpu_threads  # noqa: E402
from eval import default_max_new_tokens, evaluate, percent_interval, wilson  # noqa: E402
from model import TinyTokenizer, load_model, load_tokenizer  # noqa: E402
from problems import heldout_problems  # noqa: E402

BUDGETS = (96, 128, 160, 192)
SKIPS = (0.0, 0.1, 0.2, 0.25, 0.35, 0.5)


_MOVE = re.compile(r"[0-9]+[-+*/][0-9]+=([0-9]+)(?: \[([0-9,]+)\]|\|[0-9]+)")


def pruned(problem, level):
    """The reference answer without the dead ends of `level`: 0 every move, 1 no leaf that
    misses, 2 and no 2-number state (with its leaves) that cannot reach the target."""
    kept, dead = [], False
    for line in countdown.search_trace(*problem, style="compact").split("\n"):
        move = _MOVE.fullmatch(line)
        if move is not None and move[2] is None:  # a leaf, under the newest 2-number state
            if dead or (level >= 1 and int(move[1]) != problem.target):
                continue
        elif move is not None and move[2].count(",") == 1:  # a 2-number state
            dead = level >= 2 and not countdown.solvable([int(x) for x in move[2].split(",")], problem.target)
            if dead:
                continue
        kept.append(line)
    return "\n".join(kept)


def ceilings(problems):
    tok = TinyTokenizer()
    print(f"Share of {len(problems)} held-out problems whose answer fits the budget (tokens):\n")
    print("| the search writes | " + " | ".join(map(str, BUDGETS)) + " | median tokens |\n|---|" + "---|" * (len(BUDGETS) + 1))
    names = ("every move (the reference search)", "every move but the leaves that miss (a one-step lookahead)",
             "... and no 2-number state that cannot reach")
    for level, name in enumerate(names):
        lengths = [len(tok.encode(pruned(p, level))) + 1 for p in problems]
        print(f"| {name} | " + " | ".join(f"{100 * sum(x <= b for x in lengths) / len(lengths):.1f}%" for b in BUDGETS)
              + f" | {statistics.median(lengths):.0f} |")


def demonstrators(problems, budget, draws=3):
    tok = TinyTokenizer()
    print(f"\nDemonstrators that pass over each move with probability P, blind to the target ({draws} draws of the "
          f"skips, budget {budget}, cut {2 * budget}):\n")
    print("| P | solved within the budget | moves | leaf misses | passed over: dead | passed over: live | "
          "ends with no solution | longer than the cut |\n|---|---|---|---|---|---|---|---|")
    for skip in SKIPS:
        fits, counts, gave_up, long = 0, [], 0, 0
        for draw in range(draws):
            for k, p in enumerate(problems):
                trace = countdown.search_trace(*p, style="compact", skip=skip, rng=random.Random(draw * 100_003 + k))
                length = len(tok.encode(trace)) + 1
                fits += length <= budget and countdown.verify(p.nums, p.target, trace)
                counts.append(answers.search_counts(p.nums, p.target, trace))
                gave_up += countdown.NO_SOLUTION in trace
                long += length > 2 * budget
        n = draws * len(problems)
        mean = {key: sum(c[key] for c in counts) / n for key in answers.SEARCH_COUNTS}
        print(f"| {skip} | {100 * fits / n:.1f}% | {mean['lines']:.1f} | {mean['leaf_misses']:.1f} | "
              f"{mean['skipped_dead']:.1f} | {mean['skipped_live']:.1f} | {100 * gave_up / n:.1f}% | {100 * long / n:.1f}% |")


def model_report(path, problems, budget):
    model, tok = load_model(path), load_tokenizer(path)
    result = evaluate(model, tok, problems, max_new_tokens=budget, progress=True)
    n = len(problems)
    solved = round(result["success_rate"] * n)
    print(f"\n{path}, greedy, {n} held-out problems, budget {budget}: "
          f"{percent_interval(result['success_rate'], *wilson(solved, n))}")
    print("failures: " + ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in result["failures"].items()
                                   if kind != "solved"))
    print("per answer: " + ", ".join(f"{key} {value:.2f}" for key, value in result["search"].items())
          + f"; solved with a process error: {100 * result['solved_with_errors']:.1f}% of answers")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="a model or run directory; repeat to compare")
    ap.add_argument("--budget", type=int, default=default_max_new_tokens("bare"))
    ap.add_argument("--problems", type=int, default=1000)
    args = ap.parse_args()
    try:
        paths = [check_model_dir(path) for path in args.model]
    except ValueError as e:
        sys.exit(f"error: {e}")
    cpu_threads(torch.device("cpu"))
    problems = heldout_problems(args.problems, "tiny")
    if not paths:
        ceilings(problems)
        demonstrators(problems, args.budget)
    for path in paths:
        model_report(path, problems, args.budget)


if __name__ == "__main__":
    main()
