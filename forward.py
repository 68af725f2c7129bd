"""The training forward: log-probs of the tokens a policy took, from one pass over packed rows.

    from forward import pack_rollouts, response_mean, sequence_logprobs
    ids, attention, response, start = pack_rollouts(prompts, responses, pad_id, device)
    out = sequence_logprobs(model, ids, attention, response, start=start, entropy=True, hidden=True)
    out.logp, out.entropy        # [N, T]: log-prob (and entropy) at each response token, 0 elsewhere
    response_mean(out.hidden, response)   # [N, H]: the mean final hidden state over the response (CLIPO)
    micro_batches(rows, lengths, start, size, group=G)   # [(row indices, width)]: chunks sorted by length
    python bench/logprobs.py     # memory and time against the plain [rows, T, vocab] formulation
    python bench/shared_prompt.py    # a group's prompt run once vs once per row

Rows are [left pad | prompt | response | right pad]; every response starts at column `start`.
Memory: logits exist only for response positions, a chunk at a time (LOGIT_CHUNK_BYTES), and are
recomputed in backward: a 151,936-token vocabulary costs no [rows, T, vocab] tensor.
Shared prompts: with `groups` (rows with equal values share their prompt columns), each prompt
runs through the decoder once and its rows' responses attend to its keys/values (gradients flow
back through them): the same log-probs and gradients, ~2x less work at LongProc's sizes
(tests/test_shared_prompt.py checks values and gradients). grpo.py is the math on these tensors;
rl.py calls both.
Imports: model (the cache keyword), torch, transformers (its Cache interface, for the shared-prompt forward).
"""
import warnings
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model import cache_keyword


def micro_batches(rows, lengths, start, size, group=None):
    """Rows (indices) in chunks of `size`: [(index tensor, width)], width = the columns the chunk
    needs (its prompts end at `start`). Rows sorted by length, so a chunk pads little; with
    `group` (G), whole groups stay together, ordered by their longest row, so a prompt-shared
    forward runs each prompt once per chunk."""
    if group is None:
        order = sorted(rows, key=lambda i: lengths[i])
    else:
        members = {}
        for i in sorted(rows, key=lambda i: lengths[i]):
            members.setdefault(i // group, []).append(i)
        order = [i for g in sorted(members, key=lambda g: lengths[members[g][-1]]) for i in members[g]]
    return [(torch.tensor(order[k:k + size]), start + max(1, max(lengths[i] for i in order[k:k + size])))
            for k in range(0, len(order), size)]


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
                            use_cache=False, **{cache_keyword(decoder): recorded}).last_hidden_state
    kept = all(layer.is_initialized for layer in recorded.layers)
    # reentrant checkpointing runs layers without autograd: their keys would carry no gradient
    if not kept or (prompt_states.requires_grad and not any(layer.keys.requires_grad for layer in recorded.layers)):
        warnings.warn("shared-prompt forward: the decoder did not keep the prompt's keys/values with their "
                      "gradients (reentrant checkpointing?); running the plain forward instead")
        return None
    prefix = Cache(layers=[_PrefixLayer(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse))
                           for layer in recorded.layers])
    response_states = decoder(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                              position_ids=position_ids[:, start:], use_cache=False,
                              **{cache_keyword(decoder): prefix}).last_hidden_state
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
            # transformers drops the cache inside a checkpointed decoder layer unless the
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
    final hidden states (a reward term's pooled states). `temperature`: the sampler's; the
    log-probs and entropies are those of softmax(logits / temperature), the distribution the
    tokens were drawn from (top-k / top-p filtering is not applied; why:
    docs/grpo.md#grpo-and-the-one-loop-grpopy-rlpy-trainpy). `model`: a TokenLogProbs (bare or
    wrapped by DDP, FSDP or torch.compile), or a bare causal LM. `start`: the first response column (every row's
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


def response_mean(hidden, response_mask):
    """[N, T, H] -> [N, H]: the mean over response tokens, in fp32 (a bf16 running sum drifts)."""
    m = response_mask.float().unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)
