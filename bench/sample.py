"""Tokens/s of sample.generate against transformers' model.generate, side by side in one run.

    python bench/sample.py [--threads 1]

Same model (the built-in tiny Qwen2, random weights), same settings and thread count for both.
(a) 64 prompts x 256 new tokens, sampling, no early stop;
(b) one 1,000-token prompt x 16 samples x 128 new tokens (we prefill once, generate 16 times);
(c) a GRPO-shaped batch (8 prompts x 8 samples) whose samples stop at different lengths:
    ours with finished rows leaving the batch vs ours with them kept (the gain of shrinking);
plus our decode step against the floor: bare model forwards over the same reserved cache.
Each timing is the best of --repeats runs.
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from model import new_tiny_model  # noqa: E402


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def prompts_of(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, 100, (length + i % 7,), generator=g).tolist() for i in range(n)]


def transformers_generate(lm, prompts, new, samples=1):
    ids, mask = sample._left_pad(prompts, 0, "cpu")
    return lm.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0,
                       num_return_sequences=samples, pad_token_id=0, eos_token_id=None)


def floor(lm, prompts, new):
    """Bare forwards: prefill, then `new` single-token steps over the same reserved cache."""
    ids, mask = sample._left_pad(prompts, 0, "cpu")
    width = ids.shape[1]
    attention = torch.ones((len(prompts), width + new), dtype=torch.long)
    cache = sample.reserved_cache(lm, width + new)
    with torch.no_grad():
        lm(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = ids[:, -1:]
        for step in range(new):
            lm(input_ids=token, attention_mask=attention[:, :width + step + 1],
               position_ids=torch.full((len(prompts), 1), width + step), past_key_values=cache, use_cache=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = new_tiny_model(seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    rows = []

    p = prompts_of(64, 24, 0)
    ours, _ = best_of(args.repeats, lambda: sample.generate(lm, p, 256, generator=gen))
    theirs, _ = best_of(args.repeats, lambda: transformers_generate(lm, p, 256))
    rows.append(("(a) 64 prompts x 256 tokens", 64 * 256, ours, theirs))

    p = prompts_of(1, 1000, 1)
    ours, _ = best_of(args.repeats, lambda: sample.generate(lm, p, 128, num_samples=16, generator=gen))
    theirs, _ = best_of(args.repeats, lambda: transformers_generate(lm, p, 128, samples=16))
    rows.append(("(b) 1,000-token prompt x 16 x 128", 16 * 128, ours, theirs))

    print(f"torch threads: {args.threads}\n")
    print("| case | ours tok/s | model.generate tok/s | speed-up |\n|---|---|---|---|")
    for name, tokens, ours, theirs in rows:
        print(f"| {name} | {tokens / ours:,.0f} | {tokens / theirs:,.0f} | {theirs / ours:.2f}x |")

    # (c) early stops: EOS is a common token of this random model, so lengths spread out
    p = prompts_of(8, 24, 2)
    eos = 7

    def grpo_batch():  # one generator per prompt: the samples do not depend on the batch's shape
        gens = [torch.Generator().manual_seed(4 + i) for i in range(len(p))]
        return sample.sample(lm, p, 256, num_samples=8, eos_token_id=eos, generator=gens)
    shrink, ro = best_of(args.repeats, grpo_batch)
    keep_fraction, sample.LEAVE_FRACTION = sample.LEAVE_FRACTION, 2.0  # rows never leave
    keep, ro_kept = best_of(args.repeats, grpo_batch)
    sample.LEAVE_FRACTION = keep_fraction
    assert ro.tokens == ro_kept.tokens
    lengths = sorted(len(t) for t in ro.tokens)
    print(f"\n(c) 8 prompts x 8 samples, max 256, lengths min/median/max {lengths[0]}/{lengths[32]}/{lengths[-1]}: "
          f"{shrink:.2f}s with finished rows leaving the batch, {keep:.2f}s keeping them ({keep / shrink:.2f}x)")

    p = prompts_of(64, 24, 0)
    ours, _ = best_of(args.repeats, lambda: sample.generate(lm, p, 256, generator=gen))
    bare, _ = best_of(args.repeats, lambda: floor(lm, p, 256))
    print(f"decode, 64 rows x 256 steps: {1e3 * ours / 256:.2f} ms/step ours, {1e3 * bare / 256:.2f} ms/step bare "
          f"forwards over the same cache (the floor): overhead {ours / bare - 1:+.0%}")


if __name__ == "__main__":
    main()
