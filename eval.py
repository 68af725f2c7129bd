"""Evaluate models on Countdown, with 95% intervals, and plot training curves.

    python eval.py --model runs/tiny-sft                        # 1,000 held-out problems, latest checkpoint
    python eval.py --model runs/tiny-sft --model runs/grpo      # and B - A on the same problems, paired
    python eval.py --model Qwen/Qwen2.5-1.5B-Instruct --data ../shared/longproc/countdown_0.5k.json
    python eval.py --model runs/tiny-sft --data ../shared/longproc/countdown_0.5k.json
    python eval.py --model A --model B --samples 8 --temperature 1.0 --json out.json
    python eval.py --plot runs/grpo/metrics.jsonl runs/clipo/metrics.jsonl --out curves.png
    python eval.py --show runs/grpo                             # what the policy writes, readably

Per model: success rate (pass@1, the mean over all samples), pass@k (k = --samples: a problem
counts when any sample solves it), format-error rate (no parsable <Solution> block), mean
response length in tokens, sampled tokens/s, and what became of the failed answers
(answers.failure: out of tokens, no block, guess, slip), what the searches wrote (the mean per
answer of answers.SEARCH_COUNTS: moves, leaf misses, dead 2-number states, process errors, moves
passed over to dead ends and to live states) and the share of answers solved with a process
error. The built-in tiny model gets the bare prompt and writes the compact trace; other models get the "longproc" prompt through their chat template.
`evaluate()` is what train.py calls for its periodic held-out evaluation. On a GPU the model is
loaded there in bf16 (`--fp32` to keep fp32); on CPU in fp32 (`--bf16` to use bf16 there too).

Intervals: a success rate over n problems carries a 95% Wilson interval (`wilson`); two models
on the same problems are compared by the per-problem differences, mean +- 1.96 standard
errors (`paired_difference`: the paired interval, much narrower than two separate ones when the
models agree on most problems); `seed_interval` is a t interval over seeds (bench/results.py).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import answers
import countdown
from checkpoint import check_model_dir
from model import TinyTokenizer, encode_prompt, eos_token_ids, load_model, load_tokenizer
from problems import PRESETS, heldout_problems, load_problems
from sample import sample

KEYS = ("success_rate", "pass_at_k", "format_error_rate", "mean_length", "tokens_per_s")
Z95 = 1.959964
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_0.975, dof


def wilson(successes, n, z=Z95):
    """95% Wilson score interval (lo, hi) of a success rate successes / n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a, b, z=Z95):
    """B - A from per-problem scores of the same problems (0/1, or a mean over samples):
    (mean difference, lo, hi), a normal interval on the per-problem differences."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs the same problems: {len(a)} vs {len(b)} scores")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1))
    return mean, mean - z * sd / math.sqrt(len(d)), mean + z * sd / math.sqrt(len(d))


def clustered_difference(pairs, z=Z95):
    """B - A over seeds that scored the same problems in the same order, [(a, b)] per seed:
    (mean difference, lo, hi), a normal interval clustered by problem (each problem's difference
    averaged over the seeds first), since one problem's outcomes under two seeds are not
    independent draws (a pooled interval over the (problem, seed) pairs is up to ~1.2x narrower)."""
    if len({len(a) for a, _ in pairs} | {len(b) for _, b in pairs}) != 1:
        raise ValueError("a clustered comparison needs the same problems under every seed")
    per_problem = [sum(b[k] - a[k] for a, b in pairs) / len(pairs) for k in range(len(pairs[0][0]))]
    return paired_difference([0.0] * len(per_problem), per_problem, z)


def seed_interval(values):
    """(mean, lo, hi): a 95% t interval over seeds (a single seed: no interval)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = T95.get(len(values) - 1, Z95) * sd / math.sqrt(len(values))
    return mean, mean - half, mean + half


def percent_interval(rate, lo, hi):
    return f"{100 * rate:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def default_style(tokenizer):
    return "bare" if isinstance(tokenizer, TinyTokenizer) else "longproc"


