"""GRPO, the math: group-normalised advantages, the clipped policy loss and its variants, and
the log-probs of taken tokens. Plain functions on tensors; rl.py calls them in its RL step.

    from grpo import group_advantages, policy_loss, sequence_logprobs
    adv = group_advantages(rewards, group_size=8)                  # [N]
    out = sequence_logprobs(model, ids, attention_mask, response_mask)
    loss, stats = policy_loss(out.logp, old_logp, adv[:, None].expand_as(out.logp), response_mask)

A loss variant is a new name in RATIOS or AGGREGATIONS and its branch in policy_loss: train.py
offers every name as a --ratio / --agg choice, and tests/test_grpo.py checks each against a loop.

Shapes: N rollouts (G consecutive rows per prompt) x T token positions; `mask` marks the
response tokens. No host syncs: stats come back as 0-dim tensors for the caller to gather.
Imports: torch only.
"""
import math
from typing import NamedTuple

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
    big, small = v.masked_fill(m == 0, -math.inf).amax(-1, keepdim=True), v.masked_fill(m == 0, math.inf).amin(-1, keepdim=True)
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


def _clipped_surrogate(r, adv, mask, clip_low, clip_high):
    """PPO's pessimistic surrogate per token, -min(r A, clip(r) A), and where the clip bit."""
    unclipped, clipped = r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(r.dtype) * mask


def policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, ratio="token", agg="token-mean",
                ref_logp=None, kl_coef=0.0, max_length=None, num_tokens=None, num_sequences=None):
    """Clipped surrogate loss (to minimise) and stats; every tensor [N, T], advantages per token.

    ratio: "token" (PPO/GRPO; DAPO's clip-higher is clip_high=0.28), "sequence" (GSPO, token
    form: every token carries the sequence ratio exp(mean log-ratio) and its own gradient), or
    "geometric" (GMPO: geometric mean of the token ratios, each clipped in log space; it needs
    one advantage per sequence and reads it at the first response token).
    agg: "token-mean" (every response token of the batch weighs the same), "seq-mean-token-mean",
    or "seq-mean-token-sum-norm" (Dr. GRPO: token sums divided by the constant `max_length`).
    The loss is a sum over the rows divided by `num_tokens` (token-mean) or `num_sequences`
    (the others), by default this batch's counts. Give the counts of the whole (global)
    minibatch when it is split into micro-batches whose gradients add up.
    KL to a reference: + kl_coef * k3, k3 = exp(ref - logp) - (ref - logp) - 1 (minimised).
    """
    if ratio not in RATIOS or agg not in AGGREGATIONS:
        raise ValueError(f"ratio must be one of {RATIOS} and agg one of {AGGREGATIONS}")
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
    if kl_coef:
        delta = ref_logp - logp
        per_token = per_token + kl_coef * (delta.exp() - delta - 1)
    if agg == "token-mean":
        loss = (per_token * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    else:
        norm = lengths if agg == "seq-mean-token-mean" else (max_length or mask.shape[1])
        loss = ((per_token * mask).sum(-1) / norm).sum() / (logp.shape[0] if num_sequences is None else num_sequences)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        token_ratio = (log_ratio.exp() * mask)
        stats = {"clip_frac": clipped_frac.sum() / count,
                 "approx_kl": ((token_ratio - 1 - log_ratio) * mask).sum() / count,
                 "ratio_mean": token_ratio.sum() / count,
                 "ratio_max": token_ratio.max()}
        if kl_coef:
            stats["kl_ref"] = ((delta.exp() - delta - 1) * mask).sum() / count
    return loss, stats


class LogProbs(NamedTuple):
    logp: torch.Tensor               # [N, T]: log-prob of input_ids[:, t] given the tokens before (0 at t=0)
    entropy: torch.Tensor = None     # [N, T]: entropy of the predictive distribution of position t
    hidden: torch.Tensor = None      # [N, T, H]: final (post-norm) hidden states, fp32


def sequence_logprobs(model, input_ids, attention_mask, response_mask=None, *, entropy=False, hidden=False):
    """One forward pass: log-probs of the taken tokens (logit gathered minus logsumexp; no
    full log-softmax is kept), optionally entropies and the final hidden states (for CLIPO)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, :-1].float()
    lse = logits.logsumexp(-1)
    taken = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse
    logp = torch.nn.functional.pad(taken, (1, 0))
    ent = None
    if entropy:
        with torch.no_grad():
            probs = (logits - lse[..., None]).exp()
            ent = torch.nn.functional.pad(lse - (probs * logits).sum(-1), (1, 0))
    if response_mask is not None:
        logp = logp * response_mask
    return LogProbs(logp, ent, out.hidden_states[-1].float() if hidden else None)


def pack_rollouts(prompts, responses, pad_id, device):
    """Rows [left pad | prompt | response | right pad] for responses to prompts[i // G].
    Returns input_ids, attention_mask, response_mask (float), and the first response column."""
    group = len(responses) // len(prompts)
    width_p, width_r = max(map(len, prompts)), max(1, max(map(len, responses)))
    ids = torch.full((len(responses), width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros(ids.shape)
    for i, r in enumerate(responses):
        p = prompts[i // group]
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        ids[i, width_p:width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, width_p - len(p):width_p + len(r)] = 1
        response[i, width_p:width_p + len(r)] = 1
    return ids.to(device), attention.to(device), response.to(device), width_p
