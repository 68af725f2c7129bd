"""grpo.py against slow references written here with explicit Python loops (values and gradients)."""
import math

import pytest
import torch

from forward import pack_rollouts, sequence_logprobs
from grpo import Loss, group_advantages, normalise_step_rewards, policy_loss, rewards_to_go, tis_weights
from model import new_tiny_model
from sample import sample

torch.manual_seed(0)
N, T, G = 6, 9, 3


def _mask():
    """Responses with padding on both sides: left (prompt/pad) and right (after EOS)."""
    m = torch.zeros(N, T)
    for i, (a, b) in enumerate([(2, 9), (3, 7), (1, 5), (4, 9), (2, 3), (0, 8)]):
        m[i, a:b] = 1
    return m


def _ref_norm(values, scale, eps):
    n = len(values)
    mean = sum(values) / n
    if max(values) == min(values):
        return [0.0] * n
    if not scale:
        return [v - mean for v in values]
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return [(v - mean) / (std + eps) for v in values]


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_outcome(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.1, 0.1, 0.1, 2.0, -1.0, 0.0], dtype=torch.float64)
    got = group_advantages(rewards, 3, scale=scale)
    ref = []
    for g in range(3):
        ref += _ref_norm(rewards[3 * g:3 * g + 3].tolist(), scale, 1e-6)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    assert (got[3:6] == 0).all()  # identical rewards: exactly zero, not 1e-17


def test_group_advantages_process_credit():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    step_mask = torch.zeros(N, T, dtype=torch.bool)
    step_rewards = torch.zeros(N, T)
    for i, t, r in [(0, 3, 0.9), (0, 6, 0.2), (1, 4, 0.5), (2, 2, 0.1), (3, 5, 0.7), (3, 8, 0.7), (5, 1, 0.3)]:
        step_mask[i, t], step_rewards[i, t] = True, r
    got = group_advantages(rewards, G)[:, None] + rewards_to_go(normalise_step_rewards(step_rewards, step_mask, G))
    for g in range(N // G):
        rows = range(g * G, g * G + G)
        outcome = _ref_norm([rewards[i].item() for i in rows], True, 1e-6)
        steps = [(i, t, step_rewards[i, t].item()) for i in rows for t in range(T) if step_mask[i, t]]
        normed = _ref_norm([r for _, _, r in steps], True, 1e-6) if steps else []
        for k, i in enumerate(rows):
            for t in range(T):
                to_go = sum(nr for (j, s, _), nr in zip(steps, normed) if j == i and s >= t)
                assert abs(got[i, t].item() - (outcome[k] + to_go)) < 1e-5, (i, t)
    # hand case, group 0: steps 0.9, 0.2, 0.5, 0.1 -> mean 0.425, std 0.3594
    std = math.sqrt(sum((x - 0.425) ** 2 for x in [0.9, 0.2, 0.5, 0.1]) / 3)
    assert abs(got[0, 0] - (outcome_0 := 2 / math.sqrt(3)) - ((0.9 - 0.425) + (0.2 - 0.425)) / std) < 1e-5
    assert abs(got[0, 7] - outcome_0) < 1e-5


def _ref_loss(logp, old, adv, mask, clip_low, clip_high, ratio, agg, ref, kl_coef, max_length, weights=None,
              entropy=None, entropy_coef=0.0):
    """Per-sequence, per-token Python loops over scalars (autograd through torch scalars)."""
    seq_losses, token_losses, n_tokens = [], [], 0
    for i in range(N):
        toks = [t for t in range(T) if mask[i, t] > 0]
        n_tokens += len(toks)
        a = lambda t: adv[i, t]  # noqa: E731
        per = []
        if ratio == "geometric":
            first = a(toks[0])  # one advantage per sequence: the first response token's
            logs = []
            for t in toks:
                lr = logp[i, t] - old[i, t]
                c = torch.clamp(lr, math.log(1 - clip_low), math.log(1 + clip_high))
                logs.append(torch.minimum(lr, c) if first > 0 else torch.maximum(lr, c))
            seq_ratio = torch.exp(sum(logs) / len(toks))
            per = [-(seq_ratio * first) for _ in toks]
        else:
            if ratio == "sequence":
                s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks)).detach()
            for t in toks:
                r = torch.exp(logp[i, t] - old[i, t]) if ratio == "token" else s * torch.exp(logp[i, t] - logp[i, t].detach())
                per.append(-torch.minimum(r * a(t), torch.clamp(r, 1 - clip_low, 1 + clip_high) * a(t)))
        if weights is not None:
            per = [p * weights[i, t] for p, t in zip(per, toks)]
        if kl_coef:
            per = [p + kl_coef * (torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1) for p, t in zip(per, toks)]
        if entropy_coef:
            per = [p - entropy_coef * entropy[i, t] for p, t in zip(per, toks)]
        token_losses += per
        if agg == "seq-mean-token-mean":
            seq_losses.append(sum(per) / len(toks))
        elif agg == "seq-mean-token-sum-norm":
            seq_losses.append(sum(per) / max_length)
    if agg == "token-mean":
        return sum(token_losses) / n_tokens
    return sum(seq_losses) / N


