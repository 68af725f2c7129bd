"""What a rollout earns: the outcome reward, the credit of the states it writes, and the
interface of the reward terms a mode adds (the built-in ones are in terms.py).

    correct, formatted = outcome(problems, texts)                   # 0/1 tensors [N]
    values = state_values(problems, texts, critic)                   # critic; critic=None: the oracle
    bonus = sequence_credit(values)                                  # [N]: mean state value per rollout
    credits = move_credit(values)                                    # or potential_credit: [(offset, reward)]
    steps, mask = token_rewards(credits, tokens, tokenizer, width)   # [N, width] per-token rewards

Reward terms. A mode (`train.py --mode clipo+critic`) names the terms of REWARD_TERMS it adds to
the outcome reward; a term is a RewardTerm subclass registered with @reward_term, in one file.
A length penalty, say:

    @reward_term("length")
    class LengthPenalty(RewardTerm):
        title, metrics = "length", {"penalty_mean": "mean length penalty per rollout"}
        flags = (("--length-coef", dict(type=float, default=0.1, help="penalty per budget used")),)

        def score(self, run, rollouts, step):
            bonus = -run.args.length_coef * rollouts.response.sum(1).cpu() / run.max_new_tokens
            return bonus, None, {"penalty_mean": bonus.mean().item()}

A term with state (a model, an optimizer, a pool) builds it in __init__(run) and defines
state_dict / load_state_dict: checkpoints keep it and --resume restores it (RewardTerm says all).
`run` is run.Run (the flags are run.args), `rollouts` is rl.Rollouts, `step` the optimizer steps done.

States. A state is a number set `answers.extract_states` finds in a completion. Its value is
the exact oracle's 0/1 ("can the target still be reached from here?") or the critic's calibrated
probability of the same (critic.reachability). A state that is not a legal move's result is worth 0.
Imports: answers, countdown, grpo, model (token offsets), torch.
"""
import bisect
from typing import NamedTuple

import torch

import answers
import countdown
import grpo
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
    for states the search reached, never for writing the target down. Every state of a blind
    answer (answers.blind_answer: a block its search did not find) is worth 0 too: the states
    of a search that answers without having reached the target earn nothing, so a lucky guess
    never out-earns an honest search."""
    written = [answers.extract_states(t) for t in texts]
    found = []
    for p, t, states in zip(problems, texts, written):
        lines = answers.read_search(p.nums, p.target, t)
        blind = answers.blind_answer(t, lines)
        found.append([(o, s, legal and not blind) for (o, s), legal in zip(states, legal_states(lines, states))])
    flat = [(k, o, s, p.target) for k, (p, states) in enumerate(zip(problems, found)) for o, s, legal in states
            if legal]
    values = iter(values_of([s for _, _, s, _ in flat], [t for *_, t in flat], critic))
    return [[State(o, len(s), next(values) if legal else 0.0) for o, s, legal in states] for states in found]


def legal_states(lines, states):
    """For each of `states` (answers.extract_states(text)), in order: is it the child of a legal
    written move (`lines`: answers.read_search of the same text)? The states of a search are its
    moves' children, one each, in writing order."""
    lines = iter(lines)
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


def dead_end_charges(values, solved, answer_offsets):
    """A charge for each dead end a search that solves writes: -(1 - V(s)) / n on each of its n
    written states (an oracle dead end, V = 0, charged 1 / n), so the charges of a solved rollout
    sum to minus the share of its states that are dead, at most 1; a rollout that does not solve
    is never charged. A solved rollout that writes no state at all (a bare block) is charged the
    full 1 at `answer_offsets` (where its block starts), as a blind answer's states are (worth 0):
    a verified guess earns 1 - beta, below any honest solve. Per rollout [(offset, reward)]. Why
    only solved ones: under a binding budget a failed search and a guess both earn 0, and a guess
    writes few states; a charge on every rollout's dead ends paid the policy to stop searching:
    see docs/critic.md#from-values-to-rewards-six-credits---critic-credit."""
    return [([(s.offset, -(1.0 - s.value) / len(vs)) for s in vs] if vs else [(at, -1.0)]) if ok else []
            for vs, ok, at in zip(values, solved, answer_offsets)]


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
# State credit: the oracle's and the critic's values of the states a rollout writes, as rewards

STATE_METRICS = {"bonus_mean": "sequence / prune credit: mean bonus per rollout, before beta",
                 "states_per_rollout": "states scored per rollout",
                 "step_reward_sum": "process/move/potential/prune-steps credit: step rewards per rollout, before beta"}


CREDITS = ("sequence", "process", "move", "potential", "prune", "prune-steps")


