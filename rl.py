"""One RL step, top to bottom: draw prompts, roll out, score, normalise, update.

    python train.py --mode grpo                 # train.py runs the loop; rl_step is one step of it
    python train.py --mode clipo+critic         # a mode names reward terms (rewards.RewardTerm)

rl_step(run, step) fills one `Rollouts`, in six stages numbered as in the code:
 1. prompts: the same global list on every process, each takes its slice (a group never spans
    processes), one sampling generator per prompt (a rollout does not depend on where it is drawn);
 2. rollouts: G samples per prompt (sample.py), decoded, in rounds until enough groups carry
    signal in the outcome or a term's credit (--oversample, --max-sample-rounds), then packed
    into [N, T] rows with the sampler's log-probs;
 3. old pass: one no-grad forward for the old log-probs at the sampling temperature, entropies,
    the reference's log-probs (--kl-coef) and the pooled hidden states a reward term asks for;
 4. rewards: outcome 1 (+ --format-reward, 0 by default), plus each reward term of the mode;
 5. advantages: the group-normalised outcome, each term's bonus centred in its group after it
    (--normalise-terms: each normalised apart), plus the rewards-to-go of the terms' step
    rewards; --mask-truncated takes cut rollouts out of the loss;
 6. update: --ppo-epochs x --minibatches clipped updates (--entropy-coef, --tis-cap).
Forwards run in micro-batches of rows sorted by length (forward.micro_batches), each cut to its
longest row: rollouts that hit the token limit no longer pad everyone else. A group's rows stay
in one micro-batch so each prompt runs once per forward (forward.py's prompt-shared forward;
--no-shared-prompt: off).
`run` is run.Run (model, optimizer, tokenizer, flags as run.args, the mode's reward terms as
run.terms); the step returns its metrics, each added where it is computed (metrics.StepMetrics).
Imports: answers, countdown, forward, grpo, metrics, rewards, sample, model, distributed, torch.
"""
import math
import random
from dataclasses import dataclass

import torch

import answers
import countdown
import forward
import grpo
import rewards
from distributed import all_reduce, gradient_sync, seed_for
from metrics import StepMetrics, search_sums
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
    pooled: torch.Tensor = None        # [N, H] mean final hidden state over response tokens (a term's `pooled`)
    correct: torch.Tensor = None       # [N] 1 when the solution verifies
    formatted: torch.Tensor = None     # [N] 1 when a <Solution> block parses
    reward: torch.Tensor = None        # [N] outcome + format + the terms' bonuses
    step_rewards: torch.Tensor = None  # [N, T] the terms' per-token rewards, summed (0 elsewhere)
    advantages: torch.Tensor = None    # [N, T] group-normalised outcome + centred bonuses + rewards-to-go of step_rewards
    loss_mask: torch.Tensor = None     # [N, T] the tokens the loss reads (--mask-truncated: finished rows only)
    bonuses: dict = None               # term name -> [N] its bonus in the reward (step rewards not included)
    term_steps: dict = None            # term name -> [N, T] its step rewards (the terms that give them)

    @property
    def lengths(self):
        return [len(t) for t in self.tokens]


def prompt_ids(run, idx):
    """Each row's prompt for the prompt-shared forward (rows of a group share one), computed on
    the host from the rows' indices (no device sync); None when each row runs its own."""
    return None if run.shared_prompt_rows is None else idx // run.shared_prompt_rows


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
    return [run.problems.draw(rng) for _ in range(drawn * run.world)][run.rank * drawn:(run.rank + 1) * drawn]


