"""The SFT warm start: a model learns the written searches of generated problems.

    python train.py --mode sft                      # the built-in tiny model, from scratch (2,500 steps of 16)
    python train.py --mode sft --skip 0 --out runs/sft-every-move    # the noiseless demonstrator
    python train.py --mode sft --seed 1 --out runs/sft-seed1

train.py runs the loop; this file holds the mode's data and step. The tiny model learns the
compact trace (countdown.search_trace(..., style="compact")) after the bare prompt; a chat model
(--prompt longproc) learns LongProc's demonstration after its chat-templated prompt. The
demonstrations are solution-blind by construction (docs/testbed.md): each written move is
passed over with probability --skip, drawn from a generator of its own per trace, before the
move's outcome is known, and every demonstration is cut at --cut tokens (default twice the RL
budget), whatever it holds. Nothing about a trace (its moves, whether it is kept, where it ends)
depends on where the solution is.
Imports: countdown, grpo, model, distributed, torch.
"""
import functools
import random

import torch

import countdown
import forward
from distributed import all_reduce, clock, seed_for
from model import encode_prompt


def demonstration(tokenizer, problem, style, skip, cut, rng):
    """The completion ids of one demonstration: the written search (moves passed over with
    probability `skip`, drawn from `rng`), EOS, all cut at `cut` tokens."""
    trace = countdown.search_trace(*problem, style=style, skip=skip, rng=rng)
    return (tokenizer.encode(trace) + [tokenizer.eos_token_id])[:cut]


@functools.lru_cache(maxsize=1)  # a pool serves 4 consecutive steps
def sft_pool(seed, source, style, skip, cut, per_rank, pool_index, rank, tokenizer):
    """Four batches of this rank's SFT examples (prompt ids, completion ids), sorted by length so
    each batch pads little; a pure function of (seed, pool_index, rank)."""
    rng = random.Random(seed_for(seed, "sft", pool_index, rank))
    trace_style = "compact" if style == "bare" else "longproc"
    pool = []
    for k in range(4 * per_rank):
        p = source.draw(rng)
        # the skips draw from a stream of their own: the next problem never depends on this search
        skips = random.Random(seed_for(seed, "skip", pool_index, rank, k))
        pool.append((encode_prompt(tokenizer, countdown.prompt(p, style), chat=style == "longproc"),
                     demonstration(tokenizer, p, trace_style, skip, cut, skips)))
    pool.sort(key=lambda x: len(x[0]) + len(x[1]))
    batches = [pool[k * per_rank:(k + 1) * per_rank] for k in range(4)]
    random.Random(seed_for(seed, "order", pool_index)).shuffle(batches)
    return batches


def sft_step(run, step):
    """One supervised step on this rank's slice of the batch: cross-entropy of the completions."""
    args = run.args
    pool_index, part = divmod(step, 4)
    batch = sft_pool(args.seed, run.problems, run.style, args.skip, args.cut or 2 * run.max_new_tokens,
                     args.batch_size // run.world, pool_index, run.rank, run.tokenizer)[part]
    t0 = clock(run.device)
    ids, attention, response, start = forward.pack_rollouts([b[0] for b in batch], [b[1] for b in batch],
                                                         run.tokenizer.pad_token_id, run.device)
    with run.training():
        with run.autocast():
            out = forward.sequence_logprobs(run.train_model, ids, attention, response, start=start)
        loss = -out.logp.sum() / response.sum()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    seconds = clock(run.device) - t0
    (total,) = all_reduce([loss.item()], run.world)
    return {"loss": total / run.world, "time_train": seconds}