CASES = [(r, a, kl, adv2) for r in ["token", "sequence", "geometric"]
         for a in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
         for kl in [0.0, 0.1] for adv2 in [False, True] if not (r == "geometric" and adv2)]


@pytest.mark.parametrize("ratio,agg,kl_coef,token_adv", CASES)
def test_policy_loss_matches_loop_reference(ratio, agg, kl_coef, token_adv):
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    base = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3  # ratios inside and outside the clip
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(N, T, generator=g, dtype=torch.float64) if token_adv else \
        torch.randn(N, generator=g, dtype=torch.float64)[:, None].expand(N, T)
    variant = Loss(clip_low=0.2, clip_high=0.28, ratio=ratio, agg=agg, kl_coef=kl_coef, max_length=12)
    a = base.clone().requires_grad_()
    loss, stats = policy_loss(a, old, adv, mask, variant, ref_logp=ref)
    loss.backward()
    b = base.clone().requires_grad_()
    expected = _ref_loss(b, old, adv, mask, 0.2, 0.28, ratio, agg, ref, kl_coef, 12)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-10), (loss, expected)
    assert torch.allclose(a.grad, b.grad, atol=1e-10)
    assert (a.grad[mask == 0] == 0).all()
    assert 0 < stats["clip_frac"] < 1 and stats["ratio_max"] > 1


@pytest.mark.parametrize("ratio,agg", [("token", "token-mean"), ("token", "seq-mean-token-mean"),
                                       ("sequence", "seq-mean-token-sum-norm")])
def test_importance_weights_and_entropy_bonus_match_the_loop_reference(ratio, agg):
    """--tis-cap's weights scale the surrogate alone; --entropy-coef subtracts the entropy;
    values and gradients (of log-probs and entropies) against _ref_loss's loops."""
    g = torch.Generator().manual_seed(4)
    mask = _mask()
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    sampler = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.5
    weights = tis_weights(old, sampler, 1.5)
    for i in range(N):  # the weights, by a loop: min(exp(old - sampler), cap)
        for t in range(T):
            assert abs(weights[i, t].item() - min(math.exp(old[i, t].item() - sampler[i, t].item()), 1.5)) < 1e-12
    assert (weights == 1.5).any() and (weights < 1).any()
    base = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(N, T, generator=g, dtype=torch.float64)
    a, ea = base.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, stats = policy_loss(a, old, adv, mask, Loss(ratio=ratio, agg=agg, kl_coef=0.1, entropy_coef=0.03,
                                                       max_length=12), ref_logp=ref, entropy=ea, weights=weights)
    loss.backward()
    b, eb = base.clone().requires_grad_(), ent.clone().requires_grad_()
    expected = _ref_loss(b, old, adv, mask, 0.2, 0.2, ratio, agg, ref, 0.1, 12, weights=weights, entropy=eb,
                         entropy_coef=0.03)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-10)
    assert torch.allclose(a.grad, b.grad, atol=1e-10) and torch.allclose(ea.grad, eb.grad, atol=1e-10)
    assert (ea.grad[mask > 0] < 0).all()  # descent raises the entropy
    assert abs(stats["entropy"] - (ent * mask).sum() / mask.sum()) < 1e-9


