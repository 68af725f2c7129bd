"""GRPO, the math: group-normalised advantages, the clipped policy loss and its variants, and
the log-probs of taken tokens. Plain functions on tensors; rl.py calls them in its RL step.

    from grpo import group_advantages, policy_loss, sequence_logprobs
    adv = group_advantages(rewards, group_size=8)                  # [N]
    out = sequence_logprobs(model, ids, attention_mask, response_mask)
    loss, stats = policy_loss(out.logp, old_logp, adv[:, None].expand_as(out.logp), response_mask)

A loss variant is a new name in RATIOS or AGGREGATIONS and its branch in policy_loss: train.py
offers every name as a --ratio / --agg choice, and tests/test_grpo.py checks each against a loop.

Shapes: N rollouts (G consecutive rows per prompt) x T token positions; `mask` marks the
response tokens. No host syncs: stats come back as 0-dim tensors for the caller to gather
(the shared-prompt forward reads back one flag: do a group's rows share their prompt?).
Memory: logits exist only for response positions, a chunk at a time (LOGIT_CHUNK_BYTES), and are
recomputed in backward: a 151,936-token vocabulary costs no [rows, T, vocab] tensor
(`python bench/logprobs.py` measures it against the plain formulation).
Shared prompts: with `groups` (rows with equal values share their prompt columns), each prompt
runs through the decoder once and its rows' responses attend to its keys/values (gradients flow
back through them): the same log-probs and gradients, ~2x less work at LongProc's sizes
(`python bench/shared_prompt.py`; tests/test_shared_prompt.py checks values and gradients).
Imports: torch, transformers (its Cache interface, for the shared-prompt forward).
"""
import math
import warnings
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

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


def tis_weights(old_logp, sampler_logp, cap):
    """Truncated importance sampling (TIS): per token min(pi_old / pi_sampler, cap), the factor
    that turns the sampler's draws (a bf16 copy, a filtered distribution) into the trainer's
    policy's, truncated so that a rare token cannot blow up the loss. No gradient."""
    return (old_logp - sampler_logp).exp().clamp(max=cap).detach()


def _clipped_surrogate(r, adv, mask, clip_low, clip_high):
    """PPO's pessimistic surrogate per token, -min(r A, clip(r) A), and where the clip bit."""
    unclipped, clipped = r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(r.dtype) * mask


def policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, ratio="token", agg="token-mean",
                ref_logp=None, kl_coef=0.0, entropy=None, entropy_coef=0.0, weights=None, max_length=None,
                num_tokens=None, num_sequences=None):
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
    Entropy bonus: - entropy_coef * entropy (the policy's entropy per token, with its gradient).
    weights: per-token factors on the surrogate alone (not on the KL or entropy terms), e.g.
    truncated importance weights min(exp(old - sampler), C) for a sampler that is not the trainer.
    Every term is aggregated like the surrogate.
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
    if weights is not None:
        per_token = per_token * weights
    if kl_coef:
        delta = ref_logp - logp
        per_token = per_token + kl_coef * (delta.exp() - delta - 1)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
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
        if entropy_coef:
            stats["entropy"] = (entropy * mask).sum() / count
    return loss, stats


class LogProbs(NamedTuple):
    logp: torch.Tensor               # [N, T]: log-prob of input_ids[:, t] given the tokens before (0 off the response)
    entropy: torch.Tensor = None     # [N, T]: entropy of the predictive distribution at response token t (with grad)
    hidden: torch.Tensor = None      # [N, T, H]: final (post-norm) hidden states, fp32


LOGIT_CHUNK_BYTES = 1 << 28  # fp32 logits of at most this size exist at once (256 MiB), in forward and backward


def _chunk_logprobs(head, hidden, targets, entropy, temperature):
    """Log-probs of `targets` [N, C] under softmax(logits / temperature), the logits from hidden
    states [N, C, H] through the LM head (fp32 logsumexp), and that distribution's entropies
    when asked."""
    logits = head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    taken = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    if not entropy:
        return taken, None
    return taken, lse - (logits.softmax(-1) * logits).sum(-1)


def head_logprobs(head, hidden, targets, entropy=False, temperature=1.0):
    """The LM head over hidden states [N, R, H], a chunk of positions at a time: log-probs of
    `targets` [N, R] (and entropies) at the sampling temperature. With gradients on, each
    chunk's logits are recomputed in backward instead of kept (torch.utils.checkpoint), so no
    [N, R, vocab] tensor ever exists."""
    rows, length = targets.shape
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * rows * head.out_features))
    taken, entropies = [], []
    for a in range(0, length, chunk):
        args = (head, hidden[:, a:a + chunk], targets[:, a:a + chunk], entropy, temperature)
        if torch.is_grad_enabled():
            t, e = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            t, e = _chunk_logprobs(*args)
        taken.append(t)
        entropies.append(e)
    return torch.cat(taken, 1), (torch.cat(entropies, 1) if entropy else None)


