"""One RL step, top to bottom: draw prompts, roll out, score, normalise, update.

    python train.py --mode grpo                 # train.py runs the loop; rl_step is one step of it
    python train.py --mode clipo+critic         # a mode names reward terms (rewards.REWARD_TERMS)

rl_step(run, step) fills one `Rollouts`, in six stages numbered as in the code:
 1. prompts: the same global list on every process, each takes its slice (a group never spans
    processes), one sampling generator per prompt (a rollout does not depend on where it is drawn);
 2. rollouts: G samples per prompt (sample.py), decoded, in rounds until enough groups carry
    signal (--oversample, --max-sample-rounds), then packed into [N, T] rows with the sampler's
    log-probs;
 3. old pass: one no-grad forward for the old log-probs at the sampling temperature, entropies,
    the reference's log-probs (--kl-coef) and the pooled hidden states a reward term asks for (CLIPO);
 4. rewards: outcome 1 (+ --format-reward, 0 by default), plus each reward term of the mode;
 5. advantages: group-normalised rewards (--normalise-terms: each term apart), plus the
    rewards-to-go of the terms' step rewards; --mask-truncated takes cut rollouts out of the loss;
 6. update: --ppo-epochs x --minibatches clipped updates (--entropy-coef, --tis-cap).
Forwards run in micro-batches of rows sorted by length, each cut to its longest row: rollouts
that hit the token limit no longer pad everyone else. A group's rows stay in one micro-batch so
each prompt runs once per forward (grpo's prompt-shared forward; --no-shared-prompt: off). `run` is run.Run (model, optimizer,
tokenizer, flags as run.args); the step returns its metrics (train.METRICS), reduced by name.
Imports: answers, countdown, grpo, rewards, sample, model, distributed, torch.
"""
import math
import random
from dataclasses import dataclass

import torch

import answers
import countdown
import grpo
import rewards
from distributed import all_reduce, clock, gradient_sync, seed_for
from model import encode_prompt
from sample import sample


@dataclass
class Rollouts:
    """The data of one RL step on this process. N rows = prompts x G (a prompt's G rollouts are
    consecutive); T columns = [left pad | prompt | response | right pad]."""
    problems: list                     # [N] countdown.Problem each row answers
    tokens: list                       # [N] response token ids (list of int, EOS included)
    texts: list                        # [N] decoded responses
    ids: torch.Tensor                  # [N, T] token ids
    attention: torch.Tensor            # [N, T] 1 on prompt and response tokens
    response: torch.Tensor             # [N, T] float, 1 on response tokens
    start: int                         # first response column: prompts are left-padded to end here
    finished: list = None              # [N] the rollout stopped by itself (False: it ran out of tokens)
    sampler_logp: torch.Tensor = None  # [N, T] log-prob of each response token as the sampler drew it (sample())
    old_logp: torch.Tensor = None      # [N, T] the same under the trainer's forward of the sampling weights
    entropy: torch.Tensor = None       # [N, T] entropy of that policy at each response token
    ref_logp: torch.Tensor = None      # [N, T] log-probs under the frozen reference (--kl-coef > 0)
    pooled: torch.Tensor = None        # [N, H] mean final hidden state over response tokens (terms that ask)
    correct: torch.Tensor = None       # [N] 1 when the solution verifies
    formatted: torch.Tensor = None     # [N] 1 when a <Solution> block parses
    reward: torch.Tensor = None        # [N] outcome + format + the terms' bonuses
    step_rewards: torch.Tensor = None  # [N, T] the terms' per-token rewards, summed (0 elsewhere)
    advantages: torch.Tensor = None    # [N, T] group-normalised reward + rewards-to-go of step_rewards
    loss_mask: torch.Tensor = None     # [N, T] the tokens the loss reads: the response (--mask-truncated: of finished rows)
    bonuses: dict = None               # term name -> [N] its bonus in the reward (step rewards not included)

    @property
    def lengths(self):
        return [len(t) for t in self.tokens]