def default_max_new_tokens(style):
    # the tiny model's budget binds (compact traces of "tiny" problems reach ~390 tokens): at 160
    # tokens one operation order fits about half of the problems, a choice between two 70%
    # (docs/testbed.md); LongProc 0.5k demonstrations stay under ~650 of a BPE tokenizer's tokens
    return 160 if style == "bare" else 1024


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, samples=1, temperature=0.0, style=None, max_new_tokens=None,
             batch_size=64, seed=0, progress=False, eos_token_id=None):
    """Metrics (KEYS) of `model` on `problems`, `samples` completions each; "solved": each
    problem's success rate over its samples (for intervals and paired comparisons); "failures":
    what became of the answers (answers.failure); "search": the mean per answer of each of
    answers.SEARCH_COUNTS (moves written, leaf misses, process errors, ...) and
    "solved_with_errors": the share of answers that verify with a process error in their search;
    "texts", "failure_kinds" and "search_counts": each answer, what became of it and what its
    search wrote."""
    style = style or default_style(tokenizer)
    max_new_tokens = max_new_tokens or default_max_new_tokens(style)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    solved, formatted, lengths, failures, counts, texts, seconds = [], [], [], [], [], [], 0.0
    per_call = max(1, batch_size // samples)
    chunks = range(0, len(problems), per_call)
    for first in tqdm(chunks, desc="eval", disable=not progress, leave=False):
        chunk = problems[first:first + per_call]
        prompts = [encode_prompt(tokenizer, countdown.prompt(p, style), chat=style == "longproc") for p in chunk]
        t = time.perf_counter()
        out = sample(model, prompts, max_new_tokens, temperature=temperature, num_samples=samples,
                     eos_token_id=eos_token_id or eos_token_ids(model, tokenizer), stop="</Solution>", tokenizer=tokenizer,
                     generator=generator, pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - t
        for k, tokens in enumerate(out.tokens):
            p = chunk[k // samples]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            texts.append(text)
            solved.append(countdown.verify(p.nums, p.target, text))
            formatted.append(countdown.solution_format_ok(text, len(p.nums)))
            lengths.append(len(tokens))
            failures.append(answers.failure(p.nums, p.target, text, out.finished[k]))
            counts.append(answers.search_counts(p.nums, p.target, text))
    model.train(was_training)
    by_problem = [any(solved[i:i + samples]) for i in range(0, len(solved), samples)]
    return {"success_rate": sum(solved) / len(solved), "pass_at_k": sum(by_problem) / len(by_problem),
            "solved": [sum(solved[i:i + samples]) / samples for i in range(0, len(solved), samples)],
            "format_error_rate": 1 - sum(formatted) / len(formatted), "mean_length": sum(lengths) / len(lengths),
            "tokens_per_s": sum(lengths) / max(seconds, 1e-9),
            "failures": {kind: failures.count(kind) / len(failures) for kind in answers.FAILURES},
            "search": {key: sum(c[key] for c in counts) / len(counts) for key in answers.SEARCH_COUNTS},
            "solved_with_errors": sum(s and c["process_errors"] > 0 for s, c in zip(solved, counts)) / len(counts),
            "texts": texts, "failure_kinds": failures, "search_counts": counts}


def plot(paths, out):
    """Curves of metrics.jsonl files side by side (matplotlib is an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("eval.py --plot needs matplotlib, an optional extra: pip install matplotlib")
    runs = {}
    for path in paths:
        try:
            with open(path) as f:
                runs[path] = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{path}: cannot read metrics ({e})")
    panels = [k for k in ("heldout/success_rate", "success_rate", "reward_mean", "loss", "kl", "response_length_mean",
                          "entropy", "heldout/lines", "heldout/leaf_misses", "heldout/skipped_dead",
                          "heldout/process_errors", "heldout/failed_guess", "heldout/failed_out_of_tokens")
              if any(k in r for rows in runs.values() for r in rows)]
    if not panels:
        sys.exit(f"no known metric in {', '.join(paths)}")
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, panels):
        for path, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=os.path.dirname(path) or path, marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


WHAT_BECAME = {"solved": "solved", "out of tokens": "out of tokens (the budget ended it)",
               "no block": "no block (stopped without a parsable <Solution>)",
               "guess": "guess (a <Solution> after a search that never hit the target)",
               "slip": "slip (the search hit the target, the <Solution> is wrong anyway)"}


def show(run_dir, responses=8):
    """Print the newest rollouts and held-out answers of a run's rollouts.jsonl, readably."""
    path = os.path.join(run_dir, "rollouts.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {path}: cannot read rollouts ({e}); train.py writes it at evaluations")
    newest = {row["kind"]: row for row in rows}  # the last of each kind
    group = newest.get("rollouts")
    if group:
        print(f"step {group['step']}: rollouts of Numbers {group['nums']}, Target {group['target']}\n")
        for k, response in enumerate(group["responses"][:responses], 1):
            terms = "".join(f", {name} {value:+.3f}" for name, value in response["terms"].items())
            print(f"#{k}  reward {response['reward']:.3f}{terms}, {response['length']} tokens: "
                  f"{WHAT_BECAME[response['failure']]}")
            print("    " + response["text"].strip().replace("\n", "\n    ") + "\n")
    answers = newest.get("heldout")
    if answers:
        print(f"step {answers['step']}: greedy held-out answers\n")
        for answer in answers["answers"]:
            print(f"Numbers {answer['nums']}, Target {answer['target']}: {WHAT_BECAME[answer['failure']]}")
            print("    " + answer["text"].strip().replace("\n", "\n    ") + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a model directory or hub name; repeat for a side-by-side table")
    data = ap.add_mutually_exclusive_group()
    data.add_argument("--data", help="problems: LongProc JSON or our JSONL")
    data.add_argument("--procedural", type=int, default=1000, help="N held-out procedural problems (default)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="distribution of --procedural")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", help="write the metrics of every model here")
    precision = ap.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 weights on CPU too (default on a GPU)")
    precision.add_argument("--fp32", action="store_true", help="fp32 weights on a GPU too (default on CPU)")
    ap.add_argument("--plot", nargs="+", metavar="METRICS_JSONL", help="plot training curves instead")
    ap.add_argument("--show", metavar="RUN", help="print the newest rollouts and held-out answers of a run instead")
    ap.add_argument("--out", default="curves.png", help="PNG file for --plot")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.plot, args.out)
    if args.show:
        return show(args.show)
    if not args.model:
        ap.error("give --model DIR (or --plot FILES, or --show RUN)")
    if args.samples < 1 or (args.samples > 1 and args.temperature == 0):
        ap.error("--samples K > 1 needs --temperature > 0 (greedy samples are all the same)")
    try:
        args.model = [check_model_dir(path) for path in args.model]
        problems = load_problems(args.data) if args.data else heldout_problems(args.procedural, args.preset)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 or (device.type == "cuda" and not args.fp32) else torch.float32
    results = {}
    for path in args.model:
        try:
            model, tokenizer = load_model(path, dtype=dtype, device=device), load_tokenizer(path)
        except ValueError as e:
            sys.exit(f"error: {e}")
        results[path] = evaluate(model, tokenizer, problems, samples=args.samples,
                                 temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, progress=True)
    source = args.data or f"{args.procedural} held-out procedural problems"
    print(f"{source}, {args.samples} sample(s) each, temperature {args.temperature}, {dtype} on {device}\n")
    print("| metric | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    n = len(problems) * args.samples
    print("| success_rate [95% Wilson] | " + " | ".join(
        percent_interval(r["success_rate"], *wilson(round(r["success_rate"] * n), n)) for r in results.values()) + " |")
    for key in KEYS[1:]:
        print(f"| {key.replace('_at_k', f'@{args.samples}')} | " + " | ".join(f"{r[key]:.3f}" for r in results.values()) + " |")
    for kind in answers.FAILURES[1:]:  # what became of the answers that failed (answers.failure)
        print(f"| failed: {kind} | " + " | ".join(f"{r['failures'][kind]:.3f}" for r in results.values()) + " |")
    for key in answers.SEARCH_COUNTS:  # what the searches wrote and passed over, per answer
        print(f"| {key} per answer | " + " | ".join(f"{r['search'][key]:.2f}" for r in results.values()) + " |")
    print("| solved with a process error | " + " | ".join(f"{r['solved_with_errors']:.3f}" for r in results.values()) + " |")
    first, *others = results
    for path in others:
        mean, lo, hi = paired_difference(results[first]["solved"], results[path]["solved"])
        print(f"\n{path} - {first}: {100 * mean:+.1f} points, paired 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"
              f" ({len(problems)} problems)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
