"""Per-GPU memory of the recommended 8-GPU commands, computed from the model shapes (no GPU here).

    python bench/gpu_memory.py                 # Qwen2.5-1.5B and -7B, DDP vs FSDP2, 8 x 80 GB
    python bench/gpu_memory.py --gpus 16       # two nodes

The run (docs/real-checkpoints.md): 64 prompts x G=8 per step over the GPUs, prompts
of ~900 tokens (chat template + LongProc instruction and worked example), up to 1,024 new
tokens, micro-batch 8, --bf16 --grad-checkpointing. With P parameters, per GPU:
  weights    fp32 master weights: 4P (DDP), 4P / gpus (FSDP2)
  gradients  fp32: 4P (DDP), 4P / gpus (FSDP2 reduce-scatters every micro-batch: fp32 shards)
  optimizer  AdamW's two fp32 moments: 8P (DDP), 8P / gpus (FSDP2)
  rollout    the bf16 copy rollouts sample from: 2P (full on every GPU in both)
  gathered   FSDP2 only: two decoder layers' bf16 weights gathered at once (this and the next)
  activations  with activation checkpointing: every layer's input kept (micro x T x hidden; fp32
             under DDP's autocast, bf16 under FSDP2's bf16 parameters), one layer's recompute
             (MLP: ~3 x micro x T x intermediate, attention ~4 x micro x T x hidden, bf16), and
             the LM head's logit chunks (forward.LOGIT_CHUNK_BYTES, ~3 alive)
  KV cache   rollouts: rows x T x layers x 2 x kv_heads x head_dim, bf16
Framework overheads (CUDA context, allocator fragmentation, NCCL buffers: a few GB) are not in it.
The shapes are the published configs of Qwen2.5-1.5B-Instruct and Qwen2.5-7B-Instruct.
"""
import argparse

GB = 1e9
MODELS = {  # hidden, layers, heads, kv heads, head dim, intermediate, vocab, tied embeddings
    "Qwen2.5-1.5B": dict(hidden=1536, layers=28, heads=12, kv=2, head_dim=128, inter=8960, vocab=151936, tied=True),
    "Qwen2.5-7B": dict(hidden=3584, layers=28, heads=28, kv=4, head_dim=128, inter=18944, vocab=152064, tied=False),
}
LOGIT_CHUNKS = 3 * 2 ** 28  # fp32 logits, their gradient and the bf16 head output of one chunk


def parameters(m):
    attention = m["hidden"] * m["heads"] * m["head_dim"] * 2 + 2 * m["hidden"] * m["kv"] * m["head_dim"] \
        + (m["heads"] + 2 * m["kv"]) * m["head_dim"]  # q, o, k, v and the q/k/v biases
    layer = attention + 3 * m["hidden"] * m["inter"] + 2 * m["hidden"]
    embeddings = m["vocab"] * m["hidden"] * (1 if m["tied"] else 2)
    return m["layers"] * layer + embeddings + m["hidden"], layer


def per_gpu(m, sharded, gpus, prompts, group, prompt_tokens, new_tokens, micro):
    total, layer = parameters(m)
    shard = gpus if sharded else 1
    tokens = prompt_tokens + new_tokens
    rows = prompts * group // gpus
    act_bytes = 2 if sharded else 4
    saved = m["layers"] * micro * tokens * m["hidden"] * act_bytes
    recompute = (3 * micro * tokens * m["inter"] + 4 * micro * tokens * m["hidden"]) * 2
    return {"weights": 4 * total / shard, "gradients": 4 * total / shard, "optimizer": 8 * total / shard,
            "rollout copy": 2 * total, "gathered layers": 2 * 2 * layer if sharded else 0,
            "activations": saved + recompute + LOGIT_CHUNKS,
            "KV cache": rows * tokens * m["layers"] * 2 * m["kv"] * m["head_dim"] * 2}, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--memory", type=float, default=80.0, help="GB per GPU")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=900)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for name, shape in MODELS.items():
        for sharded in (False, True):
            parts, total = per_gpu(shape, sharded, args.gpus, args.prompts, args.group, args.prompt_tokens,
                                   args.new_tokens, args.micro)
            rows.append((f"{name} ({total / 1e9:.2f}B)", "FSDP2" if sharded else "DDP", parts))
    keys = list(rows[0][2])
    print(f"per-GPU memory, GB: {args.gpus} GPUs x {args.memory:.0f} GB, {args.prompts} prompts x G={args.group}, "
          f"{args.prompt_tokens} + {args.new_tokens} tokens, micro-batch {args.micro}\n")
    print("| model | setup | " + " | ".join(keys) + " | total | fits? |")
    print("|---|---|" + "---|" * (len(keys) + 2))
    for name, setup, parts in rows:
        total = sum(parts.values()) / GB
        print(f"| {name} | {setup} | " + " | ".join(f"{v / GB:.1f}" for v in parts.values())
              + f" | **{total:.1f}** | {'yes' if total < args.memory * 0.9 else 'no'} |")


if __name__ == "__main__":
    main()