SHARED_PROMPT_MODELS = ("qwen2", "qwen3", "llama")  # model types tests/test_shared_prompt.py checks exact


class _RecordingLayer(DynamicLayer):
    """Prompt pass, one layer's cache: keeps the keys/values it is given, autograd history
    included (the response pass's gradients reach the prompt through them), and reports no past
    (the prompt's mask is its own). A checkpoint replay in backward overwrites them with equal
    ones, read by no one: harmless."""

    def update(self, keys, values, *args, **kwargs):
        self.keys, self.values, self.is_initialized = keys, values, True
        return keys, values

    def get_seq_length(self):
        return 0


class _PrefixLayer(DynamicLayer):
    """Response pass, one layer's cache: each row's prompt keys/values in front of its own new
    ones. Stores nothing, so a checkpoint replay computes the same; `read` records that the
    layer used it (a layer that drops its cache would silently attend to the response alone)."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values, self.is_initialized, self.read = keys, values, True, False

    def update(self, keys, values, *args, **kwargs):
        self.read = True
        return torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)


def can_share_prompts(lm):
    """Whether the shared-prompt forward is exact for this LM: a tested model type, full
    attention in every layer (a sliding window would need the prompt's keys cut per row)."""
    config = lm.config
    return config.model_type in SHARED_PROMPT_MODELS and all(
        kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())


def _shared_prompt_states(decoder, input_ids, attention_mask, position_ids, start, groups):
    """The decoder's final states with each group's prompt run once. Prompt pass: the P distinct
    prompts (columns [:start], left-padded as they are), their layers' keys/values recorded.
    Response pass: the M rows' columns [start:], each attending to its prompt's keys/values
    (the cache reports `start` past columns, so transformers builds the causal mask with that
    offset from the rows' own 2D mask). Returns (prompt states [P, start, H], each row's prompt
    [M], response states [M, T - start, H]), or None when that would not be exact or gains
    nothing (the caller then runs the plain forward)."""
    unique, inverse = torch.unique(torch.as_tensor(groups), return_inverse=True)  # on the CPU: no device sync
    rows = len(inverse)
    if len(unique) == rows:  # no prompt is shared: two passes would only cost more
        return None
    inverse = inverse.to(input_ids.device)
    first = torch.full((len(unique),), rows, device=input_ids.device).scatter_reduce(
        0, inverse, torch.arange(rows, device=input_ids.device), "amin")  # each prompt's first row
    prompt_ids, prompt_mask = input_ids[first, :start], attention_mask[first, :start]
    same = ((prompt_ids[inverse] == input_ids[:, :start]).all()
            & (prompt_mask[inverse] == attention_mask[:, :start]).all())
    if not same:  # a host sync, once per forward
        raise ValueError("rows with equal `groups` must have equal prompt columns [:start] (ids and attention mask)")
    recorded = Cache(layers=[_RecordingLayer() for _ in decoder.layers])
    prompt_states = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids[first, :start],
                            past_key_values=recorded, use_cache=False).last_hidden_state
    kept = all(layer.is_initialized for layer in recorded.layers)
    # reentrant checkpointing runs layers without autograd: their keys would carry no gradient
    if not kept or (prompt_states.requires_grad and not any(layer.keys.requires_grad for layer in recorded.layers)):
        warnings.warn("shared-prompt forward: the decoder did not keep the prompt's keys/values with their "
                      "gradients (reentrant checkpointing?); running the plain forward instead")
        return None
    prefix = Cache(layers=[_PrefixLayer(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse))
                           for layer in recorded.layers])
    response_states = decoder(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                              position_ids=position_ids[:, start:], past_key_values=prefix,
                              use_cache=False).last_hidden_state
    if not all(layer.read for layer in prefix.layers):
        warnings.warn("shared-prompt forward: a decoder layer did not read the prompt's keys/values; "
                      "running the plain forward instead")
        return None
    return prompt_states, inverse, response_states


