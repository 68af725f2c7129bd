"""What a rollout earns: the outcome reward, and the reward terms a mode adds to it.

    correct, formatted = outcome(problems, texts)                   # 0/1 tensors [N]
    values = state_values(problems, texts, critic)                   # critic; critic=None: the oracle
    bonus = sequence_credit(values)                                  # [N]: mean state value per rollout
    steps, mask = process_credit(values, texts, tokens, tokenizer, width)   # [N, width] per-token rewards

Reward terms. A mode (`train.py --mode clipo+critic`) names the terms of REWARD_TERMS it adds to
the outcome reward; a term is one function registered with `@reward_term`:

    @reward_term("length", {"penalty_mean": "mean length penalty per rollout"})
    def length_penalty(run, rollouts, step):
        bonus = -run.args.length_coef * rollouts.response.sum(1).cpu() / run.max_new_tokens
        return bonus, None, {"penalty_mean": bonus.mean().item()}

It returns (bonus [N] added to each rollout's reward before group normalisation, or None;
step rewards [N, T] added to the per-token advantages, or None; metrics {name: float}, logged
as "<term>/<name>" and documented by the dict given to `reward_term`). `run` is run.Run (the
flags are run.args), `rollouts` is rl.Rollouts, `step` the optimizer steps done.

States. A state is a number set `countdown.extract_states` finds in a completion. Its value is
the exact oracle's 0/1 ("can the target still be reached from here?") or the critic's probability
of the target against a bank of the other targets the problem distribution uses (a softmax over
the critic's scores: higher when the state points at this target and few others).
Imports: countdown, grpo, clipo (metric names), model (token offsets), distributed (seeds), torch.
"""
import bisect
from typing import Callable, NamedTuple

import torch

import clipo
import countdown
import grpo
from distributed import seed_for
from model import token_end_offsets

TARGET_BANK = list(range(countdown.TARGET_RANGE[0], countdown.TARGET_RANGE[1] + 1))


def outcome(problems, texts):
    """(correct, formatted): verify() and "a <Solution> block parses", as float tensors."""
    correct = [countdown.verify(p.nums, p.target, t) for p, t in zip(problems, texts)]
    formatted = [countdown.solution_format_ok(t, len(p.nums)) for p, t in zip(problems, texts)]
    return torch.tensor(correct, dtype=torch.float), torch.tensor(formatted, dtype=torch.float)


def state_values(problems, texts, critic=None):
    """Per rollout, [(char offset, value)] for every state it writes (see module docstring)."""
    found = [countdown.extract_states(t) for t in texts]
    if critic is None:
        return [[(o, float(countdown.solvable(s, p.target))) for o, s in states] for p, states in zip(problems, found)]
    flat = [(k, o, s, p.target) for k, (p, states) in enumerate(zip(problems, found)) for o, s in states]
    out = [[] for _ in texts]
    if not flat:
        return out
    bank = [sorted(set(TARGET_BANK) | {t}) for _, _, _, t in flat]
    pairs = [(s, b) for (_, _, s, _), targets in zip(flat, bank) for b in targets]
    scores = critic.score([s for s, _ in pairs], [b for _, b in pairs]).tolist()
    at = 0
    for (k, o, _, target), targets in zip(flat, bank):
        row = torch.tensor(scores[at:at + len(targets)])
        out[k].append((o, row.softmax(0)[targets.index(target)].item()))
        at += len(targets)
    return out


def sequence_credit(values):
    """Mean state value of each rollout (0 for a rollout that writes no state): [N]."""
    return torch.tensor([sum(v for _, v in vs) / len(vs) if vs else 0.0 for vs in values])


def process_credit(values, texts, tokens, tokenizer, width):
    """Per-token rewards [N, width] (a state's value sits on the token that finishes writing
    it) and the mask of those positions; column j is response token j."""
    rewards = torch.zeros((len(values), width))
    mask = torch.zeros((len(values), width), dtype=torch.bool)
    for k, (vs, toks) in enumerate(zip(values, tokens)):
        if not vs:
            continue
        ends = token_end_offsets(tokenizer, toks)
        for offset, value in vs:
            j = bisect.bisect_right(ends, offset)  # the first token whose text ends after the offset
            if j < len(toks):
                rewards[k, j] = value
                mask[k, j] = True
    return rewards, mask


# ---------------------------------------------------------------------------------------------
# Reward terms: the registry the modes name

class RewardTerm(NamedTuple):
    score: Callable             # (run, rollouts, step) -> (bonus [N] | None, step rewards [N, T] | None, metrics)
    metrics: dict               # metric name -> meaning (logged as "<term>/<name>")
    needs_hidden: bool = False  # the old-log-prob pass then pools the final hidden states (rollouts.pooled)


REWARD_TERMS = {}


def reward_term(name, metrics, needs_hidden=False):
    """Register `fn(run, rollouts, step)` as the reward term of mode `name` (module docstring)."""
    def register(fn):
        REWARD_TERMS[name] = RewardTerm(fn, metrics, needs_hidden)
        return fn
    return register


STATE_METRICS = {"bonus_mean": "sequence credit: mean state value per rollout",
                 "states_per_rollout": "states scored per rollout"}


def state_credit(run, rollouts, values):
    """--critic-credit sequence: beta x the mean state value joins the reward; process: each
    value is a step reward on the token that finishes its state, normalised over the group's
    steps and weighted by beta (--critic-coef)."""
    args = run.args
    metrics = {"states_per_rollout": sum(len(v) for v in values) / len(values)}
    if args.critic_credit == "sequence":
        bonus = sequence_credit(values)
        metrics["bonus_mean"] = bonus.mean().item()
        return args.critic_coef * bonus, None, metrics
    width = rollouts.ids.shape[1]
    steps, mask = process_credit(values, rollouts.texts, rollouts.tokens, run.tokenizer, width - rollouts.start)
    steps = torch.nn.functional.pad(steps, (rollouts.start, 0)).to(run.device)
    mask = torch.nn.functional.pad(mask, (rollouts.start, 0)).to(run.device)
    normalised = grpo.normalise_step_rewards(steps, mask, args.group_size, scale=not args.no_scale_adv)
    return None, args.critic_coef * normalised, metrics


@reward_term("critic", STATE_METRICS)
def critic_credit(run, rollouts, step):
    """The contrastive critic's values of the states a rollout writes."""
    return state_credit(run, rollouts, state_values(rollouts.problems, rollouts.texts, run.critic))


@reward_term("oracle", STATE_METRICS)
def oracle_credit(run, rollouts, step):
    """The exact oracle's 0/1 values of the same states (the upper bound of the critic)."""
    return state_credit(run, rollouts, state_values(rollouts.problems, rollouts.texts))


@reward_term("clipo", clipo.METRICS, needs_hidden=True)
def clipo_bonus(run, rollouts, step):
    """CLIPO's per-rollout bonus; its head trains on this step's rollouts first. During the
    first --clipo-warmup steps only the head trains: no bonus (and rl.py skips the update)."""
    generator = torch.Generator(run.device).manual_seed(seed_for(run.args.seed, "clipo", step, run.rank))
    bonus, stats = run.clipo.step(rollouts.pooled, rollouts.correct.to(run.device), run.args.group_size, generator,
                                  run.world)
    warming = step < run.args.clipo_warmup
    return (None if warming else bonus.cpu()), None, {k: v.item() for k, v in stats.items()}
