"""Hand-written, KV-cached, batched sampling for any transformers causal LM (not `model.generate`).

    from sample import generate, sample
    new_tokens = generate(model, prompt_ids, 256, temperature=1.0, num_samples=8,
                          eos_token_id=tok.eos_token_id, stop="</Solution>", tokenizer=tok)
    rollouts = sample(model, prompt_ids, 256, ...)   # same, plus lengths and sampling log-probs
    rollouts = sample(model, prompt_ids, 256, ..., compile=True)  # decode steps compiled (CUDA graphs)
    python bench/sample.py                           # speed against model.generate, eager and compiled

How it works: prompts are left-padded into one batch and prefilled once; with num_samples=G
the prompt cache is then copied to G rows, so prefill cost does not grow with G. Each layer's
keys/values then live in buffers sized for the whole generation (FixedCache); a decode step
writes its token's keys/values at a cache column held in a tensor and attends through a 4D
mask we build (the row's prompt without its padding, its tokens so far), so transformers' mask
builder, which reads tensors back to the host, never runs. With compile=True the step
(decode_step: forward and next-token draw) attends over the whole cache, so none of its shapes
changes from step to step, and runs under torch.compile (reduce-overhead, fullgraph, dynamic
shapes): one graph per process and model, reused by later calls whatever their batch size or
cache length, replayed as a CUDA graph on a GPU. Eager steps attend over the columns written
so far only (cheaper; bench/sample.py measures both). EOS (any of several ids) and stop
strings are checked on the host every step on CPU, where reading the tokens is free, and
every 8 steps on an accelerator (sync_every); finished rows stay in the batch, their output
ignored, until a check finds them a quarter of it: then they leave (that copies the cache,
hence the batching).

Threads on CPU: bench/threads.py measures decode steps and training steps on 1 and 2 threads
(on our 2-core VMs, 2 threads were 1.05-1.4x faster at decoding; see distributed.cpu_threads).
Imports: torch, transformers. Nothing of ours.
"""
import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


LEAVE_FRACTION = 0.25  # finished rows leave the batch once they are this fraction of it


def sync_every(device):
    """Steps between reads of the new tokens (a host sync; rows can leave only then): every
    step on CPU, where it costs nothing, else every 8 so the host queues steps ahead."""
    return 1 if device.type == "cpu" else 8


class FixedCache(Cache):
    """The prefill's keys/values, each row repeated `repeats` times, in [rows, heads, capacity,
    dim] buffers that no step reshapes: a step writes cache column `slot` (a one-element tensor,
    not a Python int) and attention reads the first `window` columns (None: all of them, a
    fixed shape, for compile; eager decoding reads only the columns written so far: cheaper)."""

    def __init__(self, prompt_cache, repeats, capacity, slot):
        for layer in prompt_cache.layers:  # the prefill's layers, their tensors swapped for the buffers
            if type(layer) is not DynamicLayer:  # sliding-window, linear or quantized layers
                raise ValueError(f"fixed-shape decoding needs full-attention layers, not {type(layer).__name__}")
            layer.keys, layer.values = (_repeated_into(s, repeats, capacity) for s in (layer.keys, layer.values))
        super().__init__(layers=prompt_cache.layers)
        self.capacity, self.slot, self.window = capacity, slot, None
        self._static_addresses()

    def _static_addresses(self):
        # CUDA graphs then read and write the buffers in place instead of copying them in at
        # each step; a new address (next call, rows leaving) makes them record a new graph
        for layer in self.layers:
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.keys.index_copy_(2, self.slot, key_states)
        layer.values.index_copy_(2, self.slot, value_states)
        return layer.keys[:, :, :self.window], layer.values[:, :, :self.window]

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._static_addresses()


def _repeated_into(states, repeats, capacity):
    """[b, h, width, d] states -> a zeroed [b * repeats, h, capacity, d] buffer holding them first."""
    b, h, width, d = states.shape
    buffer = states.new_zeros(b * repeats, h, capacity, d)
    buffer.view(b, repeats, h, capacity, d)[:, :, :, :width] = states[:, None]
    return buffer