class TokenLogProbs(torch.nn.Module):
    """A causal LM whose forward returns LogProbs of the response tokens (columns from `start`
    on): the decoder's final hidden states, then the LM head on response positions only, in
    chunks (head_logprobs). Wrap this module, not the bare LM, in DDP / FSDP / torch.compile:
    the whole computation is then one forward. Works for LMs whose logits are the output
    embeddings applied to the final hidden states (Qwen2, Llama, Mistral, ...).

    groups: None, or M integers (a list or a CPU tensor: no device sync), rows with equal values
    having equal prompt columns [:start] (checked: ValueError); each such prompt then runs
    through the decoder once (_shared_prompt_states). The plain forward runs instead, with the
    same results, when can_share_prompts(lm) is False, when no two rows share a prompt, or
    when the decoder would not keep the caches (warned)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        if can_share_prompts(lm):
            # transformers drops `past_key_values` inside a checkpointed decoder layer unless the
            # layer says a replay may read the cache again. Both caches above replay safely (the
            # recording one is overwritten with equal tensors, the prefix one stores nothing), so
            # the flag is set on these layer instances once, here: set and restored around each
            # forward, it broke torch.compile (dynamo replays the attribute writes after a graph
            # break, and the restore then deleted an attribute that was not there)
            for layer in lm.get_decoder().layers:
                layer._can_checkpoint_with_cache = True

    def forward(self, input_ids, attention_mask, response_mask, start, entropy=False, hidden=False, groups=None,
                temperature=1.0):
        decoder = self.lm.get_decoder()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        shared = None
        if groups is not None and can_share_prompts(self.lm):
            shared = _shared_prompt_states(decoder, input_ids, attention_mask, position_ids, start, groups)
        if shared is None:
            states = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        else:
            prompt_states, inverse, response_states = shared
            # the head needs only the prompt's last state (it predicts the first response token);
            # CLIPO's hidden output gets every column, like the plain forward
            before = prompt_states[inverse] if hidden else prompt_states[:, -1:][inverse]
            states = torch.cat([before, response_states], 1)
        offset = input_ids.shape[1] - states.shape[1]  # the column of states[:, 0]
        # position t - 1 predicts token t: the response tokens start..T-1 need states start-1..T-2
        logp, ent = head_logprobs(self.lm.get_output_embeddings(), states[:, start - 1 - offset:-1],
                                  input_ids[:, start:], entropy, temperature)
        logp = torch.nn.functional.pad(logp, (start, 0)) * response_mask
        ent = torch.nn.functional.pad(ent, (start, 0)) if entropy else None
        return LogProbs(logp, ent, states.float() if hidden else None)


def sequence_logprobs(model, input_ids, attention_mask, response_mask, *, start=None, entropy=False, hidden=False,
                      groups=None, temperature=1.0):
    """One forward pass: log-probs of the taken response tokens [N, T] (logit gathered minus
    logsumexp, logits only where a response token is predicted), optionally entropies and the
    final hidden states (for CLIPO). `temperature`: the sampler's; the log-probs and entropies
    are those of softmax(logits / temperature), the distribution the tokens were drawn from
    (top-k / top-p filtering is not applied: see docs/grpo.md, "What TRL / verl call it"). `model`: a TokenLogProbs (bare or wrapped by DDP, FSDP or
    torch.compile), or a bare causal LM. `start`: the first response column (every row's
    response starts there or later); derived from the mask when not given (one host sync).
    `groups`: [N] prompt ids, rows with equal ids running their shared prompt once (see
    TokenLogProbs); None runs every row's prompt."""
    if start is None:
        start = int(response_mask.any(0).to(torch.int8).argmax())
    if hasattr(model, "get_output_embeddings"):  # a bare LM
        model = TokenLogProbs(model)
    return model(input_ids, attention_mask, response_mask, max(1, start), entropy=entropy, hidden=hidden, groups=groups,
                 temperature=temperature)


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
