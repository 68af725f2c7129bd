"""Hand-written, KV-cached, batched sampling for any transformers causal LM (not `model.generate`).

    from sample import generate, sample
    new_tokens = generate(model, prompt_ids, 256, temperature=1.0, num_samples=8,
                          eos_token_id=tok.eos_token_id, stop="</Solution>", tokenizer=tok)
    rollouts = sample(model, prompt_ids, 256, ...)   # same, plus lengths and sampling log-probs
    python bench/sample.py                           # CPU: speed against model.generate
    python bench/gpu.py                              # GPU: eager, CUDA graphs (our step / the model's), model.generate

How it works: prompts are left-padded into one batch and prefilled once; with num_samples=G the
prompt cache is copied to G rows, so prefill cost does not grow with G. Decoding then runs on a
`Decoder`, kept per model between calls: every layer's keys/values live in buffers that never
move (FixedCache), and a step (decode_step: forward, then the next-token draw) reads its inputs
from and writes its outputs to fixed tensors. The cache column a step writes is a tensor, not a
Python int, and attention gets a 4D mask we build (the row's prompt without its padding, its
tokens so far), so transformers' mask builder, which reads tensors back to the host, never runs.
Llama and Qwen2 models decode with our own forward for one token (llama_step.py: the model's
function in a third of its CUDA kernels, whose count sets a GPU step's time); other models run
their own forward with our cache. Either way grouped query heads attend as their key/value
head's queries, so the cache is never repeated per query head.

On a GPU each step is a CUDA graph replay: one graph per (batch bucket, window bucket), captured
the first time that shape is met (a warm-up step, then the capture: ~2 steps' time) and reused by
every later call. A step attends over the first `window` columns, the columns written so far
rounded up to WINDOW_BUCKET, and runs the first `batch` rows, the live rows rounded up to
BATCH_BUCKET (rows past the live ones compute garbage nobody reads). On the CPU the same code
runs the step directly on the exact live rows and written columns (buckets of 1): the CPU gains
nothing from graphs, and a longer window is work it would really do.

EOS (any of several ids) and stop strings are checked on the host every step on CPU, where
reading the tokens is free, and every 8 steps on an accelerator (sync_every); finished rows stay
in the batch, their output ignored, until a check finds them a quarter of it: then the live rows
are packed to the front of the same buffers (their written columns only) and the batch shrinks.
Imports: torch, transformers, llama_step, model (the cache keyword).
"""
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

import llama_step
from model import cache_keyword


LEAVE_FRACTION = 0.25  # finished rows leave the batch once they are this fraction of it
WINDOW_BUCKET = 128    # CUDA graphs: attention windows are multiples of this many columns
BATCH_BUCKET = 8       # ... and batches multiples of this many rows (powers of two below it)
OWN_STEP = True        # Llama and Qwen2 decode with llama_step.logits; False: the model's forward (bench/gpu.py)


def sync_every(device):
    """Steps between reads of the new tokens (a host sync; rows can leave only then): every
    step on CPU, where it costs nothing, else every 8 so the host queues steps ahead."""
    return 1 if device.type == "cpu" else 8


