"""What a rollout earns: the outcome reward, and the reward terms a mode adds to it.

    correct, formatted = outcome(problems, texts)                   # 0/1 tensors [N]
    values = state_values(problems, texts, critic)                   # critic; critic=None: the oracle
    bonus = sequence_credit(values)                                  # [N]: mean state value per rollout
    credits = move_credit(values)                                    # or potential_credit: [(offset, reward)]
    steps, mask = token_rewards(credits, tokens, tokenizer, width)   # [N, width] per-token rewards

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

States. A state is a number set `answers.extract_states` finds in a completion. Its value is
the exact oracle's 0/1 ("can the target still be reached from here?") or the critic's calibrated
probability of the same (critic.reachability). A state that is not a legal move's result is worth 0.
Imports: answers, countdown, critic (online rows), grpo, clipo (metric names), model (token offsets), distributed, torch.
"""
import bisect
import random
from typing import Callable, NamedTuple

import torch

import answers
import clipo
import countdown
import critic
import grpo
from distributed import all_gather_lists, seed_for
from model import token_end_offsets

def outcome(problems, texts):
    """(correct, formatted): verify() and "a <Solution> block parses", as float tensors."""
    correct = [countdown.verify(p.nums, p.target, t) for p, t in zip(problems, texts)]
    formatted = [countdown.solution_format_ok(t, len(p.nums)) for p, t in zip(problems, texts)]
    return torch.tensor(correct, dtype=torch.float), torch.tensor(formatted, dtype=torch.float)


class State(NamedTuple):
    offset: int    # index in the completion of the state's last character
    size: int      # how many numbers it holds (n - 1 after the first move, ..., 1 at a leaf)
    value: float   # the oracle's 0/1 or the critic's probability that the target is reachable


def values_of(states, targets, critic=None):
    """The value of each (state, target): "can the target still be reached from here?", as the
    exact oracle's 0/1 (critic=None) or the critic's calibrated probability (critic.reachability:
    its score through a logistic fit per state size on hindsight labels; an InfoNCE score itself
    is no probability of reachability)."""
    if critic is None:
        return [float(countdown.solvable(s, t)) for s, t in zip(states, targets)]
    return critic.reachability(states, targets).tolist() if states else []


def state_values(problems, texts, critic=None):
    """Per rollout, a State for every state it writes, in writing order. A state that is not the
    result of a legal move of the state it continues (answers.read_search: wrong arithmetic, a
    number that was not there, a fabricated line) is worth 0, whatever its numbers: credit is
    for states the search reached, never for writing the target down."""
    written = [answers.extract_states(t) for t in texts]
    found = [[(o, s, legal) for (o, s), legal in zip(states, legal_states(p, t, states))]
             for p, t, states in zip(problems, texts, written)]
    flat = [(k, o, s, p.target) for k, (p, states) in enumerate(zip(problems, found)) for o, s, legal in states
            if legal]
    values = iter(values_of([s for _, _, s, _ in flat], [t for *_, t in flat], critic))
    return [[State(o, len(s), next(values) if legal else 0.0) for o, s, legal in states] for states in found]


def legal_states(problem, text, states):
    """For each of `states` (answers.extract_states(text)), in order: is it the child of a legal
    written move? The states of a search are its moves' children, one each, in writing order."""
    lines = iter(answers.read_search(problem.nums, problem.target, text))
    line = next(lines, None)
    out = []
    for _, state in states:
        if line is not None and tuple(state) == tuple(line.child):
            out.append(line.legal)
            line = next(lines, None)
        else:
            out.append(False)
    return out


def sequence_credit(values):
    """Mean state value of each rollout (0 for a rollout that writes no state): [N]."""
    return torch.tensor([sum(s.value for s in vs) / len(vs) if vs else 0.0 for vs in values])


def move_credit(values):
    """The paper's per-move reward, for a search that backtracks: at each depth (state size) the
    best state the rollout reached earns its value, once; dead ends earn nothing, and no charge
    is made for visiting them. Per rollout [(offset, reward)]. A complete correct search earns
    the most a rollout can (one reachable state per depth, the target at the last)."""
    credits = []
    for vs in values:
        best = {}
        for state in vs:  # the first of the highest-valued states of each size
            if state.size not in best or state.value > best[state.size].value:
                best[state.size] = state
        credits.append(sorted((s.offset, s.value) for s in best.values() if s.value > 0))
    return credits


