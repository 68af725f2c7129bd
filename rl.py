"""The RL step, top to bottom: draw prompts, roll out, score, normalise, update.

    python train.py --mode grpo                 # train.py runs the loop; this is one step of it
    python train.py --mode clipo+critic         # a mode adds a reward term or an auxiliary module

1. prompts: the same global list on every process, each takes its slice (a group never spans
   processes); 2. rollouts: G per prompt (sample.py), one generator per prompt so a rollout does
   not depend on where it was drawn; 3. one no-grad forward: old log-probs, entropies and, for
   CLIPO, pooled hidden states; 4. rewards: outcome + format (+ critic/oracle state values,
   + CLIPO's bonus); 5. group-normalised advantages; 6. --ppo-epochs x --minibatches clipped
   updates. Forwards run in micro-batches of rows sorted by length, each cut to its longest
   row: rollouts that hit the token limit no longer pad everyone else.
Imports: countdown, grpo, rewards, sample, model, distributed, torch.
"""
import math
import random
import time
from contextlib import nullcontext

import torch

import countdown
import grpo
import rewards
from distributed import all_reduce, seed_for
from model import encode_prompt
from sample import sample


def micro_batches(rows, lengths, start, size):
    """Rows (indices) in chunks of `size`, sorted by response length: [(index tensor, width)],
    width = the columns the chunk needs (its prompts end at `start`)."""
    order = sorted(rows, key=lambda i: lengths[i])
    return [(torch.tensor(order[k:k + size]), start + max(1, max(lengths[i] for i in order[k:k + size])))
            for k in range(0, len(order), size)]


def old_pass(ctx, batch, chunks, hidden):
    """No-grad forward over every row: old log-probs [N, W], entropies, pooled hidden [N, H]."""
    ids, attention, response = batch
    logp, entropy = torch.zeros(response.shape, device=ids.device), torch.zeros(response.shape, device=ids.device)
    ref, pooled = (torch.zeros_like(logp) if ctx["ref_model"] else None), None
    with torch.no_grad(), ctx["autocast"]():
        for idx, width in chunks:
            idx = idx.to(ids.device)
            args = (ids[idx, :width], attention[idx, :width], response[idx, :width])
            out = grpo.sequence_logprobs(ctx["model"], *args, entropy=True, hidden=hidden)
            logp[idx, :width], entropy[idx, :width] = out.logp, out.entropy
            if hidden:
                chunk = ctx["clipo"].head.pool(out.hidden, response[idx, :width])
                pooled = chunk.new_zeros((len(response), chunk.shape[-1])) if pooled is None else pooled
                pooled[idx] = chunk
            if ref is not None:
                ref[idx, :width] = grpo.sequence_logprobs(ctx["ref_model"], *args).logp
    return logp, entropy, ref, pooled


def score(args, step, ctx, owners, texts, tokens, pooled, start, width):
    """Rewards [N] (outcome + format + the mode's terms), step rewards for process credit, and
    the mode's metrics."""
    parts, device = set(args.mode.split("+")), ctx["device"]
    correct, formatted = rewards.outcome(owners, texts)
    total = correct + args.format_reward * formatted
    extra, step_rewards, step_mask = {}, None, None
    if parts & {"critic", "oracle"}:
        values = rewards.state_values(owners, texts, ctx["critic"])
        if args.critic_credit == "sequence":
            bonus = rewards.sequence_credit(values)
            total = total + args.critic_coef * bonus
            extra["critic/bonus_mean"] = bonus.mean().item()
        else:
            steps, mask = rewards.process_credit(values, texts, tokens, ctx["tokenizer"], width - start)
            step_rewards = torch.nn.functional.pad(steps, (start, 0)).to(device)
            step_mask = torch.nn.functional.pad(mask, (start, 0)).to(device)
        extra["critic/states_per_rollout"] = sum(len(v) for v in values) / len(values)
    if "clipo" in parts:
        generator = torch.Generator(device).manual_seed(seed_for(args.seed, "clipo", step, ctx["rank"]))
        bonus, stats = ctx["clipo"].step(pooled, correct.to(device), args.group_size, generator, ctx["world"])
        if step >= args.clipo_warmup:
            total = total + bonus.cpu()
        extra.update({k: v.item() for k, v in stats.items()})
    return correct, formatted, total, step_rewards, step_mask, extra


