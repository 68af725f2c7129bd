"""Hand-written, KV-cached, batched sampling for any transformers causal LM (not `model.generate`).

    from sample import generate, sample
    new_tokens = generate(model, prompt_ids, 256, temperature=1.0, num_samples=8,
                          eos_token_id=tok.eos_token_id, stop="</Solution>", tokenizer=tok)
    rollouts = sample(model, prompt_ids, 256, ...)   # same, plus lengths and sampling log-probs
    python bench/sample.py                           # speed against model.generate

How it works: prompts are left-padded into one batch and prefilled once; with num_samples=G
the prompt cache is then repeated to G rows, so prefill cost does not grow with G. Each layer's
keys/values live in a buffer reserved for the whole generation (a new token is written in
place; transformers' default cache re-allocates itself every step). Rows that finish (EOS or a
stop string) leave the batch once a quarter of it has finished, so compute is not spent on
them; leaving copies the cache, hence the batching.

Threads on CPU: bench/threads.py measures decode steps and training steps on 1 and 2 threads
(on our 2-core VMs, 2 threads were 1.05-1.4x faster at decoding; see distributed.cpu_threads).
Imports: torch, transformers. Nothing of ours.
"""
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


LEAVE_FRACTION = 0.25  # finished rows leave the batch once they are this fraction of it


class _ReservedLayer(DynamicLayer):
    """One layer's keys/values in a buffer of `capacity` positions; `keys`/`values` are views."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buffer = key_states.new_zeros(b, h, self.capacity, d)
        self.value_buffer = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self):
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + n] = key_states
        self.value_buffer[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def batch_repeat_interleave(self, repeats):
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices):
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._views()


def reserved_cache(model, capacity):
    """A transformers Cache whose layers reserve `capacity` positions up front."""
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_ReservedLayer(capacity) for _ in range(layers)])


@dataclass
class Rollouts:
    """Samples of one `sample` call; samples of one prompt are consecutive (prompt-major)."""
    tokens: list      # list[list[int]]: new tokens of each sample, cut after EOS / the stop string
    logprobs: list    # list[list[float]]: log-prob of each token under the sampling distribution
    finished: list    # list[bool]: stopped by EOS or stop string (False: hit max_new_tokens)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Temperature, then top-k, then nucleus (top-p) filtering: filtered entries become -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _noise(generator, rows, n_rows, vocab, group, device):
    """Uniform noise [len(rows), vocab] for the Gumbel-max draw. With one generator per prompt,
    each prompt's G rows draw from its own stream every step, alive or not: a sample is then
    the same whatever else shares its batch (the key to multi-process = single-process)."""
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(group, vocab, generator=g, device=device) for g in generator])
        return u.view(n_rows, vocab)[rows]
    return torch.rand(len(rows), vocab, generator=generator, device=device)


def _draw(logits, noise, temperature, top_k, top_p):
    """Next token per row (Gumbel-max: an exact draw from the filtered distribution) and its
    log-prob under that distribution (0 for greedy)."""
    if temperature == 0:
        return logits.argmax(-1), logits.new_zeros(logits.shape[0])
    logprobs = filter_logits(logits, temperature, top_k, top_p).log_softmax(-1)
    gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
    token = (logprobs + gumbel).argmax(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def _left_pad(prompts, pad_id, device):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class _StopWatch:
    """Host-side stop detection on decoded text: one string per row holding its recent tail."""

    def __init__(self, tokenizer, stops, eos_token_id, rows):
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos_token_id
        self.keep = max((len(s) for s in stops), default=0) + 16
        self.tails = [""] * rows
        self.pieces = {}

    def hit(self, row, token):
        if token == self.eos:
            return True
        if not self.stops:
            return False
        if token not in self.pieces:
            self.pieces[token] = self.tokenizer.decode([token])
        tail = (self.tails[row] + self.pieces[token])[-self.keep:]
        self.tails[row] = tail
        return any(s in tail for s in self.stops)


@torch.no_grad()
def sample(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None,
           stop=None, tokenizer=None, num_samples=1, generator=None, pad_token_id=0):
    """Sample `num_samples` continuations of each prompt (token-id lists); see module docstring.

    generator: a torch.Generator, or one per prompt (then a prompt's samples do not depend on
    the other prompts in the batch)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops and tokenizer is None:
        raise ValueError("stop strings need the tokenizer= that decodes the model's tokens")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts: give one per prompt")
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_token_id, device)
    width, n = ids.shape[1], len(prompts) * num_samples
    attention = torch.zeros((len(prompts), width + max_new_tokens), dtype=torch.long, device=device)
    attention[:, :width] = mask
    cache = reserved_cache(model, width + max_new_tokens)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    if num_samples > 1:  # one prefill, then G copies of its cache
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        attention = attention.repeat_interleave(num_samples, dim=0)
    position = attention.sum(-1)                       # next position id of each row
    rows = torch.arange(n, device=device)              # which sample each batch row is
    alive = [True] * n                                 # per batch row, on the host
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    lengths, finished = [max_new_tokens] * n, [False] * n
    watch = _StopWatch(tokenizer, stops, eos_token_id, n)
    # on CPU reading the new tokens costs nothing; on an accelerator, sync every few steps only
    sync_every = 1 if device.type == "cpu" else 8
    for step in range(max_new_tokens):
        noise = None if temperature == 0 else _noise(generator, rows, n, logits.shape[-1], num_samples, device)
        token, logprob = _draw(logits, noise, temperature, top_k, top_p)
        tokens[rows, step] = token
        logprobs[rows, step] = logprob
        last = step == max_new_tokens - 1
        if (step + 1) % sync_every == 0 or last:
            block = tokens[rows, step + 1 - min(sync_every, step + 1):step + 1].tolist()
            for r, (sample_id, recent) in enumerate(zip(rows.tolist(), block)):
                for k, t in enumerate(recent):
                    if alive[r] and watch.hit(sample_id, t):
                        alive[r], finished[sample_id] = False, True
                        lengths[sample_id] = step + 1 - len(recent) + k + 1
            if last or not any(alive):
                break
            if alive.count(False) >= LEAVE_FRACTION * len(alive):
                keep = torch.tensor([r for r, a in enumerate(alive) if a], device=device)
                cache.batch_select_indices(keep)
                rows, attention, position = rows[keep], attention[keep], position[keep]
                token, alive = token[keep], [True] * len(keep)
        attention[:, width + step] = 1
        out = model(input_ids=token[:, None], attention_mask=attention[:, :width + step + 1],
                    position_ids=position[:, None], past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        position = position + 1
    tokens, logprobs = tokens.tolist(), logprobs.tolist()
    return Rollouts([t[:k] for t, k in zip(tokens, lengths)], [p[:k] for p, k in zip(logprobs, lengths)], finished)


def generate(model, prompts, max_new_tokens, **kwargs):
    """The new tokens of each sample (list[list[int]]); `sample` has the richer result."""
    return sample(model, prompts, max_new_tokens, **kwargs).tokens
