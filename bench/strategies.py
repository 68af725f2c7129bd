"""The testbed's strategies: what a choice of operation order is worth under a token budget, and
what a model makes of it.

    python bench/strategies.py                                   # ceilings (no model), ~1 minute
    python bench/strategies.py --model runs/tiny-sft --model runs/grpo   # and each model's choices

Ceilings: on the 1,000 held-out `tiny` problems, the share whose compact trace (strategy line,
search, <Solution> block, EOS) fits each budget when written in each operation order of
countdown.STRATEGIES, when the better of them is chosen per problem (the oracle's choice), and
for reference LongProc's fixed order and all 24 orders chosen per problem.
With --model (greedy, at --budget): success [95% Wilson] with the model's own choice, and with
each strategy forced (its line given as the answer's start, counted in the budget: how well the
model executes it); the strategies it chose; "right choice": among problems that exactly one
strategy fits, how often it chose that one; what became of the failures (countdown.failure);
states written per answer and the share of answers whose first two-number state can still reach
the target (the exact oracle; every first move of a `tiny` problem can).
"""
import argparse
import itertools
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import countdown  # noqa: E402
from distributed import cpu_threads  # noqa: E402
from checkpoint import check_model_dir  # noqa: E402
from eval import default_max_new_tokens, evaluate, percent_interval, wilson  # noqa: E402
from model import TinyTokenizer, load_model, load_tokenizer  # noqa: E402

BUDGETS = (128, 160, 192, 256, 512)


def trace_lengths(problems, ops):
    """Tokens of each problem's whole answer in the order `ops` (the tiny tokenizer, EOS included)."""
    tok = TinyTokenizer()
    return [len(tok.encode(countdown.search_trace(*p, style="compact", ops=ops))) + 1 for p in problems]


def ceilings(problems):
    orders = ["".join(o) for o in itertools.permutations(countdown.OPS)]
    lengths = {ops: trace_lengths(problems, ops) for ops in orders}
    n = len(problems)

    def share(fits):
        return f"{100 * sum(fits) / n:.1f}%"
    print(f"Share of {n} held-out problems whose answer fits the budget (tokens):\n")
    print("| written in | " + " | ".join(map(str, BUDGETS)) + " |\n|---|" + "---|" * len(BUDGETS))
    for ops in countdown.STRATEGIES:
        print(f"| `{ops}` | " + " | ".join(share([x <= b for x in lengths[ops]]) for b in BUDGETS) + " |")
    rows = {"the better of the strategies, per problem": countdown.STRATEGIES, "any of the 24 orders, per problem": orders}
    for name, chosen in rows.items():
        print(f"| {name} | " + " | ".join(share([min(lengths[o][i] for o in chosen) <= b for i in range(n)])
                                          for b in BUDGETS) + " |")
    return lengths


def first_pair_reachable(problem, text):
    """Whether the first two-number state the answer writes can still reach the target (None
    when it writes none). Every first move of a `tiny` problem keeps the target reachable, so
    the second move is where a choice first shows."""
    pairs = [state for _, state in countdown.extract_states(text) if len(state) == 2]
    return None if not pairs else countdown.solvable(pairs[0], problem.target)


def model_report(path, problems, lengths, budget):
    model, tok = load_model(path), load_tokenizer(path)
    n = len(problems)
    own = evaluate(model, tok, problems, max_new_tokens=budget, progress=True)
    forced = {ops: evaluate(model, tok, problems, max_new_tokens=budget, start=ops + "\n", progress=True)
              for ops in countdown.STRATEGIES}
    print(f"\n{path}, greedy, {n} held-out problems, budget {budget} tokens:\n")
    print("| answers | success [95%] |\n|---|---|")
    solved = round(own["success_rate"] * n)
    print(f"| its own choice of strategy | {percent_interval(own['success_rate'], *wilson(solved, n))} |")
    for ops, result in forced.items():
        k = round(result["success_rate"] * n)
        print(f"| `{ops}` forced | {percent_interval(result['success_rate'], *wilson(k, n))} |")
    chosen = [countdown.strategy_of(t) for t in own["texts"]]
    fits = {ops: [x <= budget for x in lengths[ops]] for ops in countdown.STRATEGIES}
    single = [i for i in range(n) if sum(fits[ops][i] for ops in countdown.STRATEGIES) == 1]
    right = sum(chosen[i] is not None and fits[chosen[i]][i] for i in single)
    reachable = [first_pair_reachable(p, t) for p, t in zip(problems, own["texts"])]
    written = [r for r in reachable if r is not None]
    print(f"\nchosen: " + ", ".join(f"`{k}` {100 * v:.1f}%" for k, v in own["strategies"].items()))
    print(f"right choice where exactly one strategy fits: {right}/{len(single)}"
          f" ({100 * right / max(1, len(single)):.1f}%; a coin flip would be 50%)")
    print("failures: " + ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in own["failures"].items()
                                   if kind != "solved"))
    print(f"states written per answer: {sum(len(countdown.extract_states(t)) for t in own['texts']) / n:.1f}; "
          f"first two-number states from which the target is reachable: {100 * sum(written) / max(1, len(written)):.1f}% "
          f"of {len(written)}")
    return own


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
    problems = countdown.heldout_problems(args.problems, "tiny")
    lengths = ceilings(problems)
    for path in paths:
        model_report(path, problems, lengths, args.budget)


if __name__ == "__main__":
    main()