def rollout_credit(credit, values, solved, texts, initial):
    """What `credit` (before beta) gives each rollout: (bonus [N], None) for the credits that join
    the reward (sequence, prune), or (None, per rollout [(offset, reward)]) for the step credits."""
    if credit == "sequence":
        return sequence_credit(values), None
    if credit == "prune":
        charges = dead_end_charges(values, solved, answer_offsets(texts))
        return torch.tensor([sum(r for _, r in cs) for cs in charges], dtype=torch.float), None  # float: [] sums to 0
    if credit == "process":
        return None, [[(s.offset, s.value) for s in vs] for vs in values]
    if credit == "move":
        return None, move_credit(values)
    if credit == "prune-steps":
        return None, dead_end_charges(values, solved, answer_offsets(texts))
    return None, potential_credit(values, initial)


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
    bonus, credits = rollout_credit(args.critic_credit, values, rollouts.correct.tolist(), rollouts.texts, initial)
    if bonus is not None:
        metrics["bonus_mean"] = bonus.mean().item()
        return args.critic_coef * bonus, None, metrics
    width = rollouts.ids.shape[1] - rollouts.start
    steps, mask = token_rewards(credits, rollouts.tokens, run.tokenizer, width)
    steps = torch.nn.functional.pad(steps, (rollouts.start, 0)).to(run.device)
    mask = torch.nn.functional.pad(mask, (rollouts.start, 0)).to(run.device)
    metrics["step_reward_sum"] = (steps.sum() / len(values)).item()
    if args.critic_credit == "process":
        steps = grpo.normalise_step_rewards(steps, mask, args.group_size, scale=not args.no_scale_adv)
    return None, args.critic_coef * steps, metrics


def answer_offsets(texts):
    """Where each text's <Solution> block starts (its last character when it has none)."""
    return [t.find("<Solution>") if "<Solution>" in t else max(len(t) - 1, 0) for t in texts]


def initial_values(problems, critic=None):
    return values_of([p.nums for p in problems], [p.target for p in problems], critic)


# ---------------------------------------------------------------------------------------------
# Reward terms: what a mode adds to the outcome reward

class RewardTerm:
    """A reward term: `--mode grpo+<name>` adds it to the outcome reward. Subclass it, register it
    with @reward_term(name), and override what it needs; rl.py, run.py and train.py read only this:

      metrics             {name: meaning}, logged as "<term>/<name>" (docs/metrics.md lists them)
      flags               ((flag, argparse keywords), ...): train.py shows them under `title`
      pooled              True: the old pass fills rollouts.pooled [N, H], the mean final hidden
                          state over each response (forward.response_mean)
      check(args, on)     one-line problems with the flags (on: the mode has the term), before any model loads
      complete(args, on)  fill defaults that depend on other flags
      warmup_steps(args)  steps of rollouts (numbered -W..-1) the term trains on before the policy's first
      weight(args)        the coefficient its bonus carries (--normalise-terms weighs by it)
      signal(run, problems, texts, correct) -> [N] what each rollout would earn from the term,
                          from the texts alone, or None: refilling keeps a group whose outcome
                          plus these differ (a term that needs the old pass, as CLIPO, says None)
      __init__(run)       its state, built once from the run (run.Run)
      score(run, rollouts, step) -> (bonus [N] added to each rollout's reward before group
                          normalisation, or None; step rewards [N, T] added to the per-token
                          advantages, or None; {metric: float})
      state_dict() / load_state_dict(state): define both and the run's checkpoints keep the
                          term's state (under its name) and a --resume restores it
    """
    title = None
    metrics = {}
    flags = ()
    pooled = False

    @staticmethod
    def check(args, on):
        return []

    @staticmethod
    def complete(args, on):
        pass

    @staticmethod
    def warmup_steps(args):
        return 0

    @staticmethod
    def weight(args):
        return 1.0

    def signal(self, run, problems, texts, correct):
        return None

    def __init__(self, run):
        pass

    def score(self, run, rollouts, step):
        raise NotImplementedError


REWARD_TERMS = {}  # name -> RewardTerm subclass, in registration order (the order terms are scored in)


def reward_term(name):
    """Register a RewardTerm subclass as the term of mode `name`."""
    def register(cls):
        REWARD_TERMS[name] = cls
        return cls
    return register


def mode_terms(mode):
    """The reward terms a mode adds, in registry order: "clipo+critic" -> ("critic", "clipo")."""
    parts = set(mode.split("+"))
    return tuple(name for name in REWARD_TERMS if name in parts)


def flag_groups():
    """[(title, flags)] of the registered terms, each flag once, under the class that declares it
    (the critic and the oracle share their credit's flags)."""
    groups = {}
    for cls in REWARD_TERMS.values():
        for owner in reversed(cls.__mro__):
            if vars(owner).get("flags") and owner not in groups:
                groups[owner] = (owner.title, owner.flags)
    return list(groups.values())
