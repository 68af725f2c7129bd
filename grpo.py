"""GRPO, the math: group-normalised advantages, process credit, and the clipped policy loss with
its variants. Plain functions on [N, T] tensors; rl.py calls them, logprobs.py gives the log-probs.

    from grpo import Loss, group_advantages, policy_loss
    adv = group_advantages(rewards, group_size=8)                  # [N]
    loss, stats = policy_loss(logp, old_logp, adv[:, None].expand_as(logp), response_mask, Loss(agg="token-mean"))
    python -m pytest -q tests/test_grpo.py                         # each variant against a loop, values and gradients

A loss variant is a new name in RATIOS or AGGREGATIONS and its branch in policy_loss: train.py
offers every name as a --ratio / --agg choice, and tests/test_grpo.py checks each against a loop.
Shapes: N rollouts (G consecutive rows per prompt) x T token positions; `mask` marks the
response tokens. No host syncs: stats come back as 0-dim tensors for the caller to gather.
Imports: torch.
"""
import math
from dataclasses import dataclass

import torch

RATIOS = ("token", "sequence", "geometric")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _normalise(values, valid, groups, scale, eps):
    """(v - group mean) / (group std + eps) over the valid entries of each group ([groups, k]
    views); exactly 0 where a group's valid values are all equal (or there is only one)."""
    v = values.reshape(groups, -1)
    m = valid.reshape(groups, -1).to(v.dtype)
    count = m.sum(-1, keepdim=True)
    mean = (v * m).sum(-1, keepdim=True) / count.clamp(min=1)
    centred = (v - mean) * m
    if scale:
        std = ((centred ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # unbiased
        centred = centred / (std + eps)
    big = v.masked_fill(m == 0, -math.inf).amax(-1, keepdim=True)
    small = v.masked_fill(m == 0, math.inf).amin(-1, keepdim=True)
    return torch.where(big > small, centred, torch.zeros_like(centred)).reshape(values.shape)


def group_advantages(rewards, group_size, *, scale=True, eps=1e-6):
    """Advantages [N] of N rollouts whose rows are grouped consecutively, G = group_size per
    prompt: `(r - mean_g) / (std_g + eps)` (unbiased std); `scale=False` only centres (Dr.
    GRPO). A group of identical rewards gets exactly 0."""
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"{n} rollouts do not split into groups of {group_size}")
    return _normalise(rewards, torch.ones_like(rewards, dtype=torch.bool), n // group_size, scale, eps)


def normalise_step_rewards(step_rewards, step_mask, group_size, *, scale=True, eps=1e-6):
    """Process supervision (DeepSeekMath 4.1.3): `step_rewards` [N, T] holds a reward at each
    token where a step ends (`step_mask` marks them); each is normalised over all steps of its
    group, the same way as outcome rewards. [N, T], 0 off the mask."""
    return _normalise(step_rewards, step_mask, step_rewards.shape[0] // group_size, scale, eps)


def rewards_to_go(step_rewards):
    """[N, T]: the sum of the step rewards at or after each token (a token is credited with the
    steps it leads to)."""
    return step_rewards.flip(-1).cumsum(-1).flip(-1)


def tis_weights(old_logp, sampler_logp, cap):
    """Truncated importance sampling (TIS): per token min(pi_old / pi_sampler, cap), the factor
    that turns the sampler's draws (a bf16 copy, a filtered distribution) into the trainer's
    policy's, truncated so that a rare token cannot blow up the loss. No gradient."""
    return (old_logp - sampler_logp).exp().clamp(max=cap).detach()


def _clipped_surrogate(r, adv, mask, clip_low, clip_high):
    """PPO's pessimistic surrogate per token, -min(r A, clip(r) A), and where the clip bit."""
    unclipped, clipped = r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(r.dtype) * mask


@dataclass(frozen=True)
class Loss:
    """Which clipped surrogate policy_loss computes: one field per variant (train.py's flags).

    ratio: "token" (PPO/GRPO), "sequence" (GSPO, token form: every token carries the sequence
    ratio exp(mean log-ratio) and its own gradient), or "geometric" (GMPO: geometric mean of the
    token ratios, each clipped in log space; it needs one advantage per sequence and reads it at
    the first response token).
    agg: "token-mean" (every response token of the batch weighs the same), "seq-mean-token-mean",
    or "seq-mean-token-sum-norm" (Dr. GRPO: token sums divided by the constant `max_length`;
    None: the batch's width).
    clip_low, clip_high: the ratio's clip range [1 - low, 1 + high] (DAPO's clip-higher: 0.28).
    kl_coef: + kl_coef * k3 to a reference, k3 = exp(ref - logp) - (ref - logp) - 1 (minimised).
    entropy_coef: - entropy_coef * the policy's entropy per token, with its gradient.
    """
    ratio: str = "token"
    agg: str = "token-mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    max_length: int = None

    def __post_init__(self):
        if self.ratio not in RATIOS or self.agg not in AGGREGATIONS:
            raise ValueError(f"ratio must be one of {RATIOS} and agg one of {AGGREGATIONS}")


def policy_loss(logp, old_logp, advantages, mask, loss=Loss(), *, ref_logp=None, entropy=None, weights=None,
                num_tokens=None, num_sequences=None):
    """The clipped surrogate `loss` (a Loss) asks for, to minimise, and its stats; every tensor
    [N, T], advantages per token. The loss is a sum over the rows divided by `num_tokens`
    (token-mean) or `num_sequences` (the others), by default this batch's counts: give the
    counts of the whole (global) minibatch when it is split into micro-batches whose gradients
    add up. ref_logp: the reference's log-probs (with kl_coef); entropy: the policy's per token
    (with entropy_coef). weights: per-token factors on the surrogate alone (not on the KL or
    entropy terms), e.g. truncated importance weights min(exp(old - sampler), C) for a sampler
    that is not the trainer. Every term is aggregated like the surrogate.
    """
    ratio, agg, clip_low, clip_high = loss.ratio, loss.agg, loss.clip_low, loss.clip_high
    kl_coef, entropy_coef, max_length = loss.kl_coef, loss.entropy_coef, loss.max_length
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be per token, like logp {tuple(logp.shape)}")
    mask = mask.to(logp.dtype)
    adv = advantages
    log_ratio = (logp - old_logp) * mask
    lengths = mask.sum(-1).clamp(min=1)
    if ratio == "geometric":
        seq_adv = adv.gather(-1, mask.argmax(-1, keepdim=True))  # [N, 1]: the first response token's
        low, high = math.log(1 - clip_low), math.log(1 + clip_high)
        clipped = log_ratio.clamp(low, high)
        # per token, the pessimistic side: min for positive advantages, max for negative
        chosen = torch.where(seq_adv > 0, torch.minimum(log_ratio, clipped), torch.maximum(log_ratio, clipped))
        seq_ratio = ((chosen * mask).sum(-1, keepdim=True) / lengths[:, None]).exp()
        per_token = -(seq_ratio * seq_adv).expand_as(logp)
        clipped_frac = ((chosen != log_ratio).to(logp.dtype) * mask)
    elif ratio == "token":
        per_token, clipped_frac = _clipped_surrogate(log_ratio.exp(), adv, mask, clip_low, clip_high)
    elif ratio == "sequence":
        seq_log_ratio = log_ratio.sum(-1, keepdim=True) / lengths[:, None]
        r = (seq_log_ratio.detach() + logp - logp.detach()).exp()
        per_token, clipped_frac = _clipped_surrogate(r, adv, mask, clip_low, clip_high)
    if weights is not None:
        per_token = per_token * weights
    if kl_coef:
        delta = ref_logp - logp
        per_token = per_token + kl_coef * (delta.exp() - delta - 1)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if agg == "token-mean":
        total = (per_token * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    else:
        norm = lengths if agg == "seq-mean-token-mean" else (max_length or mask.shape[1])
        total = ((per_token * mask).sum(-1) / norm).sum() / (logp.shape[0] if num_sequences is None else num_sequences)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        token_ratio = (log_ratio.exp() * mask)
        stats = {"clip_frac": clipped_frac.sum() / count,
                 "approx_kl": ((token_ratio - 1 - log_ratio) * mask).sum() / count,
                 "ratio_mean": token_ratio.sum() / count,
                 "ratio_max": token_ratio.max()}
        if kl_coef:
            stats["kl_ref"] = ((delta.exp() - delta - 1) * mask).sum() / count
        if entropy_coef:
            stats["entropy"] = (entropy * mask).sum() / count
    return total, stats