def potential_credit(values, initial):
    """Potential-based shaping (Ng, Harada & Russell 1999): each state written earns V(s') - V(s),
    s the state written before it (the problem's numbers, value `initial[k]`, before the first):
    per rollout [(offset, reward)]. The rewards sum to V(last state) - V(initial), so shaping
    changes no return beyond that (the optimal policy is unchanged)."""
    credits = []
    for vs, v0 in zip(values, initial):
        previous, steps = v0, []
        for state in vs:
            steps.append((state.offset, state.value - previous))
            previous = state.value
        credits.append(steps)
    return credits


def dead_end_charges(values, solved):
    """A charge for each dead end a search that solves writes: -(1 - V(s)) / n on each of its n
    written states (an oracle dead end, V = 0, charged 1 / n), so the charges of a solved rollout
    sum to minus the share of its states that are dead, at most 1; a rollout that does not solve
    is never charged. Per rollout [(offset, reward)]. Why only solved ones: under a binding budget
    a failed search and a guess both earn 0, and a guess writes few states; a charge on every
    rollout's dead ends paid the policy to stop searching (docs/critic.md, the credits table)."""
    return [[(s.offset, -(1.0 - s.value) / len(vs)) for s in vs] if ok and vs else []
            for vs, ok in zip(values, solved)]


def token_rewards(credits, tokens, tokenizer, width):
    """Per rollout [(char offset, reward)] -> rewards [N, width] on the token that finishes writing
    each offset's character, and the mask of those positions; column j is response token j."""
    rewards = torch.zeros((len(credits), width))
    mask = torch.zeros((len(credits), width), dtype=torch.bool)
    for k, (cs, toks) in enumerate(zip(credits, tokens)):
        if not cs:
            continue
        ends = token_end_offsets(tokenizer, toks)
        for offset, reward in cs:
            j = bisect.bisect_right(ends, offset)  # the first token whose text ends after the offset
            if j < len(toks):
                rewards[k, j] += reward
                mask[k, j] = True
    return rewards, mask


# ---------------------------------------------------------------------------------------------
# Reward terms: the registry the modes name

def _unit_weight(args):
    return 1.0


class RewardTerm(NamedTuple):
    score: Callable             # (run, rollouts, step) -> (bonus [N] | None, step rewards [N, T] | None, metrics)
    metrics: dict               # metric name -> meaning (logged as "<term>/<name>")
    needs_hidden: bool = False  # the old-log-prob pass then pools the final hidden states (rollouts.pooled)
    weight: Callable = _unit_weight  # args -> the coefficient the bonus carries (--normalise-terms weighs by it)


REWARD_TERMS = {}


def reward_term(name, metrics, needs_hidden=False, weight=_unit_weight):
    """Register `fn(run, rollouts, step)` as the reward term of mode `name` (module docstring).
    weight(args): the coefficient its bonus is scaled by; with --normalise-terms the bonus is
    normalised within its group (its scale is gone) and then weighed by |weight|."""
    def register(fn):
        REWARD_TERMS[name] = RewardTerm(fn, metrics, needs_hidden, weight)
        return fn
    return register



STATE_METRICS = {"bonus_mean": "sequence / prune credit: mean bonus per rollout, before beta",
                 "states_per_rollout": "states scored per rollout",
                 "adv_shift": "sequence / prune credit: mean absolute change the bonus made to a rollout's group-normalised "
                              "advantage (rl.bonus_shifts)",
                 "step_reward_sum": "process/move/potential/prune-steps credit: step rewards per rollout, before beta"}


CREDITS = ("sequence", "process", "move", "potential", "prune", "prune-steps")


