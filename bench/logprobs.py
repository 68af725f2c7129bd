"""Peak memory and time of forward+backward of the taken-token log-probs: the old formulation
(full [rows, T, vocab] logits, then logsumexp and gather) against forward.sequence_logprobs (LM head
on response positions only, a chunk at a time, recomputed in backward). CPU, fp32, no autocast.

    python bench/logprobs.py          # ~5 minutes on 2 shared cores

Model: a Qwen2-shaped transformers LM with the real vocabulary (151,936), hidden size 64, 2
layers, tied embeddings, fp32, no autocast: the LM head's logits dominate memory, as in a real
RL step. Batch: random tokens, 900 prompt + 1,024 response tokens per row; the loss is the sum
of the response log-probs. "Peak memory" is the growth above what was held before the pass
(weights, inputs): the peak of forward+backward itself, weight gradients included.

Rows of the table:
  fake-tensor tracker  torch's MemTracker under FakeTensorMode: every tensor's bytes are counted
                       as it is created and freed, but nothing is allocated and nothing computed
                       (so no time). This is how the old formulation is measured at the full size
                       (8 rows): it holds ~5 fp32 logits-sized tensors of 9.35 GB at once, twice
                       what this 24 GiB machine has (an OOM kill would take other agents'
                       processes with it), so it is never run for real at that size.
  real RSS             a fresh subprocess builds the model and batch, resets its RSS high-water
                       mark (/proc/self/clear_refs), runs forward+backward and reads VmHWM. At 1
                       row both formulations run for real (the old one only if the tracker's
                       prediction fits 1.5 times in MemAvailable, ~9 GB): the tracker rows at the
                       same size validate the tracker ("tracker / real RSS" line).
  seconds              at 1 row, best of 3 with old and new alternating in one process, so that
                       the load of the shared cores hits both alike; at 8 rows, one pass.
Then: the validation ratios, the new / old time at 1 row, the max |diff| of log-probs and weight
gradients between the two on a small batch whose response spans 3 chunks (LOGIT_CHUNK_BYTES
lowered for it), and last the old / new ratio of the tracker's peaks at the full size.
Imports: torch, transformers, grpo (sequence_logprobs, LOGIT_CHUNK_BYTES).
"""
import json
import pathlib
import re
import subprocess
import sys
import time
import warnings

import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import forward  # noqa: E402
from forward import sequence_logprobs  # noqa: E402

VOCAB, PROMPT, RESPONSE, FULL_ROWS, REAL_ROWS = 151_936, 900, 1_024, 8, 1
CONFIG = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
GB = 1e9


def old_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """The formulation before issue 12: logits at every position, fp32, then logsumexp and gather."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, :-1].float()
    lse = logits.logsumexp(-1)
    taken = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse
    return torch.nn.functional.pad(taken, (1, 0)) * response_mask


FORMULATIONS = {"old": lambda model, batch, start: old_sequence_logprobs(model, *batch),
                "new": lambda model, batch, start: sequence_logprobs(model, *batch, start=start).logp}


def make_batch(rows, prompt=PROMPT, response=RESPONSE):
    """A fresh model, `rows` rows of [prompt | response] random tokens (no padding), and the first
    response column (given, not derived from the mask, which fake tensors cannot read)."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(CONFIG)
    ids = torch.randint(VOCAB, (rows, prompt + response))
    response_mask = torch.zeros(ids.shape)
    response_mask[:, prompt:] = 1
    return model, (ids, torch.ones_like(ids), response_mask), prompt


def forward_backward(name, model, batch, start):
    model.zero_grad(set_to_none=True)
    began = time.perf_counter()
    FORMULATIONS[name](model, batch, start).sum().backward()
    return time.perf_counter() - began


def tracked_peak(name, rows):
    """Peak bytes above the pre-pass level, counted by MemTracker on fake tensors (no allocation)."""
    warnings.filterwarnings("ignore", "Module is None")  # ModTracker, about checkpoint's recomputed head
    with FakeTensorMode(), MemTracker() as tracker:
        model, batch, start = make_batch(rows)
        before = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        forward_backward(name, model, batch, start)
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before


