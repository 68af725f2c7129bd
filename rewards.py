"""What a rollout earns: the outcome reward, and dense rewards for the states it writes.

    correct, formatted = outcome(problems, texts)                   # 0/1 tensors [N]
    values = state_values(problems, texts, critic)                   # critic; critic=None: the oracle
    bonus = sequence_credit(values)                                  # [N]: mean state value per rollout
    steps, mask = process_credit(values, texts, tokens, tokenizer, width)   # [N, width] per-token rewards

A state is a number set `countdown.extract_states` finds in a completion. Its value is the
exact oracle's 0/1 ("can the target still be reached from here?") or the critic's probability
of the target against a bank of the other targets the problem distribution uses (a softmax over
the critic's scores: higher when the state points at this target and few others).
Imports: countdown, model (token offsets), torch.
"""
import bisect

import torch

import countdown
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