def _round_up(x, bucket):
    """x rounded up to a multiple of `bucket`, or below it to a power of two (bucket 1: x)."""
    return 1 << (x - 1).bit_length() if x < bucket else -(-x // bucket) * bucket


class FixedCache(Cache):
    """Every layer's keys/values in [rows, heads, capacity, dim] buffers that no step moves or
    reshapes: a step writes cache column `slot` (a one-element tensor) of the first `batch` rows,
    and attention reads their first `window` columns."""

    def __init__(self, like, rows, capacity, slot):
        layers = []
        for layer in like.layers:  # the prefill's layers: their kind, heads, dim, dtype
            if type(layer) is not DynamicLayer:  # sliding-window, linear or quantized layers
                raise ValueError(f"fixed-shape decoding needs full-attention layers, not {type(layer).__name__}")
            _, heads, _, dim = layer.keys.shape
            fixed = DynamicLayer()
            fixed.dtype, fixed.device, fixed.is_initialized = layer.keys.dtype, layer.keys.device, True
            fixed.keys, fixed.values = (layer.keys.new_zeros(rows, heads, capacity, dim) for _ in range(2))
            layers.append(fixed)
        super().__init__(layers=layers)
        self.slot, self.batch, self.window = slot, rows, capacity

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        keys, values = layer.keys[:self.batch], layer.values[:self.batch]  # views: writes land in the buffers
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        return keys[:, :, :self.window], values[:, :, :self.window]

    def fits(self, like, rows, capacity):
        """Whether these buffers can hold `rows` x `capacity` of a prefill cache like `like`."""
        mine, theirs = self.layers[0].keys, like.layers[0].keys
        return (len(self.layers) == len(like.layers) and mine.shape[0] >= rows and mine.shape[2] >= capacity
                and (mine.shape[1], mine.shape[3], mine.dtype, mine.device)
                == (theirs.shape[1], theirs.shape[3], theirs.dtype, theirs.device))


def decode_step(model, qkv, cache, token, noise, pads, slot, temperature, top_k, top_p):
    """Feed one token per row (its keys/values go to cache column `slot`) and draw the next.
    Shapes depend on cache.batch and cache.window only, and nothing is read back to the host.
    qkv: llama_step.stacked_qkv's weights (llama_step.logits runs the step), or None (the model's
    forward does)."""
    columns = torch.arange(cache.window, device=token.device)
    visible = (columns >= pads[:, None]) & (columns <= slot)  # the row's prompt (not its padding), tokens so far
    mask = visible[:, None, None, :]                           # 4D: [rows, heads, queries, columns], broadcast
    if (qkv is None and model.config._attn_implementation == "eager") or token.device.type == "cuda":
        # additive, in the cache's dtype: eager attention adds it to the scores, and on a GPU
        # SDPA would convert a boolean mask in every layer (2% of a step on an H200); on the CPU
        # SDPA takes booleans directly (a float mask made steps 25% slower there)
        dtype = cache.layers[0].keys.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=token.device).masked_fill(~mask, torch.finfo(dtype).min)
    if qkv is not None:
        logits = llama_step.logits(model, qkv, cache, token, mask, (slot - pads)[:, None])
    else:
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=(slot - pads)[:, None],
                       use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
    return _draw(logits.float(), noise, temperature, top_k, top_p)