def sample_round(run, step, round_):
    """G rollouts of each problem of one round, decoded and verified: a dict of per-group lists
    (problems, prompts) and per-row lists (tokens, sampler log-probs, finished, texts, solved), and each
    group's flatness: "flat", no signal in the reward the advantages are computed from (the
    outcome plus what each reward term would pay, RewardTerm.signal), and "flat_outcome", no
    signal in the outcome alone."""
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
    rows = [p for p in problems for _ in range(group)]
    correct, formatted = rewards.outcome(rows, texts)
    outcome = correct + args.format_reward * formatted
    paid = [p for p in (term.signal(run, rows, texts, correct) for term in run.terms.values()) if p is not None]
    return {"problems": problems, "prompts": prompts, "tokens": sampled.tokens, "logprobs": sampled.logprobs,
            "finished": sampled.finished, "texts": texts, "solved": correct.tolist(),
            "flat": flat_groups([outcome, *paid], group),
            "flat_outcome": flat_groups([outcome], group)}


def flat_groups(parts, group):
    """Per group of `group` consecutive rows: True when every part ([N] each: the outcome, each
    term's pay) is equal over its rows. Each part apart, not their sum: a charge can bring a
    solve's total down to a failure's, and the advantages still read the two apart."""
    flat = [True] * (len(parts[0]) // group)
    for values in parts:
        grouped = values.view(-1, group)
        flat = [f and same for f, same in zip(flat, (grouped.amax(1) == grouped.amin(1)).tolist())]
    return flat


def roll_out(run, step, keep):
    """`keep` groups of G rollouts, packed into rows. Each round draws (1 + --oversample) x
    `keep` prompts; rounds go on (at most --max-sample-rounds) until `keep` groups have signal
    (rewards that differ: the outcome, or what a reward term pays, so a group whose rollouts all
    solved but whose credits differ is kept), and the groups with signal come first (DAPO's
    dynamic sampling: a group of equal rewards has zero advantage). Returns the Rollouts and
    what was sampled: each group's flatness by the whole reward ("flat") and by the outcome
    alone ("flat_outcome"), the rounds used, every sampled token and every solve (kept or not)."""
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
    ids, attention, response, start = forward.pack_rollouts([pooled["prompts"][g] for g in chosen], tokens,
                                                         run.tokenizer.pad_token_id, run.device)
    sampler_logp = torch.zeros_like(response, device="cpu")
    for k, i in enumerate(rows):
        sampler_logp[k, start:start + len(tokens[k])] = torch.tensor(pooled["logprobs"][i])
    r = Rollouts(problems=[pooled["problems"][g] for g in chosen for _ in range(group)], tokens=tokens,
                 texts=[pooled["texts"][i] for i in rows], ids=ids, attention=attention, response=response, start=start,
                 finished=[pooled["finished"][i] for i in rows], sampler_logp=sampler_logp.to(run.device))
    return r, {"flat": flat, "flat_outcome": pooled["flat_outcome"], "rounds": round_ + 1,
               "tokens": sum(len(t) for t in pooled["tokens"]), "solved": sum(pooled["solved"])}


def old_pass(run, r, pooled):
    """No-grad forward over every row: fills r.old_logp, r.entropy, r.ref_logp, and r.pooled
    when a reward term asks for it (`pooled`)."""
    r.old_logp, r.entropy = torch.zeros_like(r.response), torch.zeros_like(r.response)
    r.ref_logp = torch.zeros_like(r.response) if run.ref_model else None
    with torch.no_grad(), run.autocast():
        chunks = forward.micro_batches(range(len(r.tokens)), r.lengths, r.start, run.args.micro_batch,
                                       run.shared_prompt_rows)
        for idx, width in chunks:
            groups = prompt_ids(run, idx)
            idx = idx.to(r.ids.device)
            rows = (r.ids[idx, :width], r.attention[idx, :width], r.response[idx, :width])
            out = forward.sequence_logprobs(run.train_model, *rows, start=r.start, entropy=True, hidden=pooled,
                                            groups=groups, temperature=run.args.temperature)
            r.old_logp[idx, :width], r.entropy[idx, :width] = out.logp, out.entropy
            if pooled:
                chunk = forward.response_mean(out.hidden, r.response[idx, :width])
                r.pooled = chunk.new_zeros((len(r.tokens), chunk.shape[-1])) if r.pooled is None else r.pooled
                r.pooled[idx] = chunk
            if r.ref_logp is not None:
                r.ref_logp[idx, :width] = forward.sequence_logprobs(run.ref_model, *rows, start=r.start, groups=groups,
                                                                    temperature=run.args.temperature).logp


def score(run, r, step):
    """Fills r.correct, r.formatted, r.reward [N] and r.step_rewards [N, T]; returns the terms'
    metrics, named "<term>/<metric>"."""
    r.correct, r.formatted = rewards.outcome(r.problems, r.texts)
    r.reward = r.correct + run.args.format_reward * r.formatted
    r.step_rewards = torch.zeros_like(r.response)
    r.bonuses, r.term_steps, metrics = {}, {}, {}
    for name, term in run.terms.items():
        bonus, step_rewards, term_metrics = term.score(run, r, step)
        if bonus is not None:
            r.reward = r.reward + bonus
            r.bonuses[name] = bonus
        if step_rewards is not None:
            r.step_rewards = r.step_rewards + step_rewards
            r.term_steps[name] = step_rewards
        metrics.update({f"{name}/{k}": v for k, v in term_metrics.items()})
    return metrics


def update_stats(args):
    """The names update() reports: its loss, approx. KL and clip fraction (and KL to the reference)."""
    return ("loss", "kl", "clip_frac", "kl_ref") if args.kl_coef else ("loss", "kl", "clip_frac")


def loss_variant(run):
    """The clipped surrogate the flags ask for (grpo.Loss)."""
    args = run.args
    return grpo.Loss(ratio=args.ratio, agg=args.agg, clip_low=args.clip_low, clip_high=args.clip_high,
                     kl_coef=args.kl_coef, entropy_coef=args.entropy_coef, max_length=run.max_new_tokens)


def update(run, r):
    """--ppo-epochs x --minibatches optimizer steps; each minibatch accumulates its micro-batches'
    gradients, its loss normalised by the whole global minibatch's tokens (or rows) the loss reads.
    Returns the means of update_stats over them."""
    args, world, variant = run.args, run.world, loss_variant(run)
    # minibatch k: the groups g with g % M == k, so M minibatches are the same on 1 or N processes
    minibatches = [forward.micro_batches([i for i in range(len(r.tokens)) if (i // args.group_size) % args.minibatches == k],
                                         r.lengths, r.start, args.micro_batch, run.shared_prompt_rows)
                   for k in range(args.minibatches)]
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
                update_minibatch(run, r, chunks, variant, max(counts[f"tokens/{k}"], 1.0) / world,
                                 max(counts[f"rows/{k}"], 1.0) / world, sums)
    means = (sums / max(1, args.ppo_epochs * args.minibatches)).tolist()
    return dict(zip(update_stats(args), means))


def update_minibatch(run, r, chunks, variant, num_tokens, num_sequences, sums):
    """One optimizer step on a minibatch, its micro-batches' gradients accumulated; adds the
    loss and token-weighted stats into `sums`."""
    args = run.args
    run.optimizer.zero_grad(set_to_none=True)
    for j, (idx, width) in enumerate(chunks):
        groups = prompt_ids(run, idx)
        idx = idx.to(r.ids.device)
        last = j == len(chunks) - 1  # only the last micro-batch's backward reduces gradients
        with gradient_sync(run.train_model, last), run.autocast():
            new = forward.sequence_logprobs(run.train_model, r.ids[idx, :width], r.attention[idx, :width],
                                            r.response[idx, :width], start=r.start, groups=groups,
                                            entropy=args.entropy_coef > 0, temperature=args.temperature)
            old = r.old_logp[idx, :width]
            # the sampler and the trainer's old policy differ with --bf16 rollouts and top-k / top-p
            weights = grpo.tis_weights(old, r.sampler_logp[idx, :width], args.tis_cap) if args.tis_cap else None
            mask = r.loss_mask[idx, :width]
            loss, stats = grpo.policy_loss(new.logp, old, r.advantages[idx, :width], mask, variant,
                                           ref_logp=None if r.ref_logp is None else r.ref_logp[idx, :width],
                                           entropy=new.entropy, weights=weights, num_tokens=num_tokens,
                                           num_sequences=num_sequences)
            loss.backward()
        # the chunk losses add up; their stats are token means: weight them by their share of the
        # minibatch's tokens over all processes (the mean of per-process means would differ)
        weight = mask.sum() / num_tokens
        kl_ref = stats["kl_ref"] if "kl_ref" in stats else torch.zeros((), device=sums.device)
        sums += torch.stack([loss.detach(), stats["approx_kl"] * weight, stats["clip_frac"] * weight, kl_ref * weight])
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()


def bonus_advantages(run, r):
    """{term: [N] what its bonus adds to each rollout's advantage}. By default the bonus centred
    in its group, added after the outcome's normalisation: its coefficient is its size in
    advantage units in every group (docs/grpo.md#reward-terms-and-advantages says why: added
    before, a group whose outcomes are all equal divides it by its own spread, and a 0.02
    difference of credit becomes a full-size advantage). --normalise-terms: the bonus
    normalised in its group apart, at its weight |coefficient| (RewardTerm.weight)."""
    args, scale = run.args, not run.args.no_scale_adv
    out = {}
    for name, bonus in r.bonuses.items():
        bonus = bonus.to(run.device)
        if args.normalise_terms:
            out[name] = abs(run.terms[name].weight(args)) * grpo.group_advantages(bonus, args.group_size, scale=scale)
        else:
            out[name] = grpo.group_advantages(bonus, args.group_size, scale=False)
    return out


def advantages(run, r):
    """[N, T]: the group-normalised outcome (+ format) of each rollout at every token, plus each
    term's bonus part (bonus_advantages), plus the rewards-to-go of the terms' step rewards."""
    args = run.args
    outcome = grpo.group_advantages((r.correct + args.format_reward * r.formatted).to(run.device),
                                    args.group_size, scale=not args.no_scale_adv)
    for part in bonus_advantages(run, r).values():
        outcome = outcome + part
    return outcome[:, None] + grpo.rewards_to_go(r.step_rewards.to(run.device))


GROUP_KINDS = ("mixed", "solved", "failed")


def group_kinds(r, group):
    """Per rollout, the kind of its group: "solved" (every rollout verifies), "failed" (none
    does) or "mixed"."""
    kinds = ["solved" if g.min() == 1 else "failed" if g.max() == 0 else "mixed" for g in r.correct.view(-1, group)]
    return [k for k in kinds for _ in range(group)]


def term_shifts(run, r):
    """How much each term moves the advantages: {"<term>/adv_shift" and "<term>/adv_shift_<kind>":
    (the sum over response tokens of |the term's part of the token's advantage|, the count that
    sum is a mean over)}. A term's part is its bonus_advantages plus the rewards-to-go of its own
    step rewards; the kinds are GROUP_KINDS (in an all-solved group only a credit moves anything)."""
    parts = {name: part[:, None].expand_as(r.response) for name, part in bonus_advantages(run, r).items()}
    for name, steps in (r.term_steps or {}).items():
        rtg = grpo.rewards_to_go(steps.to(run.device))
        parts[name] = parts[name] + rtg if name in parts else rtg
    kinds = group_kinds(r, run.args.group_size)
    response = r.response.to(run.device)
    out = {}
    for name, part in parts.items():
        moved = (part.abs() * response).sum(1).tolist()
        out[f"{name}/adv_shift"] = (sum(moved), "tokens")
        for kind in GROUP_KINDS:
            out[f"{name}/adv_shift_{kind}"] = (sum(m for m, k in zip(moved, kinds) if k == kind), f"tokens_{kind}")
    return out


def loss_mask(r, mask_truncated):
    """[N, T]: the tokens the loss reads: the response tokens, or with mask_truncated only those
    of rollouts that finished by themselves (DAPO's overlong filtering)."""
    if not mask_truncated:
        return r.response
    return r.response * torch.tensor(r.finished, dtype=r.response.dtype, device=r.response.device)[:, None]


def rl_step(run, step):
    """One RL step (the module docstring's six stages); the step's metrics, the same on every
    process, each added where it is computed (metrics.LOOP and the terms' say what they mean)."""
    args, m = run.args, StepMetrics(run.device)
    # 1-2. prompts and rollouts: this process's slice of each round's global list, G samples each
    with m.seconds("time_sample"):
        r, sampled = roll_out(run, step, keep=args.prompts_per_step // run.world)
    m.count("rollouts", len(r.tokens))
    m.count("groups", len(r.tokens) / args.group_size)
    m.count("tokens", r.response.sum().item())
    m.count("sampled_groups", len(sampled["flat"]))  # refilling draws a number of its own on each process
    m.count("sampled_rollouts", len(sampled["flat"]) * args.group_size)
    m.count("sampled_tokens", sampled["tokens"])
    m.mean("sampled_flat_frac", sum(sampled["flat"]), "sampled_groups")
    m.mean("sampled_flat_outcome_frac", sum(sampled["flat_outcome"]), "sampled_groups")
    m.mean("sampled_success_rate", sampled["solved"], "sampled_rollouts")
    m.mean("sample_rounds", sampled["rounds"], "processes")
    m.mean("response_length_mean", sum(r.lengths), "rollouts")
    m.most("response_length_max", max(r.lengths))
    m.mean("truncated_frac", len(r.tokens) - sum(r.finished), "rollouts")
    # 3. old pass
    with m.seconds("time_train"):
        old_pass(run, r, pooled=any(term.pooled for term in run.terms.values()))
    m.mean("entropy", (r.entropy * r.response).sum().item(), "tokens")
    m.mean("sampler_logp_gap", ((r.sampler_logp - r.old_logp).abs() * r.response).sum().item(), "tokens")
    with m.seconds("time_reward"):
        # 4. rewards
        for name, value in score(run, r, step).items():
            m.term(name, value)
        # 5. advantages, and the tokens the loss reads (--mask-truncated: none of a rollout cut by the
        # budget; its reward still counts in its group's mean and std, as DAPO's overlong filtering does)
        r.advantages = advantages(run, r)
        kinds = group_kinds(r, args.group_size)
        for kind in GROUP_KINDS:
            m.count(f"tokens_{kind}", sum(n for n, k in zip(r.lengths, kinds) if k == kind))
        for name, (total, per) in term_shifts(run, r).items():
            m.mean(name, total, per)
        r.loss_mask = loss_mask(r, args.mask_truncated)
    m.mean("reward_mean", r.reward.sum().item(), "rollouts")
    m.mean("success_rate", r.correct.sum().item(), "rollouts")
    m.mean("format_rate", r.formatted.sum().item(), "rollouts")
    moved = (r.advantages * r.response).abs().amax(1).view(-1, args.group_size).amax(1)
    m.mean("zero_adv_frac", (moved == 0).sum().item(), "groups")
    m.std("adv_std", r.advantages[:, r.start], "rollouts")  # the first response token's advantage
    m.mean("guess_rate", sum(answers.failure(p.nums, p.target, text, done) == "guess"
                             for p, text, done in zip(r.problems, r.texts, r.finished)), "rollouts")
    for name, total in search_sums(r).items():
        m.mean(name, total, "rollouts")
    # 6. update (steps below 0 are a reward term's warm-up: the term trains, the policy does not)
    with m.seconds("time_train", "time_update"):
        stats = dict.fromkeys(update_stats(args), 0.0) if step < 0 else update(run, r)
    for name, value in stats.items():
        m.mean(name, value, "processes")
    run.rollouts = r
    row, totals = m.reduce(run.world)
    row["tokens_per_s"] = totals["sampled_tokens"] / max(row["time_sample"], 1e-9)  # all ranks' tokens, every round
    row["kept_tokens_per_s"] = totals["tokens"] / max(row["time_sample"], 1e-9)
    return row
