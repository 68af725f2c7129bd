"""The SFT warm start: a model learns the written searches of generated problems.

    python train.py --mode sft                      # the built-in tiny model, from scratch (~8 min, 2 cores)
    python train.py --mode sft --seed 1 --out runs/sft-seed1

train.py runs the loop; this file holds the mode's data and step. The tiny model learns the
compact trace (countdown.search_trace(..., style="compact")) after the bare prompt; a chat
model (--prompt longproc) learns LongProc's demonstration after its chat-templated prompt.
Imports: countdown, grpo, model, distributed, torch.
"""
import random
import time

import torch

import countdown
import grpo
from distributed import all_reduce, seed_for
from model import encode_prompt


def sft_pool(args, pool_index, rank, world, tokenizer, exclude):
    """Four batches of this rank's SFT examples (prompt ids, completion ids), sorted by length so
    each batch pads little; a pure function of (seed, pool_index, rank)."""
    rng = random.Random(seed_for(args.seed, "sft", pool_index, rank))
    per_rank = args.batch_size // world
    style = "compact" if args.prompt == "bare" else "longproc"
    pool = []
    for _ in range(4 * per_rank):
        p = countdown.random_problem(rng, exclude=exclude, **countdown.PRESETS[args.preset])
        pool.append((encode_prompt(tokenizer, countdown.prompt(p, args.prompt), chat=args.prompt == "longproc"),
                     tokenizer.encode(countdown.search_trace(*p, style=style)) + [tokenizer.eos_token_id]))
    pool.sort(key=lambda x: len(x[0]) + len(x[1]))
    batches = [pool[k * per_rank:(k + 1) * per_rank] for k in range(4)]
    random.Random(seed_for(args.seed, "order", pool_index)).shuffle(batches)
    return batches


def sft_step(args, step, ctx):
    """One supervised step on this rank's slice of the batch: cross-entropy of the completions."""
    pool_index, part = divmod(step, 4)
    if ctx.get("pool_index") != pool_index:
        ctx["pool"], ctx["pool_index"] = sft_pool(args, pool_index, ctx["rank"], ctx["world"], ctx["tokenizer"],
                                                  ctx["exclude"]), pool_index
    batch = ctx["pool"][part]
    t0 = time.perf_counter()
    ids, attention, response, _ = grpo.pack_rollouts([b[0] for b in batch], [b[1] for b in batch],
                                                     ctx["tokenizer"].pad_token_id, ctx["device"])
    with ctx["autocast"]():
        out = grpo.sequence_logprobs(ctx["train_model"], ids, attention, response)
    loss = -out.logp.sum() / response.sum()
    ctx["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ctx["model"].parameters(), args.grad_clip)
    ctx["optimizer"].step()
    (total,) = all_reduce([loss.item()], ctx["world"])
    return {"loss": total / ctx["world"], "time_train": time.perf_counter() - t0}
