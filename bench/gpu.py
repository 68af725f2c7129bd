"""Rollouts and one RL step at GPU speed, on a Qwen2.5-1.5B-shaped random model built here (the
real 151,936-token vocabulary, bf16; nothing downloaded). One table, on whatever GPU it finds:

    python bench/gpu.py                        # ~7 minutes on one H200; refuses in one line without a GPU
    python bench/gpu.py --contenders graphs    # ~2 minutes: our CUDA graphs only

Decoding, three cases: (a) 64 prompts x 256 new tokens, (b) one 1,000-token prompt x 16 samples
x 128, (c) 8 prompts x G=8 x 1,024 (a GRPO step's rollouts); sampling at temperature 1, no EOS,
so every row runs to the end. Contenders: our sampler eager (cuda_graphs=False: each step's
kernels launched from Python), ours replaying CUDA graphs of our own decode step
(llama_step.logits), ours replaying CUDA graphs of the model's forward (sample.OWN_STEP =
False), and transformers' model.generate.
Columns: tokens/s, ms per decode step (the call's time / new tokens), the first call's seconds
(graphs: their captures included), peak memory. Time per call: the best of the first and two
more ((c): one more with graphs, none without: those take ~90 s a call). Then greedy tokens
against model.generate and against our eager steps, in bf16 (the embeddings are scaled up so
that greedy choices are not near-ties that bf16 rounding flips; our step rounds in other places
than transformers' forward: fused RMSNorm, the residual added inside the matmul) and in fp32. Last, two `rl_step`s of `--mode clipo --bf16 --grad-checkpointing` (8
prompts x G=8 x 1,024 new tokens, LongProc prompts) with their breakdown (every time_* waits
for the GPU) and the training passes' model FLOPs utilisation: 6 x parameters x tokens (prompt
once per group, as the prompt-shared forward runs it, plus responses) per second of the update,
against the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
"""
import argparse
import gc
import json
import os
import pathlib
import random
import sys
import tempfile
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import countdown  # noqa: E402
import rl  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from distributed import clock  # noqa: E402
from model import encode_prompt  # noqa: E402
from problems import PRESETS, random_problem  # noqa: E402
from run import build_run  # noqa: E402
from tests.qwen_like import save_tokenizer  # noqa: E402

PEAK_BF16 = 989e12  # H100 / H200 SXM, dense
CASES = [("(a) 64 prompts x 256", 64, 24, 1, 256), ("(b) 1,000-token prompt x 16 x 128", 1, 1000, 16, 128),
         ("(c) 8 prompts x 8 x 1,024", 8, 200, 8, 1024)]  # name, prompts, prompt length, samples, new tokens


def qwen_1_5b_shaped(device):
    """Qwen2.5-1.5B's shapes (28 layers, hidden 1536, MLP 8960, 12 query / 2 key-value heads,
    tied embeddings), random weights, bf16."""
    config = Qwen2Config(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=151_643, eos_token_id=151_645, pad_token_id=151_643)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # peaked next-token distributions: greedy choices are not near-ties
        model.get_input_embeddings().weight.mul_(5)
    return model


def prompts_of(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151_000, (length + i % 7,), generator=g).tolist() for i in range(n)]


def ours(model, prompts, new, samples, graphs, temperature=1.0, own=True):
    if sample.OWN_STEP != own:  # decoders made for the other step are made anew
        sample.OWN_STEP = own
        sample._DECODERS.clear()
    return sample.generate(model, prompts, new, num_samples=samples, temperature=temperature, cuda_graphs=graphs,
                           generator=torch.Generator(model.device).manual_seed(0))


def theirs(model, prompts, new, samples, temperature=1.0):
    ids, mask = sample._left_pad(prompts, 151_643, model.device)
    drawing = dict(do_sample=True, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, num_return_sequences=samples,
                         pad_token_id=151_643, eos_token_id=None, **drawing)
    return out[:, ids.shape[1]:].tolist()


def timed(fn):
    torch.cuda.reset_peak_memory_stats()
    start = clock(torch.device("cuda"))
    result = fn()
    return clock(torch.device("cuda")) - start, torch.cuda.max_memory_allocated() / 2 ** 30, result