def status_bytes(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024


def child(names, rows, passes):
    """In a fresh process: the real peak RSS growth over all passes (meaningful with one formulation
    per process) and each formulation's best time over `passes` rounds."""
    model, batch, start = make_batch(rows)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, model building not counted
    before = status_bytes("VmRSS")
    seconds = {name: [] for name in names}
    for _ in range(passes):
        for name in names:
            seconds[name].append(forward_backward(name, model, batch, start))
    print(json.dumps({"peak": status_bytes("VmHWM") - before, "seconds": {name: min(s) for name, s in seconds.items()}}))


def run_child(names, rows, passes):
    out = subprocess.run([sys.executable, __file__, "--child", ",".join(names), str(rows), str(passes)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def max_gradient_diff():
    """Old and new on 2 small rows (one left-padded, one response right-padded), the response in
    3 chunks of the new formulation: max |diff| of the log-probs and of every weight's gradient."""
    model, batch, start = make_batch(2, prompt=30, response=20)
    _, attention, response_mask = batch
    attention[1, :4], response_mask[1, -5:] = 0, 0
    results, chunk_bytes = [], forward.LOGIT_CHUNK_BYTES
    forward.LOGIT_CHUNK_BYTES = 4 * 2 * VOCAB * 8  # chunks of 8 positions
    try:
        for name in FORMULATIONS:
            model.zero_grad(set_to_none=True)
            logp = FORMULATIONS[name](model, batch, start)
            (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()  # unequal weights per token
            results.append([logp.detach()] + [p.grad.clone() for p in model.parameters()])
    finally:
        forward.LOGIT_CHUNK_BYTES = chunk_bytes
    return max((a - b).abs().max().item() for a, b in zip(*results))


def main():
    full, real = f"{FULL_ROWS} x ({PROMPT} + {RESPONSE})", f"{REAL_ROWS} x ({PROMPT} + {RESPONSE})"
    tracked = {(name, rows): tracked_peak(name, rows) for name in FORMULATIONS for rows in (FULL_ROWS, REAL_ROWS)}
    # the old formulation's real run is gated on the tracker's prediction, never risked blind
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", pathlib.Path("/proc/meminfo").read_text()).group(1)) * 1024
    if tracked["old", REAL_ROWS] * 1.5 > available:
        sys.exit(f"only {available / GB:.1f} GB available, the old formulation at {real} needs "
                 f"~{tracked['old', REAL_ROWS] / GB:.1f} GB: not running it")
    rss = {name: run_child([name], REAL_ROWS, 1)["peak"] for name in FORMULATIONS}
    seconds = run_child(list(FORMULATIONS), REAL_ROWS, 3)["seconds"]
    full_new = run_child(["new"], FULL_ROWS, 1)
    print("| formulation | rows x (prompt + response) | method | peak memory GB | forward+backward s |")
    print("|---|---|---|---:|---:|")
    for name in FORMULATIONS:
        print(f"| {name} | {full} | fake-tensor tracker | {tracked[name, FULL_ROWS] / GB:.2f} | - |")
    print(f"| new | {full} | real RSS | {full_new['peak'] / GB:.2f} | {full_new['seconds']['new']:.2f} (1 pass) |")
    for name in FORMULATIONS:
        print(f"| {name} | {real} | fake-tensor tracker | {tracked[name, REAL_ROWS] / GB:.2f} | - |")
        print(f"| {name} | {real} | real RSS | {rss[name] / GB:.2f} | {seconds[name]:.2f} (best of 3) |")
    print(f"\ntracker / real RSS: old {real} {tracked['old', REAL_ROWS] / rss['old']:.2f}, new {real} "
          f"{tracked['new', REAL_ROWS] / rss['new']:.2f}, new {full} {tracked['new', FULL_ROWS] / full_new['peak']:.2f} "
          "(on fake tensors SDPA takes its math path and holds the attention weights, ~0.2 GB at 8 rows, that "
          "the real fused CPU kernel never materialises: the tracker over-counts both formulations by that)")
    print(f"time new / old at {real}: {seconds['new'] / seconds['old']:.2f}")
    print(f"old vs new, 2 rows x (30 + 20), values and weight gradients: max |diff| = {max_gradient_diff():.1e}")
    print(f"peak-memory ratio: {tracked['old', FULL_ROWS] / tracked['new', FULL_ROWS]:.2f}x")

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
