"""critic.py: digit encoding, order invariance, InfoNCE and AUROC against brute force, save/load,
and a short training run that must beat chance against the exact oracle."""
import itertools
import math
import random

import torch

import countdown
import critic


def test_digits_match_reversed_decimal_strings():
    values = [0, 7, 12, 305, 1999, 9999, 123456]
    got = critic.digits(torch.tensor(values)).tolist()
    for v, row in zip(values, got):
        s = str(min(v, 9999))[::-1]
        assert row == [int(ch) for ch in s] + [critic.EMPTY] * (critic.PLACES - len(s))


def test_score_is_order_invariant_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    model = critic.Critic().eval()
    states = [(37, 17, 26), (54, 26), (80,), (3, 4, 5, 6)]
    perms = [tuple(reversed(s)) for s in states]
    a, b = model.score(states, [46] * 4), model.score(perms, [46] * 4)
    assert torch.allclose(a, b, atol=1e-5) and a.std() > 0
    path = tmp_path / "c.safetensors"
    critic.save(model, path)
    assert torch.equal(critic.load(path).score(states, [46, 10, 80, 18]), model.score(states, [46, 10, 80, 18]))
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_infonce_masks_duplicate_goals_like_a_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 5, generator=g, dtype=torch.float64)
    goals = torch.tensor([7, 3, 7, 9, 3])
    got = critic.infonce(logits, goals)
    total = 0.0
    for i in range(5):  # rows: state i against goals j; columns: goal j against states i
        row = [logits[i, j] for j in range(5) if j == i or goals[j] != goals[i]]
        col = [logits[j, i] for j in range(5) if j == i or goals[j] != goals[i]]
        total += -logits[i, i] + torch.logsumexp(torch.stack(row), 0)
        total += -logits[i, i] + torch.logsumexp(torch.stack(col), 0)
    assert torch.allclose(got, total / 10)


def test_auroc_against_pairwise_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(30)]
        labels = [rng.random() < 0.5 for _ in range(30)]
        if all(labels) or not any(labels):
            continue
        pairs = [(p, n) for p, n in itertools.product(range(30), range(30)) if labels[p] and not labels[n]]
        brute = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs)
        assert math.isclose(critic.auroc(scores, labels), brute / len(pairs))


def test_oracle_pairs_are_balanced_and_labelled_by_the_oracle():
    pairs = critic.oracle_pairs(n_problems=20)
    assert sum(y for _, _, y in pairs) * 2 == len(pairs) > 20
    for state, target, label in pairs[::7]:
        assert countdown.solvable(state, target) == label


def test_short_training_beats_chance():
    torch.set_num_threads(1)
    model = critic.train(steps=60, batch_size=256, progress=False)
    assert critic.evaluate(model, critic.oracle_pairs(n_problems=60)) > 0.75