def decoding(model, which):
    print("| case | contender | tokens/s | ms per step | first call s | peak GiB |\n|---|---|---|---|---|---|")
    for name, n, length, samples, new in CASES:
        prompts = prompts_of(n, length, 1)
        contenders = {"eager": ("ours, eager", lambda: ours(model, prompts, new, samples, False)),
                      "graphs": ("ours, CUDA graphs", lambda: ours(model, prompts, new, samples, True)),
                      "graphs-hf": ("ours, CUDA graphs of the model's forward",
                                    lambda: ours(model, prompts, new, samples, True, own=False)),
                      "generate": ("model.generate", lambda: theirs(model, prompts, new, samples))}
        for contender, fn in (contenders[key] for key in which):
            try:
                first, peak, _ = timed(fn)
                again = 2 if new <= 256 else int("graphs" in contender)  # (c): ~90 s a call without graphs
                best = min([first] + [timed(fn)[0] for _ in range(again)])
                tokens = n * samples * new
                print(f"| {name} | {contender} | {tokens / best:,.0f} | {1e3 * best / new:.2f} | {first:.1f} | "
                      f"{peak:.1f} |", flush=True)
            except Exception as e:  # one contender failing must not cost the rest of the lease
                print(f"| {name} | {contender} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | |",
                      flush=True)


def greedy_agreement(model):
    prompts = prompts_of(64, 24, 2)
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)
        graphed = ours(model, prompts, 64, 1, True, temperature=0)
        for name, other in (("model.generate", theirs(model, prompts, 64, 1, temperature=0)),
                            ("our eager steps", ours(model, prompts, 64, 1, False, temperature=0))):
            same = sum(a == b for a, b in zip(graphed, other))
            first = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), 64) for a, b in zip(graphed, other)]
            print(f"greedy, {str(dtype)[6:]}, 64 prompts x 64 tokens, CUDA graphs vs {name}: {same}/64 rows equal "
                  f"(mean first difference at token {sum(first) / len(first):.1f})", flush=True)
    model.to(torch.bfloat16)


def rl_steps(model_dir):
    args = train.parse_args(["--mode", "clipo", "--model", model_dir, "--prompt", "longproc", "--preset", "longproc",
                             "--bf16", "--grad-checkpointing", "--prompts-per-step", "8", "--group-size", "8",
                             "--max-new-tokens", "1024", "--clipo-warmup", "0",
                             "--max-sample-rounds", "1",  # a random model's groups carry no signal: 1 round, not 4
                             "--out",
                             tempfile.mkdtemp(prefix="gpu-bench-")])
    t = time.perf_counter()
    run, _ = build_run(args, 0, 1, torch.device("cuda"))
    print(f"\nrl_step: --mode clipo --bf16 --grad-checkpointing, 8 prompts x G=8 x 1,024 new tokens "
          f"(run built in {time.perf_counter() - t:.0f} s)")
    params = sum(p.numel() for p in run.model.parameters())
    problems = [random_problem(random.Random(i), **PRESETS["longproc"])
                for i in range(8)]
    prompt_tokens = sum(len(encode_prompt(run.tokenizer, countdown.prompt(p, "longproc"), chat=True))
                        for p in problems) / 8
    print("| step | rollouts s | of which sample() s | old pass s | scoring s | update s | tokens/s sampled | "
          "response length | update MFU | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    sampling = []  # seconds inside sample() itself, of the rollout stage's
    inner = rl.sample

    def timed_sample(*args, **kwargs):
        start = clock(torch.device("cuda"))
        out = inner(*args, **kwargs)
        sampling.append(clock(torch.device("cuda")) - start)
        return out
    rl.sample = timed_sample
    for step in range(2):
        torch.cuda.reset_peak_memory_stats()
        row = rl.rl_step(run, step)
        tokens = 8 * prompt_tokens + 64 * row["response_length_mean"]
        flops = 6 * params * tokens * args.ppo_epochs
        print(f"| {step + 1} | {row['time_sample']:.2f} | {sampling[-1]:.2f} | {row['time_train'] - row['time_update']:.2f} | "
              f"{row['time_reward']:.2f} | {row['time_update']:.2f} | {row['tokens_per_s']:,.0f} | "
              f"{row['response_length_mean']:.0f} | {flops / row['time_update'] / PEAK_BF16:.1%} | "
              f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", nargs="+", choices=("eager", "graphs", "graphs-hf", "generate"),
                    default=["eager", "graphs", "graphs-hf", "generate"],
                    help="decoding contenders to run (all: ~5 minutes)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py measures CUDA decoding and training: no CUDA GPU here (CPU speed: bench/sample.py)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}\n")
    model = qwen_1_5b_shaped("cuda")
    decoding(model, args.contenders)
    greedy_agreement(model)
    model_dir = tempfile.mkdtemp(prefix="qwen-1.5b-shaped-")
    model.save_pretrained(model_dir)  # bf16 on disk; build_run loads fp32 master weights from it
    print(f"\ntokenizer: {save_tokenizer(model_dir)}")
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [151_645, 151_643], "pad_token_id": 151_643}, f)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    rl_steps(model_dir)


if __name__ == "__main__":
    main()