def update(args, ctx, batch, chunks_of, old, ref, advantages):
    """--ppo-epochs x --minibatches optimizer steps; each minibatch accumulates its
    micro-batches' gradients (the loss normalised as over the whole global minibatch)."""
    ids, attention, response = batch
    world, model = ctx["world"], ctx["model"]
    tokens_of = all_reduce([float(sum(response[idx.to(ids.device)].sum().item() for idx, _ in chunks))
                            for chunks in chunks_of], world)
    sums = torch.zeros(4, device=ids.device)  # loss, approx KL, clip fraction, KL to the reference
    for _ in range(args.ppo_epochs):
        for chunks, tokens in zip(chunks_of, tokens_of):
            rows = sum(len(idx) for idx, _ in chunks)
            local_tokens = sum(response[idx.to(ids.device), :width].sum() for idx, width in chunks)
            ctx["optimizer"].zero_grad(set_to_none=True)
            for k, (idx, width) in enumerate(chunks):
                idx = idx.to(ids.device)
                last = k == len(chunks) - 1
                sync = nullcontext() if last or world == 1 else ctx["train_model"].no_sync()
                with sync, ctx["autocast"]():
                    new = grpo.sequence_logprobs(ctx["train_model"], ids[idx, :width], attention[idx, :width],
                                                 response[idx, :width])
                    loss, stats = grpo.policy_loss(
                        new.logp, old[idx, :width], advantages[idx, :width] if advantages.dim() == 2 else advantages[idx],
                        response[idx, :width], clip_low=args.clip_low, clip_high=args.clip_high, ratio=args.ratio,
                        agg=args.agg, kl_coef=args.kl_coef, ref_logp=None if ref is None else ref[idx, :width],
                        num_tokens=tokens / world, max_length=ctx["max_new_tokens"])
                    if args.agg != "token-mean":  # a chunk's sequence mean, weighted by its share of rows
                        loss = loss * len(idx) / rows
                    loss.backward()
                # the chunk losses add up; their stats are token means: weight them by tokens
                weight = response[idx, :width].sum() / local_tokens
                kl_ref = stats["kl_ref"] if "kl_ref" in stats else torch.zeros((), device=sums.device)
                sums += torch.stack([loss.detach(), stats["approx_kl"] * weight, stats["clip_frac"] * weight,
                                     kl_ref * weight])
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            ctx["optimizer"].step()
    return sums / max(1, args.ppo_epochs * len(chunks_of))


def rl_step(args, step, ctx):
    rank, world, device, tok = ctx["rank"], ctx["world"], ctx["device"], ctx["tokenizer"]
    per_rank, group = args.prompts_per_step // world, args.group_size
    rng = random.Random(seed_for(args.seed, "prompts", step))
    problems = [countdown.random_problem(rng, exclude=ctx["exclude"], **countdown.PRESETS[args.preset])
                for _ in range(args.prompts_per_step)][rank * per_rank:(rank + 1) * per_rank]
    prompts = [encode_prompt(tok, countdown.prompt(p, ctx["style"]), chat=ctx["style"] == "longproc") for p in problems]
    generators = [torch.Generator(device).manual_seed(seed_for(args.seed, "sample", step, rank * per_rank + i))
                  for i in range(per_rank)]

    t0 = time.perf_counter()
    with ctx["autocast"]():
        rollouts = sample(ctx["model"], prompts, ctx["max_new_tokens"], temperature=args.temperature,
                          top_p=args.top_p, num_samples=group, eos_token_id=tok.eos_token_id, stop="</Solution>",
                          tokenizer=tok, generator=generators, pad_token_id=tok.pad_token_id)
    t1 = time.perf_counter()
    ids, attention, response, start = grpo.pack_rollouts(prompts, rollouts.tokens, tok.pad_token_id, device)
    batch, lengths = (ids, attention, response), [len(t) for t in rollouts.tokens]
    everyone = micro_batches(range(len(lengths)), lengths, start, args.micro_batch)
    old, entropy, ref, pooled = old_pass(ctx, batch, everyone, hidden="clipo" in args.mode)
    t2 = time.perf_counter()
    texts = [tok.decode(t, skip_special_tokens=True) for t in rollouts.tokens]
    owners = [problems[i // group] for i in range(len(texts))]
    correct, formatted, total, step_rewards, step_mask, extra = score(
        args, step, ctx, owners, texts, rollouts.tokens, pooled, start, ids.shape[1])
    advantages = grpo.group_advantages(total.to(device), group, scale=not args.no_scale_adv, step_rewards=step_rewards,
                                       step_mask=step_mask, step_weight=args.critic_coef)
    t3 = time.perf_counter()
    # minibatch k: the groups g with g % M == k, so M minibatches are the same on 1 or N processes
    chunks_of = [micro_batches([i for i in range(len(lengths)) if (i // group) % args.minibatches == k], lengths,
                               start, args.micro_batch) for k in range(args.minibatches)]
    warming = "clipo" in args.mode and step < args.clipo_warmup  # CLIPO's warm-up trains only its head
    means = torch.zeros(4) if warming else update(args, ctx, batch, chunks_of, old, ref, advantages).cpu()
    t4 = time.perf_counter()

    grouped = total.view(-1, group)
    adv = advantages[:, start] if advantages.dim() == 2 else advantages  # the first response token's
    local = [total.sum().item(), correct.sum().item(), formatted.sum().item(), adv.sum().item(),
             (adv ** 2).sum().item(), (grouped.amax(1) == grouped.amin(1)).sum().item(),
             (entropy * response).sum().item(), response.sum().item(), sum(lengths), len(lengths)]
    g = all_reduce(local + means.tolist() + list(extra.values()), world)
    n = g[9]
    row = {"loss": g[10] / world, "reward_mean": g[0] / n, "success_rate": g[1] / n, "format_rate": g[2] / n,
           "adv_std": math.sqrt(max(0.0, g[4] / n - (g[3] / n) ** 2)), "zero_adv_frac": g[5] / (n / group),
           "kl": g[11] / world, "clip_frac": g[12] / world, "entropy": g[6] / max(g[7], 1),
           "response_length_mean": g[8] / n, "response_length_max": all_reduce([max(lengths)], world, "max")[0],
           "tokens_per_s": g[8] / max(t1 - t0, 1e-9), "time_sample": t1 - t0, "time_reward": t3 - t2,
           "time_train": (t2 - t1) + (t4 - t3)}
    if args.kl_coef:
        row["kl_ref"] = g[13] / world
    row.update({k: v / world for k, v in zip(extra, g[14:])})
    return row