def test_entropy_bonus_gradients_through_the_model_match_a_loop_reference():
    """sequence_logprobs' entropies carry their gradient to the weights: -c x mean entropy at
    temperature 0.7, against entropies of softmax(logits / 0.7) written out per token."""
    _, ids, att, resp = _padded_batch()
    grads = []
    for ours in (True, False):
        lm = new_tiny_model(seed=3, vocab_size=40)
        if ours:
            out = sequence_logprobs(lm, ids, att, resp, entropy=True, temperature=0.7)
            loss, _ = policy_loss(out.logp, out.logp.detach(), torch.zeros_like(resp), resp, Loss(entropy_coef=0.05),
                                  entropy=out.entropy)
        else:
            logits = lm(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
            terms = []
            for i in range(ids.shape[0]):
                for t in range(1, ids.shape[1]):
                    if resp[i, t]:
                        p = (logits[i, t - 1] / 0.7).softmax(-1)
                        terms.append(-(p * p.log()).sum())
            loss = -0.05 * sum(terms) / len(terms)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (ours_loss, ours_grad), (ref_loss, ref_grad) = grads
    assert torch.allclose(ours_loss, ref_loss, atol=1e-6)
    for name in ref_grad:
        assert torch.allclose(ours_grad[name], ref_grad[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_the_trainer_s_log_probs_are_those_the_sampler_drew_from(temperature):
    """The same weights in fp32: the old pass's log-probs (sequence_logprobs at the sampling
    temperature) equal, token for token, the log-probs sample() returned; the untempered
    log-probs (what the trainer computed before it took the temperature) do not."""
    lm = new_tiny_model(seed=3).eval()
    prompts = [[5, 9, 11, 7], [6, 8]]
    out = sample(lm, prompts, 24, temperature=temperature, num_samples=3, generator=torch.Generator().manual_seed(0))
    ids, att, resp, start = pack_rollouts(prompts, out.tokens, 0, "cpu")
    with torch.no_grad():
        tempered = sequence_logprobs(lm, ids, att, resp, start=start, temperature=temperature).logp
        raw = sequence_logprobs(lm, ids, att, resp, start=start).logp
    for k, drawn in enumerate(out.logprobs):
        got = tempered[k, start:start + len(drawn)]
        assert torch.allclose(got, torch.tensor(drawn), atol=2e-5), k
    sampled = torch.tensor([x for drawn in out.logprobs for x in drawn])
    assert (raw[resp > 0] - sampled).abs().mean() > 0.01


def test_with_top_p_the_trainer_keeps_the_unfiltered_tempered_distribution():
    """The documented choice (docs/grpo.md#grpo-and-the-one-loop-grpopy-rlpy-trainpy): top-k / top-p filter the sampler only. The trainer's log-prob
    of a drawn token is its tempered, unfiltered one, never above the sampler's renormalised one."""
    lm = new_tiny_model(seed=3).eval()
    prompts = [[5, 9, 11, 7]]
    out = sample(lm, prompts, 24, temperature=0.7, top_p=0.9, num_samples=4, generator=torch.Generator().manual_seed(0))
    ids, att, resp, start = pack_rollouts(prompts, out.tokens, 0, "cpu")
    with torch.no_grad():
        trainer = sequence_logprobs(lm, ids, att, resp, start=start, temperature=0.7).logp
    sampled = torch.tensor([x for drawn in out.logprobs for x in drawn])
    assert (trainer[resp > 0] <= sampled + 1e-5).all() and (trainer[resp > 0] < sampled - 1e-3).any()


def test_policy_loss_kl_is_minimised_and_stats():
    mask = _mask()
    old = torch.full((N, T), -1.0)
    ref = torch.full((N, T), -1.0)
    logp = torch.full((N, T), -0.5, requires_grad=True)
    loss, stats = policy_loss(logp, old, torch.zeros(N, T), mask, Loss(kl_coef=1.0), ref_logp=ref)
    loss.backward()
    assert loss > 0 and (logp.grad[mask > 0] > 0).all()  # descent moves logp back toward the reference
    r = math.exp(0.5)
    assert abs(stats["ratio_mean"] - r) < 1e-6 and abs(stats["approx_kl"] - (r - 1 - 0.5)) < 1e-6
    assert stats["clip_frac"] == 0  # zero advantage: nothing is clipped


def test_policy_loss_counts_and_errors():
    """Micro-batches add up to the whole batch when each is divided by the whole batch's count."""
    mask = _mask()
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(N, T, generator=g)
    logp = old + 0.1 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)[:, None].expand(N, T)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole, _ = policy_loss(logp, old, adv, mask, Loss(agg=agg, max_length=12))
        parts = [policy_loss(logp[k:k + 2], old[k:k + 2], adv[k:k + 2], mask[k:k + 2], Loss(agg=agg, max_length=12),
                             num_tokens=mask.sum(), num_sequences=N)[0] for k in range(0, N, 2)]
        assert torch.allclose(sum(parts), whole, atol=1e-6), agg
    with pytest.raises(ValueError, match="per token"):
        policy_loss(logp, old, torch.ones(N), mask)
    with pytest.raises(ValueError):
        Loss(agg="mean")


def _padded_batch(vocab=40):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in (5, 9, 7)]
    width = max(map(len, seqs)) + 2
    ids = torch.zeros(3, width, dtype=torch.long)
    att = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding by i, right padding after
        ids[i, i:i + len(s)] = torch.tensor(s)
        att[i, i:i + len(s)] = 1
    resp = att.clone().float()
    resp[:, :3] = 0
    return seqs, ids, att, resp


def test_sequence_logprobs_against_per_sequence_forward():
    lm = new_tiny_model(seed=3, vocab_size=40).eval()
    seqs, ids, att, resp = _padded_batch()
    out = sequence_logprobs(lm, ids, att, resp, entropy=True, hidden=True)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([s])).logits[0].double()
        for t in range(1, len(s)):
            pos = i + t
            expected = (logits[t - 1].log_softmax(-1)[s[t]]).item() if resp[i, pos] else 0.0
            assert abs(out.logp[i, pos].item() - expected) < 1e-5
            if resp[i, pos]:
                p = logits[t - 1].softmax(-1)
                assert abs(out.entropy[i, pos].item() + (p * p.log()).sum().item()) < 1e-4
    # the hidden states are the final, post-norm ones: the LM head applied to them gives the logits
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.allclose(lm.lm_head(out.hidden), logits, atol=1e-4)