class Decoder:
    """What decoding keeps of one model between calls: the cache, a step's fixed inputs (`token`,
    `pads`, `noise`, `slot`) and outputs (`next_token`, `next_logprob`), and on a GPU the captured
    graphs. Rows [:live] are the batch's live rows, in the order of sample()'s `rows`."""

    def __init__(self, model, like, rows, capacity):
        device = like.layers[0].keys.device
        self.model = model
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = FixedCache(like, rows, capacity, self.slot)
        self.token, self.pads, self.next_token = (torch.zeros(rows, dtype=torch.long, device=device) for _ in range(3))
        self.next_logprob = torch.zeros(rows, device=device)
        self.noise = None  # [rows, vocab], allocated by the first sampling call
        self.captured, self.weights = {}, _weights_key(model)
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.qkv = llama_step.stacked_qkv(model) if OWN_STEP and llama_step.fits(model) else None
        self.buckets = (1, 1)  # (rows, columns) of eager steps: exact (a test sets a GPU's, to check them on a CPU)

    def start(self, prompt_cache, repeats, pads, token):
        """Load a prefill: row i * repeats + j gets prompt i's keys/values (columns [:width]);
        refill the stacked q/k/v weights (training may have changed the model's since)."""
        if self.qkv is not None:
            llama_step.stacked_qkv(self.model, into=self.qkv)
        for fixed, layer in zip(self.cache.layers, prompt_cache.layers):
            b, h, width, d = layer.keys.shape
            capacity = fixed.keys.shape[2]
            fixed.keys[:b * repeats].view(b, repeats, h, capacity, d)[:, :, :, :width] = layer.keys[:, None]
            fixed.values[:b * repeats].view(b, repeats, h, capacity, d)[:, :, :, :width] = layer.values[:, None]
        n = len(pads)
        self.pads[:n], self.token[:n] = pads, token
        self.slot.fill_(prompt_cache.layers[0].keys.shape[2])

    def keep(self, kept, live, written):
        """Pack the rows `kept` (indices into [:live]) to the front, their written columns only.
        Rows left behind get padding 0: as bucket filler they then attend to finite values only
        (a row that sees no column at all would write NaNs into the cache)."""
        for layer in self.cache.layers:
            for buffer in (layer.keys, layer.values):
                buffer[:len(kept), :, :written] = buffer[kept, :, :written]
        self.pads[:len(kept)], self.token[:len(kept)] = self.pads[kept], self.token[kept]
        self.pads[len(kept):live] = 0

    def step(self, live, written, noise, temperature, top_k, top_p, graphed):
        """One decode step of the live rows, `written` cache columns so far: (next tokens,
        their log-probs) [live], views valid until the next step. Writes column `slot`, then
        moves `slot` on. graphed: replay a CUDA graph of the bucketed shape."""
        if noise is not None:
            if self.noise is None:
                self.noise = noise.new_zeros(self.token.shape[0], noise.shape[1])
            self.noise[:live] = noise
        rows, capacity = self.token.shape[0], self.cache.layers[0].keys.shape[2]
        buckets = (BATCH_BUCKET, WINDOW_BUCKET) if graphed else self.buckets
        shape = (min(_round_up(live, buckets[0]), rows), min(_round_up(written, buckets[1]), capacity),
                 temperature, top_k, top_p)
        if graphed:
            graph = self.captured.get(shape) or self._capture(shape)
            graph.replay()
        else:
            self._run(*shape)
        self.token[:live] = self.next_token[:live]
        self.slot += 1
        return self.next_token[:live], self.next_logprob[:live]

    def _run(self, batch, window, temperature, top_k, top_p):
        self.cache.batch, self.cache.window = batch, window
        noise = None if temperature == 0 else self.noise[:batch]
        token, logprob = decode_step(self.model, self.qkv, self.cache, self.token[:batch], noise, self.pads[:batch],
                                     self.slot, temperature, top_k, top_p)
        self.next_token[:batch], self.next_logprob[:batch] = token, logprob

    def _capture(self, shape):
        """A CUDA graph of one step of this shape. A warm-up step runs first, on a side stream as
        capture needs (lazy initialisations such as cuBLAS workspaces happen outside the graph);
        it writes what the replay writes again, so it changes nothing. All graphs share one
        memory pool: they run one at a time, and their results are copied to fixed tensors."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(*shape)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._run(*shape)
        self.captured[shape] = graph
        return graph


_DECODERS = weakref.WeakKeyDictionary()  # model -> its Decoder (freed with the model)


def _weights_key(model):
    """Where the weights live: graphs read them at these addresses (in-place updates are fine)."""
    return tuple(p.data_ptr() for p in model.parameters())


def decoder_for(model, prompt_cache, rows, capacity):
    """The model's Decoder, made anew (and bigger: a call never shrinks it) when it cannot hold
    this call or the model's weights moved (its graphs read them where they were)."""
    old = _DECODERS.get(model)
    if old is not None and old.cache.fits(prompt_cache, rows, capacity) and old.weights == _weights_key(model):
        return old
    if old is not None and old.cache.fits(prompt_cache, 1, 1):
        rows, capacity = max(rows, old.token.shape[0]), max(capacity, old.cache.layers[0].keys.shape[2])
    _DECODERS.pop(model, None)  # free the old buffers and graphs first
    del old
    if prompt_cache.layers[0].keys.device.type == "cuda":  # room for the graphs' bucketed shapes
        rows, capacity = _round_up(rows, BATCH_BUCKET), _round_up(capacity, WINDOW_BUCKET)
    _DECODERS[model] = Decoder(model, prompt_cache, rows, capacity)
    return _DECODERS[model]