def decode_step(model, cache, token, noise, pads, slot, temperature, top_k, top_p):
    """Feed one token per row (its keys/values go to cache column `slot`) and draw the next.
    Shapes depend on the batch and cache.window only, and nothing is read back to the host."""
    columns = torch.arange(cache.window or cache.capacity, device=token.device)
    visible = (columns >= pads[:, None]) & (columns <= slot)  # the row's prompt (not its padding), tokens so far
    mask = visible[:, None, None, :]                           # 4D: transformers passes it to attention as is
    if model.config._attn_implementation == "eager":           # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, device=token.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=(slot - pads)[:, None],
                past_key_values=cache, use_cache=True)
    return _draw(out.logits[:, -1].float(), noise, temperature, top_k, top_p)


@functools.cache
def compiled_decode_step():
    """decode_step under torch.compile, one per process: it keeps a graph per model (dynamic
    shapes: whatever the batch and cache length), so every call after the first reuses it."""
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=True)

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs reuse the memory of
        return tuple(t.clone() for t in step(*args))  # the last step's outputs, hence the copies
    return run


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

    def __init__(self, tokenizer, stops, eos_ids, rows):
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos_ids
        self.keep = max((len(s) for s in stops), default=0) + 16
        self.tails = [""] * rows
        self.pieces = {}

    def hit(self, row, token):
        if token in self.eos:
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
           stop=None, tokenizer=None, num_samples=1, generator=None, pad_token_id=0, compile=False):
    """Sample `num_samples` continuations of each prompt (token-id lists); see module docstring.

    eos_token_id: an id or a list of ids (instruct models end with any of several).
    generator: a torch.Generator, or one per prompt (then a prompt's samples do not depend on
    the other prompts in the batch). compile: run decode steps through compiled_decode_step()."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    if stops and tokenizer is None:
        raise ValueError("stop strings need the tokenizer= that decodes the model's tokens")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts: give one per prompt")
    if model.config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError("decoding passes attention a 4D mask: use attn_implementation 'sdpa' or 'eager'")
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_token_id, device)
    width, n = ids.shape[1], len(prompts) * num_samples
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    slot = torch.tensor([width], device=device)        # cache column of the token being fed
    cache = FixedCache(out.past_key_values, num_samples, width + max_new_tokens, slot)
    pads = width - mask.sum(-1).repeat_interleave(num_samples)  # left-padding columns of each row
    logits = out.logits[:, -1].float().repeat_interleave(num_samples, dim=0)
    step_fn = compiled_decode_step() if compile else decode_step
    rows = torch.arange(n, device=device)              # which sample each batch row is
    alive = [True] * n                                 # per batch row, on the host
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    lengths, finished = [max_new_tokens] * n, [False] * n
    watch = _StopWatch(tokenizer, stops, eos_ids, n)
    every = sync_every(device)

    def noise():
        return None if temperature == 0 else _noise(generator, rows, n, logits.shape[-1], num_samples, device)
    token, logprob = _draw(logits, noise(), temperature, top_k, top_p)
    for step in range(max_new_tokens):
        tokens[rows, step] = token
        logprobs[rows, step] = logprob
        last = step == max_new_tokens - 1
        if (step + 1) % every == 0 or last:
            block = tokens[rows, step + 1 - min(every, step + 1):step + 1].tolist()
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
                rows, pads, token, alive = rows[keep], pads[keep], token[keep], [True] * len(keep)
        cache.window = None if compile else width + step + 1  # compiled: fixed shapes
        token, logprob = step_fn(model, cache, token, noise(), pads, slot, temperature, top_k, top_p)
        slot += 1
    tokens, logprobs = tokens.tolist(), logprobs.tolist()
    return Rollouts([t[:k] for t, k in zip(tokens, lengths)], [p[:k] for p, k in zip(logprobs, lengths)], finished)


def generate(model, prompts, max_new_tokens, **kwargs):
    """The new tokens of each sample (list[list[int]]); `sample` has the richer result."""
    return sample(model, prompts, max_new_tokens, **kwargs).tokens
