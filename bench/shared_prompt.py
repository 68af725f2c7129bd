"""Forward+backward of the taken-token log-probs with each group's prompt run once (shared:
forward.sequence_logprobs(..., groups=...)) against the plain forward that runs it once per row.
CPU, fp32, no autocast, no activation checkpointing, one thread by default: on cores shared with
other jobs, a 2-thread pass waits at every op for whichever thread was descheduled, so its time
measures the load more than the work (--threads 2 on a quiet machine).

    python bench/shared_prompt.py                          # ~7 minutes on 2 cores shared with other jobs
    python bench/shared_prompt.py --rounds 1 --threads 2   # quicker, noisier

Batch: one prompt group, G = 8 rows of 900 prompt + up to 500 response random tokens (a LongProc
micro-batch: ~900-token chat prompt, ~500-token responses); the loss is the sum of the response
log-probs. Two layouts: "equal" (every response 500 tokens: no padding, so the plain forward's
attention takes SDPA's causal fast path) and "ragged" (responses of 281..500 tokens, right-padded,
as real rollouts are: both forwards then pass an explicit mask).
Models: the built-in tiny Qwen2 (hidden 128, 4 layers: attention is most of its work at these
lengths) and a wider random Qwen2 shaped like a Qwen2.5 layer (hidden 512, 8 heads of 64, 2 KV
heads, MLP 2,816 = Qwen2.5's 5.5x ratio; 2 layers; vocabulary 101, so the LM head, the same work
in both forwards, is negligible).
Columns: seconds = best of --rounds passes, plain and shared alternating in one process (the
load of the shared cores hits both alike); peak MB = growth of the resident set (VmHWM) over one
pass in a fresh process, above the model and batch (equal layout only). The ideal speed-up is
the ratio of token positions run: 8 x 1400 / (900 + 8 x 500) = 2.29x.
Last lines: the largest gap between shared and plain (tiny, ragged), over the log-probs and each
weight's gradient, relative to that tensor's largest entry (fp32 rounding: ~1e-6), then
`shared-prompt speed-up: N.NNx` (the wider model, equal layout).
Imports: torch, transformers, grpo (sequence_logprobs), model (new_tiny_model).
"""
import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from forward import sequence_logprobs  # noqa: E402
from model import new_tiny_model  # noqa: E402

PROMPT, RESPONSE, GROUP = 900, 500, 8
MB = 2 ** 20


def build(name):
    torch.manual_seed(0)
    if name == "tiny":
        return new_tiny_model()
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=101, hidden_size=512, intermediate_size=2816, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                        max_position_embeddings=2048))


def make_batch(vocab, layout):
    """G rows [prompt | response | right pad] answering one prompt; groups all 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (1, PROMPT + RESPONSE), generator=g).repeat(GROUP, 1)
    ids[:, PROMPT:] = torch.randint(4, vocab, (GROUP, RESPONSE), generator=g)
    attention = torch.ones_like(ids)
    for i in range(GROUP if layout == "ragged" else 0):
        attention[i, PROMPT + RESPONSE * (i + 1) // (2 * GROUP) + RESPONSE // 2:] = 0  # 281..500 tokens
    response = attention.float()
    response[:, :PROMPT] = 0
    return ids, attention, response, torch.zeros(GROUP, dtype=torch.long)


def forward_backward(lm, batch, shared):
    """Seconds of one pass, its log-probs and the weight gradients."""
    ids, attention, response, groups = batch
    lm.zero_grad(set_to_none=True)
    began = time.perf_counter()
    logp = sequence_logprobs(lm, ids, attention, response, start=PROMPT, groups=groups if shared else None).logp
    logp.sum().backward()
    return time.perf_counter() - began, logp.detach(), [p.grad for p in lm.parameters()]


def status_bytes(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024


def child(name, shared, threads):
    """In a fresh process: the resident-set growth of one pass (printed as JSON)."""
    torch.set_num_threads(threads)
    lm = build(name)
    batch = make_batch(lm.config.vocab_size, "equal")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: model and batch not counted
    before = status_bytes("VmRSS")
    forward_backward(lm, batch, shared)
    print(json.dumps({"peak": status_bytes("VmHWM") - before}))


def peak(name, shared, threads):
    out = subprocess.run([sys.executable, __file__, "--child", name, str(int(shared)), str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def main(rounds, threads):
    torch.set_num_threads(threads)
    print("| model | responses | plain s | shared s | speed-up | plain peak MB | shared peak MB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    speed, diff = {}, None
    for name in ("tiny", "wide"):
        lm = build(name)
        memory = {shared: peak(name, shared, threads) for shared in (False, True)}
        for layout in ("equal", "ragged"):
            batch = make_batch(lm.config.vocab_size, layout)
            best = {False: float("inf"), True: float("inf")}
            for r in range(rounds):
                results = {}
                for shared in (False, True):
                    seconds, logp, grads = forward_backward(lm, batch, shared)
                    best[shared] = min(best[shared], seconds)
                    results[shared] = [logp] + [g.clone() for g in grads]
                if name == "tiny" and layout == "ragged" and r == 0:
                    diff = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*results.values()))
            speed[name, layout] = best[False] / best[True]
            mem = (f"{memory[False] / MB:.0f} | {memory[True] / MB:.0f} | {memory[False] / memory[True]:.2f}x"
                   if layout == "equal" else "- | - | -")
            print(f"| {name} | {layout} | {best[False]:.2f} | {best[True]:.2f} | {speed[name, layout]:.2f}x | {mem} |")
    print(f"\nshared vs plain (tiny, ragged), log-probs and each weight's gradient: "
          f"max |diff| / max |plain| = {diff:.1e}")
    print(f"shared-prompt speed-up: {speed['wide', 'equal']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], bool(int(sys.argv[3])), int(sys.argv[4]))
    else:
        ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        ap.add_argument("--rounds", type=int, default=2, help="timed passes of each forward (best counts)")
        ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1), help="torch threads")
        args = ap.parse_args()
        main(args.rounds, args.threads)
