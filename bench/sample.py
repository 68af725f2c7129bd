"""CPU tokens/s of sample.generate against transformers' model.generate, side by side (GPU: bench/gpu.py).

    python bench/sample.py [--threads 1] [--repeats 3]

Same model (the built-in tiny Qwen2, random weights), same settings and thread count for all.
(a) 64 prompts x 256 new tokens, sampling, no early stop;
(b) one 1,000-token prompt x 16 samples x 128 new tokens (we prefill once, generate 16 times);
each with our sampler and model.generate. (c) a GRPO-shaped batch (8 prompts x 8 samples) whose
samples stop at different lengths: ours with finished rows leaving the batch vs with them kept
(the gain of shrinking). Last, our sampler against the floor: bare decode steps (forward +
argmax) over the same cache, without the sampler's bookkeeping.
Timings are the best of --repeats rounds; each round runs every contender once, in turn, so
load from other processes hits them alike.
"""
import argparse
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from model import cache_keyword, new_tiny_model  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def best_of(repeats, contenders):
    """{name: best seconds}, {name: last result}; contenders run round-robin."""
    times, results = {name: [] for name in contenders}, {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    return {name: min(t) for name, t in times.items()}, results


def prompts_of(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, 100, (length + i % 7,), generator=g).tolist() for i in range(n)]


def transformers_generate(lm, prompts, new, samples=1):
    ids, mask = sample._left_pad(prompts, 0, "cpu")
    return lm.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0,
                       num_return_sequences=samples, pad_token_id=0, eos_token_id=None)


@torch.no_grad()
def floor(lm, prompts, new):
    """Bare decode steps: prefill, then `new` greedy steps of the Decoder, nothing else."""
    ids, mask = sample._left_pad(prompts, 0, "cpu")
    width = ids.shape[1]
    out = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
             logits_to_keep=1)
    prompt_cache = getattr(out, cache_keyword(lm))
    decoder = sample.decoder_for(lm, prompt_cache, len(prompts), width + new)
    decoder.start(prompt_cache, 1, width - mask.sum(-1), out.logits[:, -1].argmax(-1))
    for step in range(new):
        decoder.step(len(prompts), width + step + 1, None, 0, 0, 1.0, graphed=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = new_tiny_model(seed=0).eval()

    def ours(p, new, samples=1):
        return lambda: sample.generate(lm, p, new, num_samples=samples, generator=torch.Generator().manual_seed(0))
    cases = [("(a) 64 prompts x 256 tokens", prompts_of(64, 24, 0), 256, 1),
             ("(b) 1,000-token prompt x 16 x 128", prompts_of(1, 1000, 1), 128, 16)]
    print(f"torch threads: {args.threads}\n")
    print("| case | ours tok/s | model.generate tok/s | ours vs generate |\n|---|---|---|---|")
    for name, p, new, samples in cases:
        best, _ = best_of(args.repeats, {"ours": ours(p, new, samples),
                                         "generate": lambda: transformers_generate(lm, p, new, samples)})
        tokens = len(p) * samples * new
        print(f"| {name} | {tokens / best['ours']:,.0f} | {tokens / best['generate']:,.0f} | "
              f"{best['generate'] / best['ours']:.2f}x |")

    # (c) early stops: EOS is a common token of this random model, so lengths spread out
    p = prompts_of(8, 24, 2)

    def grpo_batch():  # one generator per prompt: the samples do not depend on the batch's shape
        gens = [torch.Generator().manual_seed(4 + i) for i in range(len(p))]
        return sample.sample(lm, p, 256, num_samples=8, eos_token_id=7, generator=gens)

    def kept():
        keep_fraction, sample.LEAVE_FRACTION = sample.LEAVE_FRACTION, 2.0  # rows never leave
        try:
            return grpo_batch()
        finally:
            sample.LEAVE_FRACTION = keep_fraction
    best, out = best_of(args.repeats, {"shrink": grpo_batch, "keep": kept})
    assert out["shrink"].tokens == out["keep"].tokens
    lengths = sorted(len(t) for t in out["shrink"].tokens)
    print(f"\n(c) 8 prompts x 8 samples, max 256, lengths min/median/max {lengths[0]}/{lengths[32]}/{lengths[-1]}: "
          f"{best['shrink']:.2f}s with finished rows leaving the batch, {best['keep']:.2f}s keeping them "
          f"({best['keep'] / best['shrink']:.2f}x)")

    p = prompts_of(64, 24, 0)
    best, _ = best_of(args.repeats, {"ours": ours(p, 256), "bare": lambda: floor(lm, p, 256)})
    print(f"decode, 64 rows x 256 steps: {1e3 * best['ours'] / 256:.2f} ms/step ours, {1e3 * best['bare'] / 256:.2f} "
          f"ms/step bare steps over the same cache (the floor): overhead {best['ours'] / best['bare'] - 1:+.0%}")


if __name__ == "__main__":
    main()