def micro_batches(rows, lengths, start, size, group=None):
    """Rows (indices) in chunks of `size`: [(index tensor, width)], width = the columns the chunk
    needs (its prompts end at `start`). Rows sorted by length, so a chunk pads little; with
    `group` (G), whole groups stay together, ordered by their longest row, so a prompt-shared
    forward runs each prompt once per chunk."""
    if group is None:
        order = sorted(rows, key=lambda i: lengths[i])
    else:
        members = {}
        for i in sorted(rows, key=lambda i: lengths[i]):
            members.setdefault(i // group, []).append(i)
        order = [i for g in sorted(members, key=lambda g: lengths[members[g][-1]]) for i in members[g]]
    return [(torch.tensor(order[k:k + size]), start + max(1, max(lengths[i] for i in order[k:k + size])))
            for k in range(0, len(order), size)]


def choose_groups(flat, keep):
    """The `keep` groups to train on, in the order drawn: groups with signal (flat[g] False) first."""
    return sorted(sorted(range(len(flat)), key=lambda g: flat[g])[:keep])


def draw_problems(run, step, round_):
    """This process's problems of one sampling round: its slice of the round's global list, the
    same on every process (a group never spans processes); (1 + --oversample) x its share."""
    args = run.args
    per_rank = args.prompts_per_step // run.world
    drawn = per_rank + math.ceil(args.oversample * per_rank)
    # round 0 keeps the seed it had before rounds existed: a run without refills is unchanged
    rng = random.Random(seed_for(args.seed, "prompts", step, *(("round", round_) if round_ else ())))
    return [countdown.random_problem(rng, exclude=run.exclude, **countdown.PRESETS[args.preset])
            for _ in range(drawn * run.world)][run.rank * drawn:(run.rank + 1) * drawn]


def sample_round(run, step, round_):
    """G rollouts of each problem of one round, decoded and verified: a dict of per-group lists
    (problems, prompts) and per-row lists (tokens, sampler log-probs, finished, texts), and each
    group's flatness (equal rewards: no signal)."""
    args, tok, group = run.args, run.tokenizer, run.args.group_size
    problems = draw_problems(run, step, round_)
    prompts = [encode_prompt(tok, countdown.prompt(p, run.style), chat=run.style == "longproc") for p in problems]
    first = run.rank * len(problems)  # this process's first prompt in the round's global list
    where = ("round", round_) if round_ else ()
    generators = [torch.Generator(run.device).manual_seed(seed_for(args.seed, "sample", step, *where, first + i))
                  for i in range(len(problems))]
    sampled = sample(run.rollout_model, prompts, run.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, num_samples=group, eos_token_id=run.eos, stop="</Solution>", tokenizer=tok,
                     generator=generators, pad_token_id=tok.pad_token_id)
    texts = [tok.decode(t, skip_special_tokens=True) for t in sampled.tokens]
    correct, formatted = rewards.outcome([p for p in problems for _ in range(group)], texts)
    grouped = (correct + args.format_reward * formatted).view(-1, group)
    return {"problems": problems, "prompts": prompts, "tokens": sampled.tokens, "logprobs": sampled.logprobs,
            "finished": sampled.finished, "texts": texts, "flat": (grouped.amax(1) == grouped.amin(1)).tolist()}


def roll_out(run, step, keep):
    """`keep` groups of G rollouts, packed into rows. Each round draws (1 + --oversample) x
    `keep` prompts; rounds go on (at most --max-sample-rounds) until `keep` groups have signal
    (rewards that differ), and the groups with signal come first (DAPO's dynamic sampling: a
    group of equal rewards has zero advantage). Returns the Rollouts, the fraction of sampled
    groups without signal and the rounds used."""
    args, group = run.args, run.args.group_size
    run.refresh_rollout_model()  # with --bf16, a bf16 copy of the current weights: no autocast needed
    pooled = {}
    for round_ in range(args.max_sample_rounds):
        drawn = sample_round(run, step, round_)
        for key, values in drawn.items():
            pooled.setdefault(key, []).extend(values)
        if pooled["flat"].count(False) >= keep:
            break
    flat = pooled["flat"]
    chosen = choose_groups(flat, keep)
    rows = [g * group + j for g in chosen for j in range(group)]
    tokens = [pooled["tokens"][i] for i in rows]
    ids, attention, response, start = grpo.pack_rollouts([pooled["prompts"][g] for g in chosen], tokens,
                                                         run.tokenizer.pad_token_id, run.device)
    sampler_logp = torch.zeros_like(response, device="cpu")
    for k, i in enumerate(rows):
        sampler_logp[k, start:start + len(tokens[k])] = torch.tensor(pooled["logprobs"][i])
    r = Rollouts(problems=[pooled["problems"][g] for g in chosen for _ in range(group)], tokens=tokens,
                 texts=[pooled["texts"][i] for i in rows], ids=ids, attention=attention, response=response, start=start,
                 finished=[pooled["finished"][i] for i in rows], sampler_logp=sampler_logp.to(run.device))
    return r, sum(flat) / len(flat), round_ + 1


def old_pass(run, r, hidden):
    """No-grad forward over every row: fills r.old_logp, r.entropy, r.ref_logp, r.pooled."""
    r.old_logp, r.entropy = torch.zeros_like(r.response), torch.zeros_like(r.response)
    r.ref_logp = torch.zeros_like(r.response) if run.ref_model else None
    with torch.no_grad(), run.autocast():
        for idx, width in micro_batches(range(len(r.tokens)), r.lengths, r.start, run.args.micro_batch, run.groups):
            groups = None if run.groups is None else idx // run.groups  # on the host: no device sync
            idx = idx.to(r.ids.device)
            rows = (r.ids[idx, :width], r.attention[idx, :width], r.response[idx, :width])
            out = grpo.sequence_logprobs(run.train_model, *rows, start=r.start, entropy=True, hidden=hidden,
                                         groups=groups, temperature=run.args.temperature)
            r.old_logp[idx, :width], r.entropy[idx, :width] = out.logp, out.entropy
            if hidden:
                chunk = run.clipo.head.pool(out.hidden, r.response[idx, :width])
                r.pooled = chunk.new_zeros((len(r.tokens), chunk.shape[-1])) if r.pooled is None else r.pooled
                r.pooled[idx] = chunk
            if r.ref_logp is not None:
                r.ref_logp[idx, :width] = grpo.sequence_logprobs(run.ref_model, *rows, start=r.start, groups=groups,
                                                                 temperature=run.args.temperature).logp


def score(run, r, step):
    """Fills r.correct, r.formatted, r.reward [N] and r.step_rewards [N, T]; returns the terms'
    metrics, named "<term>/<metric>"."""
    r.correct, r.formatted = rewards.outcome(r.problems, r.texts)
    r.reward = r.correct + run.args.format_reward * r.formatted
    r.step_rewards = torch.zeros_like(r.response)
    r.bonuses, metrics = {}, {}
    for name in run.terms:
        bonus, step_rewards, term_metrics = rewards.REWARD_TERMS[name].score(run, r, step)
        if bonus is not None:
            r.reward = r.reward + bonus
            r.bonuses[name] = bonus
        if step_rewards is not None:
            r.step_rewards = r.step_rewards + step_rewards
        metrics.update({f"{name}/{k}": v for k, v in term_metrics.items()})
    return metrics


def update(run, r):
    """--ppo-epochs x --minibatches optimizer steps; each minibatch accumulates its micro-batches'
    gradients, its loss normalised by the whole global minibatch's tokens (or rows) the loss reads."""
    args, world = run.args, run.world
    # minibatch k: the groups g with g % M == k, so M minibatches are the same on 1 or N processes
    minibatches = [micro_batches([i for i in range(len(r.tokens)) if (i // args.group_size) % args.minibatches == k],
                                 r.lengths, r.start, args.micro_batch, run.groups) for k in range(args.minibatches)]
    counts = {}  # each minibatch's tokens and rows the loss reads, over all processes
    for k, chunks in enumerate(minibatches):
        rows = [r.loss_mask[idx.to(r.ids.device)] for idx, _ in chunks]
        counts[f"tokens/{k}"] = float(sum(m.sum().item() for m in rows))
        counts[f"rows/{k}"] = float(sum((m.sum(-1) > 0).sum().item() for m in rows))
    counts = all_reduce(counts, world)
    sums = torch.zeros(4, device=r.ids.device)  # loss, approx KL, clip fraction, KL to the reference
    with run.training():
        for _ in range(args.ppo_epochs):
            for k, chunks in enumerate(minibatches):
                update_minibatch(run, r, chunks, max(counts[f"tokens/{k}"], 1.0) / world,
                                 max(counts[f"rows/{k}"], 1.0) / world, sums)
    means = (sums / max(1, args.ppo_epochs * args.minibatches)).tolist()
    return dict(zip(("loss", "kl", "clip_frac", "kl_ref"), means))


def update_minibatch(run, r, chunks, num_tokens, num_sequences, sums):
    """One optimizer step on a minibatch, its micro-batches' gradients accumulated; adds the
    loss and token-weighted stats into `sums`."""
    args = run.args
    run.optimizer.zero_grad(set_to_none=True)
    for j, (idx, width) in enumerate(chunks):
        groups = None if run.groups is None else idx // run.groups
        idx = idx.to(r.ids.device)
        last = j == len(chunks) - 1  # only the last micro-batch's backward reduces gradients
        with gradient_sync(run.train_model, last), run.autocast():
            new = grpo.sequence_logprobs(run.train_model, r.ids[idx, :width], r.attention[idx, :width],
                                         r.response[idx, :width], start=r.start, groups=groups,
                                         entropy=args.entropy_coef > 0, temperature=args.temperature)
            old = r.old_logp[idx, :width]
            # the sampler and the trainer's old policy differ with --bf16 rollouts and top-k / top-p
            weights = grpo.tis_weights(old, r.sampler_logp[idx, :width], args.tis_cap) if args.tis_cap else None
            mask = r.loss_mask[idx, :width]
            loss, stats = grpo.policy_loss(
                new.logp, old, r.advantages[idx, :width], mask, clip_low=args.clip_low,
                clip_high=args.clip_high, ratio=args.ratio, agg=args.agg, kl_coef=args.kl_coef,
                ref_logp=None if r.ref_logp is None else r.ref_logp[idx, :width], entropy=new.entropy,
                entropy_coef=args.entropy_coef, weights=weights, num_tokens=num_tokens, num_sequences=num_sequences,
                max_length=run.max_new_tokens)
            loss.backward()
        # the chunk losses add up; their stats are token means: weight them by their share of the
        # minibatch's tokens over all processes (the mean of per-process means would differ)
        weight = mask.sum() / num_tokens
        kl_ref = stats["kl_ref"] if "kl_ref" in stats else torch.zeros((), device=sums.device)
        sums += torch.stack([loss.detach(), stats["approx_kl"] * weight, stats["clip_frac"] * weight, kl_ref * weight])
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()


def readable_group(run, r, step):
    """The step's first group, for a person to read (rollouts.jsonl): the prompt once, then each
    response with its reward, the mode's terms' bonuses, whether it verified, its length and
    what became of it (answers.failure)."""
    group, p = run.args.group_size, r.problems[0]
    return {"step": step, "kind": "rollouts", "nums": list(p.nums), "target": p.target,
            "prompt": countdown.prompt(p, run.style),
            "responses": [{"text": r.texts[i], "reward": round(r.reward[i].item(), 4),
                           "terms": {name: round(bonus[i].item(), 4) for name, bonus in r.bonuses.items()},
                           "verified": bool(r.correct[i]), "length": len(r.tokens[i]),
                           "failure": answers.failure(p.nums, p.target, r.texts[i], r.finished[i])}
                          for i in range(group)]}


def search_sums(r):
    """What the rollouts' searches wrote, summed over this process's rollouts: each of
    answers.SEARCH_COUNTS as "search/<name>", and "search/solved_with_errors" (rollouts that
    verify with a process error in their search)."""
    counts = [answers.search_counts(p.nums, p.target, text) for p, text in zip(r.problems, r.texts)]
    sums = {f"search/{key}": float(sum(c[key] for c in counts)) for key in answers.SEARCH_COUNTS}
    sums["search/solved_with_errors"] = float(sum(bool(ok) and c["process_errors"] > 0
                                                  for ok, c in zip(r.correct.tolist(), counts)))
    return sums


def advantages(run, r):
    """[N, T]: the group-normalised reward of each rollout at every token, plus the rewards-to-go
    of the terms' step rewards. --normalise-terms: the outcome (+ format) and each term's bonus
    are normalised within the group apart, and the bonuses added at their weights |coefficient|
    (rewards.REWARD_TERMS[name].weight), so a term's scale no longer decides its share."""
    args, scale = run.args, not run.args.no_scale_adv
    if not args.normalise_terms:
        outcome = grpo.group_advantages(r.reward.to(run.device), args.group_size, scale=scale)
    else:
        outcome = grpo.group_advantages((r.correct + args.format_reward * r.formatted).to(run.device),
                                        args.group_size, scale=scale)
        for name, bonus in r.bonuses.items():
            weight = abs(rewards.REWARD_TERMS[name].weight(args))
            outcome = outcome + weight * grpo.group_advantages(bonus.to(run.device), args.group_size, scale=scale)
    return outcome[:, None] + grpo.rewards_to_go(r.step_rewards)


def bonus_shifts(run, r):
    """{"<term>/adv_shift": mean over rollouts of |the change the term's bonus made to its
    group-normalised advantage|}. A bonus every correct response of a group shares moves no
    normalised advantage; only its spread among them does, which this measures."""
    args, scale = run.args, not run.args.no_scale_adv
    shifts = {}
    for name, bonus in r.bonuses.items():
        if args.normalise_terms:
            change = abs(rewards.REWARD_TERMS[name].weight(args)) * grpo.group_advantages(bonus, args.group_size,
                                                                                          scale=scale)
        else:
            change = (grpo.group_advantages(r.reward, args.group_size, scale=scale)
                      - grpo.group_advantages(r.reward - bonus, args.group_size, scale=scale))
        shifts[f"{name}/adv_shift"] = change.abs().mean().item()
    return shifts


def loss_mask(r, mask_truncated):
    """[N, T]: the tokens the loss reads: the response tokens, or with mask_truncated only those
    of rollouts that finished by themselves (DAPO's overlong filtering)."""
    if not mask_truncated:
        return r.response
    return r.response * torch.tensor(r.finished, dtype=r.response.dtype, device=r.response.device)[:, None]


def rl_step(run, step):
    args, group = run.args, run.args.group_size
    # 1-2. prompts and rollouts: this process's slice of each round's global list, G samples each
    per_rank = args.prompts_per_step // run.world
    t0 = clock(run.device)
    r, sampled_flat, rounds = roll_out(run, step, keep=per_rank)
    t1 = clock(run.device)
    # 3. old pass
    old_pass(run, r, hidden=any(rewards.REWARD_TERMS[name].needs_hidden for name in run.terms))
    t2 = clock(run.device)
    # 4. rewards
    term_metrics = score(run, r, step)
    # 5. advantages, and the tokens the loss reads (--mask-truncated: none of a rollout cut by the budget;
    # its reward still counts in its group's mean and std, as DAPO's overlong filtering does)
    r.advantages = advantages(run, r)
    term_metrics.update(bonus_shifts(run, r))
    r.loss_mask = loss_mask(r, args.mask_truncated)
    t3 = clock(run.device)
    # 6. update (steps below 0 are CLIPO's head warm-up: the head trains, the policy does not)
    warming = step < 0
    update_stats = dict.fromkeys(("loss", "kl", "clip_frac", "kl_ref"), 0.0) if warming else update(run, r)
    t4 = clock(run.device)

    grouped, lengths = r.reward.view(-1, group), r.lengths
    first = r.advantages[:, r.start]  # the first response token's advantage
    guesses = sum(answers.failure(p.nums, p.target, text, done) == "guess"
                  for p, text, done in zip(r.problems, r.texts, r.finished))
    searches = search_sums(r)
    sums = {"reward": r.reward.sum().item(), "correct": r.correct.sum().item(), "formatted": r.formatted.sum().item(),
            "guesses": guesses, **searches,
            "adv": first.sum().item(), "adv_sq": (first ** 2).sum().item(),
            "flat_groups": (grouped.amax(1) == grouped.amin(1)).sum().item(),
            "entropy": (r.entropy * r.response).sum().item(), "response_tokens": r.response.sum().item(),
            "length": sum(lengths), "rollouts": len(lengths), "sampled_flat": sampled_flat, "rounds": rounds,
            "logp_gap": ((r.sampler_logp - r.old_logp).abs() * r.response).sum().item(),
            "truncated": len(lengths) - sum(r.finished),
            **update_stats, **term_metrics}
    g = all_reduce(sums, run.world)
    n = g["rollouts"]
    row = {"loss": g["loss"] / run.world, "reward_mean": g["reward"] / n, "success_rate": g["correct"] / n,
           "format_rate": g["formatted"] / n, "guess_rate": g["guesses"] / n,
           "adv_std": math.sqrt(max(0.0, g["adv_sq"] / n - (g["adv"] / n) ** 2)),
           "zero_adv_frac": g["flat_groups"] / (n / group), "sampled_zero_adv_frac": g["sampled_flat"] / run.world,
           "sample_rounds": g["rounds"] / run.world, "truncated_frac": g["truncated"] / n,
           "sampler_logp_gap": g["logp_gap"] / max(g["response_tokens"], 1), "kl": g["kl"] / run.world,
           "clip_frac": g["clip_frac"] / run.world, "entropy": g["entropy"] / max(g["response_tokens"], 1),
           "response_length_mean": g["length"] / n,
           "response_length_max": all_reduce([max(lengths)], run.world, "max")[0],
           "tokens_per_s": g["length"] / max(t1 - t0, 1e-9), "time_sample": t1 - t0, "time_reward": t3 - t2,
           "time_train": (t2 - t1) + (t4 - t3), "time_update": t4 - t3}
    row.update({key: g[key] / n for key in searches})
    if args.kl_coef:
        row["kl_ref"] = g["kl_ref"] / run.world
    row.update({k: g[k] / run.world for k in term_metrics})
    run.rollouts = r
    return row