def _full_vocab_logprobs(lm, ids, att, resp):
    """The plain formulation: logits at every position, fp32 log-softmax, gathered."""
    logits = lm(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0)) * resp


@pytest.mark.parametrize("chunk_positions", [1, 2, 100])
def test_chunked_head_gives_the_same_values_and_gradients(monkeypatch, chunk_positions):
    """Chunks of 1, 2 or all positions, each recomputed in backward: the same log-probs and the
    same parameter gradients as the plain full-vocabulary formulation."""
    import forward
    monkeypatch.setattr(forward, "LOGIT_CHUNK_BYTES", 4 * 3 * 40 * chunk_positions)  # rows x vocab x positions
    _, ids, att, resp = _padded_batch()
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda lm: sequence_logprobs(lm, ids, att, resp).logp, lambda lm: _full_vocab_logprobs(lm, ids, att, resp)):
        lm = new_tiny_model(seed=3, vocab_size=40)
        logp = fn(lm)
        (logp * weights).sum().backward()
        grads.append((logp.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
    (ours, ours_grad), (plain, plain_grad) = grads
    assert torch.allclose(ours, plain, atol=1e-5)
    for name in plain_grad:
        assert torch.allclose(ours_grad[name], plain_grad[name], atol=1e-5, rtol=1e-4), name