@dataclass
class Samples:
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
    """Host-side stop detection: EOS ids, and stop strings in the decoded tail of each sample."""

    def __init__(self, tokenizer, stops, eos_ids, rows):
        self.tokenizer, self.stops, self.eos = tokenizer, stops, eos_ids
        self.keep = max((len(s) for s in stops), default=0) + 16
        self.tails = [""] * rows

    def first_stop(self, sample_id, recent):
        """Index in `recent` (the sample's newest tokens) of the token that ends it, or None.
        The block is decoded at once (one call per sample per read); only a block that holds a
        stop string is decoded again token by token, to find where."""
        end = next((k for k, t in enumerate(recent) if t in self.eos), None)
        block = recent if end is None else recent[:end]
        if self.stops and block:
            tail = self.tails[sample_id]
            text = tail + self.tokenizer.decode(block)
            if any(s in text for s in self.stops):
                return next(k for k in range(len(block))
                            if any(s in tail + self.tokenizer.decode(block[:k + 1]) for s in self.stops))
            self.tails[sample_id] = text[-self.keep:]
        return end


@torch.no_grad()
def sample(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None,
           stop=None, tokenizer=None, num_samples=1, generator=None, pad_token_id=0, cuda_graphs=True):
    """Sample `num_samples` continuations of each prompt (token-id lists); see module docstring.

    eos_token_id: an id or a list of ids (instruct models end with any of several).
    generator: a torch.Generator, or one per prompt (then a prompt's samples do not depend on
    the other prompts in the batch). cuda_graphs=False: on a GPU too, run each step eagerly
    over the exact live rows and written columns (bench/gpu.py compares the two)."""
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
    logits = out.logits[:, -1].float().repeat_interleave(num_samples, dim=0)
    rows = torch.arange(n, device=device)              # which sample each batch row is
    vocab = logits.shape[-1]

    def noise():
        return None if temperature == 0 else _noise(generator, rows, n, vocab, num_samples, device)
    token, logprob = _draw(logits, noise(), temperature, top_k, top_p)
    prompt_cache = getattr(out, cache_keyword(model))
    decoder = decoder_for(model, prompt_cache, n, width + max_new_tokens)
    decoder.start(prompt_cache, num_samples, width - mask.sum(-1).repeat_interleave(num_samples), token)
    del out
    alive = [True] * n                                 # per batch row, on the host
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n, max_new_tokens), device=device)
    lengths, finished = [max_new_tokens] * n, [False] * n
    watch = _StopWatch(tokenizer, stops, eos_ids, n)
    every, graphed = sync_every(device), cuda_graphs and device.type == "cuda"
    for step in range(max_new_tokens):
        tokens[rows, step] = token
        logprobs[rows, step] = logprob
        last = step == max_new_tokens - 1
        if (step + 1) % every == 0 or last:
            block = tokens[rows, step + 1 - min(every, step + 1):step + 1].tolist()
            for r, (sample_id, recent) in enumerate(zip(rows.tolist(), block)):
                end = watch.first_stop(sample_id, recent) if alive[r] else None
                if end is not None:
                    alive[r], finished[sample_id] = False, True
                    lengths[sample_id] = step + 1 - len(recent) + end + 1
            if last or not any(alive):
                break
            if alive.count(False) >= LEAVE_FRACTION * len(alive):
                kept = torch.tensor([r for r, a in enumerate(alive) if a], device=device)
                decoder.keep(kept, len(alive), width + step + 1)
                rows, alive = rows[kept], [True] * len(kept)
        token, logprob = decoder.step(len(alive), width + step + 1, noise(), temperature, top_k, top_p, graphed)
    tokens, logprobs = tokens.tolist(), logprobs.tolist()
    return Samples([t[:k] for t, k in zip(tokens, lengths)], [p[:k] for p, k in zip(logprobs, lengths)], finished)


def generate(model, prompts, max_new_tokens, **kwargs):
    """The new tokens of each sample (list[list[int]]); `sample` has the richer result."""
    return sample(model, prompts, max_new_tokens, **kwargs).tokens
