"""Evaluate models on Countdown, and plot training curves.

    python eval.py --model runs/tiny-sft                        # 200 held-out procedural problems
    python eval.py --model runs/tiny-sft --data ../shared/longproc/countdown_0.5k.json
    python eval.py --model A --model B --samples 8 --temperature 1.0 --json out.json
    python eval.py --plot runs/grpo/metrics.jsonl runs/clipo/metrics.jsonl --out curves.png

Per model: success rate (pass@1, the mean over all samples), pass@k (k = --samples: a problem
counts when any sample solves it), format-error rate (no parsable <Solution> block), mean
response length in tokens, sampled tokens/s. The built-in tiny model gets the bare prompt and
writes the compact trace; other models get the "longproc" prompt through their chat template.
`evaluate()` is what train.py calls for its periodic held-out evaluation.
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import countdown
from model import TinyTokenizer, check_model_path, encode_prompt, load_model, load_tokenizer
from sample import sample

KEYS = ("success_rate", "pass_at_k", "format_error_rate", "mean_length", "tokens_per_s")


def default_style(tokenizer):
    return "bare" if isinstance(tokenizer, TinyTokenizer) else "longproc"


def default_max_new_tokens(style):
    # the tiny model's compact traces of "tiny" problems stay under ~390 tokens (2,000 drawn);
    # LongProc 0.5k demonstrations under ~650 of a typical BPE tokenizer's tokens
    return 512 if style == "bare" else 1024


@torch.no_grad()
def evaluate(model, tokenizer, problems, *, samples=1, temperature=0.0, style=None, max_new_tokens=None,
             batch_size=64, seed=0, progress=False):
    """Metrics (KEYS) of `model` on `problems`, `samples` completions each."""
    style = style or default_style(tokenizer)
    max_new_tokens = max_new_tokens or default_max_new_tokens(style)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    solved, formatted, lengths, seconds = [], [], [], 0.0
    per_call = max(1, batch_size // samples)
    chunks = range(0, len(problems), per_call)
    for start in tqdm(chunks, desc="eval", disable=not progress, leave=False):
        chunk = problems[start:start + per_call]
        prompts = [encode_prompt(tokenizer, countdown.prompt(p, style), chat=style == "longproc") for p in chunk]
        t = time.perf_counter()
        out = sample(model, prompts, max_new_tokens, temperature=temperature, num_samples=samples,
                     eos_token_id=tokenizer.eos_token_id, stop="</Solution>", tokenizer=tokenizer,
                     generator=generator, pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - t
        for k, tokens in enumerate(out.tokens):
            p = chunk[k // samples]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            solved.append(countdown.verify(p.nums, p.target, text))
            formatted.append(countdown.solution_format_ok(text, len(p.nums)))
            lengths.append(len(tokens))
    model.train(was_training)
    by_problem = [any(solved[i:i + samples]) for i in range(0, len(solved), samples)]
    return {"success_rate": sum(solved) / len(solved), "pass_at_k": sum(by_problem) / len(by_problem),
            "format_error_rate": 1 - sum(formatted) / len(formatted), "mean_length": sum(lengths) / len(lengths),
            "tokens_per_s": sum(lengths) / max(seconds, 1e-9)}


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
                          "entropy") if any(k in r for rows in runs.values() for r in rows)]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a model directory or hub name; repeat for a side-by-side table")
    data = ap.add_mutually_exclusive_group()
    data.add_argument("--data", help="problems: LongProc JSON or our JSONL")
    data.add_argument("--procedural", type=int, default=200, help="N held-out procedural problems (default)")
    ap.add_argument("--preset", choices=sorted(countdown.PRESETS), default="tiny", help="distribution of --procedural")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", help="write the metrics of every model here")
    ap.add_argument("--plot", nargs="+", metavar="METRICS_JSONL", help="plot training curves instead")
    ap.add_argument("--out", default="curves.png", help="PNG file for --plot")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot, args.out)
    if not args.model:
        ap.error("give --model DIR (or --plot FILES)")
    if args.samples < 1 or (args.samples > 1 and args.temperature == 0):
        ap.error("--samples K > 1 needs --temperature > 0 (greedy samples are all the same)")
    try:
        for path in args.model:
            check_model_path(path)
        problems = countdown.load_problems(args.data) if args.data else countdown.heldout_problems(args.procedural, args.preset)
    except ValueError as e:
        ap.error(str(e))
    results = {}
    for path in args.model:
        results[path] = evaluate(load_model(path), load_tokenizer(path), problems, samples=args.samples,
                                 temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, progress=True)
    source = args.data or f"{args.procedural} held-out procedural problems"
    print(f"{source}, {args.samples} sample(s) each, temperature {args.temperature}\n")
    print("| metric | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for key in KEYS:
        print(f"| {key.replace('_at_k', f'@{args.samples}')} | " + " | ".join(f"{r[key]:.3f}" for r in results.values()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