def state_credit(run, rollouts, values, initial):
    """How state values become rewards (--critic-credit, weight beta = --critic-coef):
    sequence: beta x the rollout's mean state value joins its reward;
    process: each value is a step reward on the token that finishes its state, normalised over
        the group's steps (so dead ends are charged against the group's mean);
    move: beta x move_credit on those tokens (the best state per depth; dead ends free);
    potential: beta x potential_credit on those tokens (V(s') - V(s) in writing order);
    prune: beta x the sum of dead_end_charges joins a solved rollout's reward (minus the share of
        its states that are dead ends; nothing for a rollout that does not solve);
    prune-steps: beta x dead_end_charges on the tokens that finish each state of a solved rollout.
    Step rewards become advantages as rewards-to-go (rl.py)."""
    args = run.args
    metrics = {"states_per_rollout": sum(len(v) for v in values) / len(values)}
    if args.critic_credit in ("sequence", "prune"):
        if args.critic_credit == "sequence":
            bonus = sequence_credit(values)
        else:
            bonus = torch.tensor([sum(r for _, r in cs) for cs in dead_end_charges(values, rollouts.correct.tolist())],
                                 dtype=torch.float)  # a group with nothing solved sums empty lists to int 0
        metrics["bonus_mean"] = bonus.mean().item()
        return args.critic_coef * bonus, None, metrics
    if args.critic_credit == "process":
        credits = [[(s.offset, s.value) for s in vs] for vs in values]
    elif args.critic_credit == "move":
        credits = move_credit(values)
    elif args.critic_credit == "prune-steps":
        credits = dead_end_charges(values, rollouts.correct.tolist())
    else:
        credits = potential_credit(values, initial)
    width = rollouts.ids.shape[1] - rollouts.start
    steps, mask = token_rewards(credits, rollouts.tokens, run.tokenizer, width)
    steps = torch.nn.functional.pad(steps, (rollouts.start, 0)).to(run.device)
    mask = torch.nn.functional.pad(mask, (rollouts.start, 0)).to(run.device)
    metrics["step_reward_sum"] = (steps.sum() / len(values)).item()
    if args.critic_credit == "process":
        steps = grpo.normalise_step_rewards(steps, mask, args.group_size, scale=not args.no_scale_adv)
    return None, args.critic_coef * steps, metrics


def initial_values(problems, critic=None):
    return values_of([p.nums for p in problems], [p.target for p in problems], critic)


CRITIC_METRICS = {**STATE_METRICS,
                  "online_loss": "--critic-online: the critic's InfoNCE loss on this step's batch",
                  "online_rows": "--critic-online: hindsight rows the step's rollouts gave (all ranks)",
                  **{f"auroc_{k}": f"--critic-online: AUROC vs the oracle on held-out {k}-number states (eval steps)"
                     for k in (3, 2, 1)}}


@reward_term("critic", CRITIC_METRICS, weight=lambda args: args.critic_coef)
def critic_credit(run, rollouts, step):
    """The contrastive critic's values of the states a rollout writes; with --critic-online the
    critic then trains on them (critic.written_rows: hindsight from the rollouts themselves)."""
    values = state_values(rollouts.problems, rollouts.texts, run.critic)
    initial = initial_values(rollouts.problems, run.critic) if run.args.critic_credit == "potential" else None
    bonus, steps, metrics = state_credit(run, rollouts, values, initial)
    if run.critic_trainer is not None:
        metrics.update(train_critic_online(run, rollouts, step))
    return bonus, steps, metrics


def train_critic_online(run, rollouts, step):
    """One critic update on every process's rows: the same rows and seed everywhere, so the
    replicas stay equal with no gradient collective (the critic lives on the host)."""
    rows = [row for p, text in zip(rollouts.problems, rollouts.texts)
            for row in critic.written_rows(p.nums, p.target, [s for _, s in answers.extract_states(text)])]
    rows = all_gather_lists(rows, run.world)
    loss = run.critic_trainer.step(random.Random(seed_for(run.args.seed, "critic-online", step)), rows)
    metrics = {"online_rows": float(len(rows))}  # the same on every rank, as the loss and AUROCs
    if loss is not None:
        metrics["online_loss"] = loss
    if (step + 1) % run.args.eval_every == 0 or step + 1 == run.args.steps:
        run.critic_trainer.recalibrate()
        metrics.update({f"auroc_{k}": v for k, v in run.critic_trainer.evaluate().items()})
    return metrics


@reward_term("oracle", STATE_METRICS, weight=lambda args: args.critic_coef)
def oracle_credit(run, rollouts, step):
    """The exact oracle's 0/1 values of the same states (the upper bound of the critic)."""
    values = state_values(rollouts.problems, rollouts.texts)
    return state_credit(run, rollouts, values, initial_values(rollouts.problems))


@reward_term("clipo", clipo.METRICS, needs_hidden=True, weight=lambda args: args.clipo_lambda)
def clipo_bonus(run, rollouts, step):
    """CLIPO's per-rollout bonus; its head trains on this step's rollouts first. During the head's
    warm-up (steps below 0, before the policy's first: train.clipo_warmup) no bonus is given."""
    generator = torch.Generator(run.device).manual_seed(seed_for(run.args.seed, "clipo", step, run.rank))
    bonus, stats = run.clipo.step(rollouts.pooled, rollouts.correct.to(run.device), run.args.group_size, generator,
                                  run.world)
    return (None if step < 0 else bonus.cpu()), None, {k: v.item() for k, v in stats.items()}
