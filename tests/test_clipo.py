"""clipo.py against a slow reference written here: a Python loop over groups and anchors."""
import collections
import math

import pytest
import torch

from clipo import ContrastiveHead, contrastive_loss, contrastive_reward, cosine_stats
from forward import response_mean

G = 6
CORRECT = torch.tensor([1, 1, 0, 1, 0, 0,    # valid anchors 0, 1, 3
                        0, 0, 0, 0, 0, 0,    # none correct
                        1, 0, 0, 0, 0, 0,    # one correct: no positive
                        1, 1, 1, 1, 1, 1,    # all correct: no negative
                        1, 1, 1, 1, 1, 0])   # five valid anchors


def _z(seed=0, n=len(CORRECT), d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _reference(z, correct, kind, tau, picks=None):
    """Per group, per anchor, explicit sums over Python lists of scalars."""
    losses, valid = [], []
    for start in range(0, len(z), G):
        rows = list(range(start, start + G))
        for i in rows:
            pos = [p for p in rows if p != i and correct[p] and correct[i]]
            neg = [a for a in rows if not correct[a]]
            ok = bool(correct[i]) and len(pos) >= 1 and len(neg) >= 1
            valid.append(ok)
            if not ok:
                losses.append(z.sum() * 0)
                continue
            l = {a: (z[i] * z[a]).sum() / tau for a in rows}
            denominator = torch.log(sum(torch.exp(l[a]) for a in rows if a != i))
            if kind == "infonce":
                losses.append(-l[picks[i]] + denominator)
            elif kind == "supcon":
                losses.append(sum(-l[p] + denominator for p in pos) / len(pos))
            else:
                losses.append(-torch.log(sum(torch.exp(l[p]) for p in pos)) + denominator)
    return torch.stack(losses), torch.tensor(valid)


def _picks(seed, z, correct):
    """The positives the fused infonce draws with this generator seed (same noise, same rule)."""
    noise = torch.rand((len(z) // G, G, G), generator=torch.Generator().manual_seed(seed))
    picks = {}
    for g in range(len(z) // G):
        for i in range(G):
            candidates = [p for p in range(G) if p != i and correct[g * G + p] and correct[g * G + i]]
            if candidates:
                picks[g * G + i] = g * G + max(candidates, key=lambda p: noise[g, i, p].item())
    return picks


@pytest.mark.parametrize("kind", ["infonce", "supcon", "softnn"])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_matches_loop_reference_values_and_gradients(kind, tau):
    base = _z()
    z = base.clone().requires_grad_()
    loss, valid = contrastive_loss(z, CORRECT, G, temperature=tau, kind=kind,
                                   generator=torch.Generator().manual_seed(7))
    zr = base.clone().requires_grad_()
    ref_loss, ref_valid = _reference(zr, CORRECT.tolist(), kind, tau, _picks(7, base, CORRECT.tolist()))
    assert torch.equal(valid, ref_valid)
    assert valid.tolist() == [1, 1, 0, 1, 0, 0] + [0] * 18 + [1, 1, 1, 1, 1, 0]
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    weights = torch.linspace(0.5, 1.5, len(loss), dtype=torch.float64)  # a generic downstream use
    (loss * weights).sum().backward()
    (ref_loss * weights).sum().backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-5)
    assert torch.isfinite(z.grad).all() and (z.grad[6:24] == 0).all()  # invalid groups: no gradient


def test_no_valid_anchor_gives_zeros_without_nan():
    for correct in (torch.zeros(12), torch.ones(12), torch.tensor([1, 0] + [0] * 10)):
        z = _z(n=12).requires_grad_()
        for kind in ("infonce", "supcon", "softnn"):
            loss, valid = contrastive_loss(z, correct, G, kind=kind)
            assert not valid.any() and (loss == 0).all()
            loss.sum().backward()
            assert torch.isfinite(z.grad).all()
            assert (contrastive_reward(loss, valid) == 0).all()


def test_determinism_and_uniform_positive_draw():
    z = _z()
    a, _ = contrastive_loss(z, CORRECT, G, generator=torch.Generator().manual_seed(3))
    b, _ = contrastive_loss(z, CORRECT, G, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # anchor 24 has 4 other correct responses: each must be drawn ~1/4 of the time
    z = _z(n=30)
    l = (z @ z.T / 0.05)
    denominator = torch.logsumexp(torch.cat([l[24, 25:30], l[24, 24:24]]), 0)  # a != 24 within the group
    by_loss = {round((denominator - l[24, p]).item(), 6): p for p in (25, 26, 27, 28)}
    gen = torch.Generator().manual_seed(0)
    counts = collections.Counter()
    trials = 4000
    for _ in range(trials):
        loss, _ = contrastive_loss(z, CORRECT, G, generator=gen)
        counts[by_loss[round(loss[24].item(), 6)]] += 1
    for p in (25, 26, 27, 28):
        assert abs(counts[p] / trials - 0.25) < 4 * math.sqrt(0.25 * 0.75 / trials)


def test_reward_and_head():
    loss = torch.tensor([0.5, 4.0, 1.0, 3.0])
    valid = torch.tensor([True, True, False, True])
    assert contrastive_reward(loss, valid).tolist() == pytest.approx([-0.1, -0.5, 0.0, -0.5])
    head = ContrastiveHead(8, dim=4)
    hidden = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    z = head(response_mean(hidden, mask))
    assert z.dtype == torch.float32 and torch.allclose(z.norm(dim=-1), torch.ones(3))
    mean0 = hidden[0, 1:3].float().mean(0)
    assert torch.allclose(z[0], torch.nn.functional.normalize(head.proj(mean0), dim=0), atol=1e-6)
    z, pairs = _z(), {True: [], False: []}  # cosine sums and counts against a loop over ordered pairs
    for g in range(0, len(CORRECT), G):
        for i in range(g, g + G):
            for j in range(g, g + G):
                if i != j and CORRECT[i]:
                    pairs[bool(CORRECT[j])].append(float(z[i] @ z[j]))
    for (total, count), cosines in zip(cosine_stats(z, CORRECT, G), (pairs[True], pairs[False])):
        assert count.item() == len(cosines) and total.item() == pytest.approx(sum(cosines))
    with pytest.raises(ValueError):
        contrastive_loss(_z(n=10), torch.ones(10), G)
