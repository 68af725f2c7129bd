"""sample.py against full forward passes and transformers' own generate."""
import collections
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sample
from model import new_tiny_model

torch.set_num_threads(1)
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29], [1, 40]]


def _diverse(lm, seed):
    """Random weights loud enough that greedy outputs vary from step to step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.15))
    return lm.eval()


def _llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


MODELS = {"qwen2-tiny": lambda s: new_tiny_model(seed=s, vocab_size=64), "llama-gqa": _llama}


@pytest.fixture(params=sorted(MODELS))
def lm(request):
    return _diverse(MODELS[request.param](0), 0)


class _Recorder:
    """Wraps sample._draw to record the logits each decoding step saw."""

    def __init__(self, monkeypatch):
        self.logits, self.tokens = [], []
        draw = sample._draw

        def recording_draw(logits, *args):
            token, logprob = draw(logits, *args)
            self.logits.append(logits.clone())
            self.tokens.append(token.clone())
            return token, logprob
        monkeypatch.setattr(sample, "_draw", recording_draw)


@pytest.mark.parametrize("step,attention", [("own", "sdpa"), ("model's", "sdpa"), ("model's", "eager")])
def test_cached_logits_equal_full_forward(lm, monkeypatch, step, attention):
    """Both decode steps: ours (llama_step.logits) and the model's forward with our 4D mask
    (boolean for sdpa, added for eager), against the model's full forward over the whole text."""
    lm.set_attn_implementation(attention)
    monkeypatch.setattr(sample, "OWN_STEP", step == "own")
    rec = _Recorder(monkeypatch)
    calls = _decode_calls(monkeypatch)
    out = sample.generate(lm, PROMPTS, 12, temperature=0)
    assert {own for *_, own in calls} == {step == "own"}  # the step asked for ran, no silent fallback
    ids, mask = sample._left_pad([p + o for p, o in zip(PROMPTS, out)], 0, "cpu")
    # right-aligning prompt+output equals the left-padded prompt followed by the outputs
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for step, logits in enumerate(rec.logits):
        expected = full[:, ids.shape[1] - 12 - 1 + step]
        assert (logits - expected).abs().max() <= 1e-4, step


def test_greedy_equals_transformers_generate(lm):
    out = sample.generate(lm, PROMPTS, 16, temperature=0)
    ids, mask = sample._left_pad(PROMPTS, 0, "cpu")
    ref = lm.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ref[:, ids.shape[1]:].tolist() == out
    assert len({tuple(o) for o in out}) == len(PROMPTS) and all(len(set(o)) > 2 for o in out)


def test_weights_changed_in_place_reach_the_next_call(lm):
    """Training updates the weights in place between calls: the next call must decode with the
    new ones (our step reads q/k/v from stacked copies, refilled at each call)."""
    sample.generate(lm, PROMPTS, 32, temperature=0)  # the decoder the next call reuses
    decoder = sample._DECODERS[lm]
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = sample.generate(lm, PROMPTS, 16, temperature=0)
    assert sample._DECODERS[lm] is decoder
    ids, mask = sample._left_pad(PROMPTS, 0, "cpu")
    ref = lm.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ref[:, ids.shape[1]:].tolist() == out


def test_greedy_with_eos_equals_generate_one_by_one(lm):
    free = sample.generate(lm, PROMPTS, 16, temperature=0)
    eos = free[2][5]  # a token prompt 2 emits at step 5: some rows stop early, others never
    out = sample.generate(lm, PROMPTS, 16, temperature=0, eos_token_id=eos)
    for p, o in zip(PROMPTS, out):
        ref = lm.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=eos)
        assert ref[0, len(p):].tolist() == o
    assert any(len(o) < 16 for o in out) and all(o[-1] == eos for o in out if len(o) < 16)


def test_sampling_logprobs_match_forward_of_each_sample(lm):
    """Exercises one prefill + cache expansion and rows leaving the batch mid-generation."""
    for eos in range(3, 64):  # an EOS that ends some samples early and not others
        ro = sample.sample(lm, PROMPTS, 24, num_samples=5, eos_token_id=eos, generator=torch.Generator().manual_seed(3))
        if 3 <= sum(ro.finished) <= 15:
            break
    assert len(ro.tokens) == len(PROMPTS) * 5 and 3 <= sum(ro.finished) <= 15
    for k, (toks, lps) in enumerate(zip(ro.tokens, ro.logprobs)):
        p = PROMPTS[k // 5]
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([p + toks])).logits[0, len(p) - 1:-1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(toks)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(lps), ref, atol=1e-4), k
        assert ro.finished[k] == (eos in toks) and (eos not in toks[:-1])


def test_batch_shrinks_and_prefill_runs_once(lm, monkeypatch):
    sizes = []
    hook = lm.register_forward_pre_hook(lambda mod, args, kw: sizes.append(kw["input_ids"].shape), with_kwargs=True)
    calls = _decode_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    sample.sample(lm, PROMPTS, 40, num_samples=8, eos_token_id=3, generator=gen)
    hook.remove()
    assert len(sizes) == 1 and sizes[0] == (len(PROMPTS), max(map(len, PROMPTS)))  # one prefill, not 8
    decode = [rows for rows, *_ in calls]
    assert decode[0] == len(PROMPTS) * 8 and decode[-1] < decode[0]
    assert decode == sorted(decode, reverse=True)


def test_per_prompt_generators_make_samples_batch_independent(lm):
    def gens(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]
    together = sample.generate(lm, PROMPTS, 20, num_samples=3, eos_token_id=5, generator=gens(range(4)))
    for i, p in enumerate(PROMPTS):
        alone = sample.generate(lm, [p], 20, num_samples=3, eos_token_id=5, generator=gens([i]))
        assert alone == together[3 * i:3 * i + 3]
    with pytest.raises(ValueError, match="one per prompt"):
        sample.generate(lm, PROMPTS, 4, generator=gens(range(2)))


def test_fixed_generator_reproduces_samples(lm):
    a = sample.generate(lm, PROMPTS, 20, num_samples=3, generator=torch.Generator().manual_seed(5))
    b = sample.generate(lm, PROMPTS, 20, num_samples=3, generator=torch.Generator().manual_seed(5))
    c = sample.generate(lm, PROMPTS, 20, num_samples=3, generator=torch.Generator().manual_seed(6))
    assert a == b and a != c


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_filtered_tokens_are_never_emitted(lm, monkeypatch, top_k, top_p):
    rec = _Recorder(monkeypatch)
    sample.generate(lm, PROMPTS, 30, num_samples=16, top_k=top_k, top_p=top_p, temperature=1.3,
                    generator=torch.Generator().manual_seed(1))
    draws = 0
    for logits, tokens in zip(rec.logits, rec.tokens):
        probs = (logits / 1.3).softmax(-1)
        order = probs.argsort(-1, descending=True)
        rank = (order == tokens[:, None]).float().argmax(-1)
        if top_k:
            assert (rank < top_k).all()
        mass_above = torch.stack([probs[i, order[i, :rank[i]]].sum() for i in range(len(tokens))])
        assert (mass_above < top_p + 1e-6).all()
        draws += len(tokens)
    assert draws >= 16 * len(PROMPTS) * 30


def test_draw_frequencies_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])).expand(40_000, -1)
    gen = torch.Generator().manual_seed(0)
    for top_k, top_p, expected in [(0, 1.0, [0.4, 0.3, 0.15, 0.1, 0.05]), (2, 1.0, [4 / 7, 3 / 7, 0, 0, 0]),
                                   (0, 0.8, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0])]:
        token, logprob = sample._draw(logits, torch.rand(logits.shape, generator=gen), 1.0, top_k, top_p)
        counts = collections.Counter(token.tolist())
        for tok, e in enumerate(expected):
            assert abs(counts[tok] / len(token) - e) < 0.01, (top_k, top_p, tok)
            if e:
                assert torch.allclose(logprob[token == tok], torch.tensor(e).log())


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_string_cuts_after_its_first_occurrence(lm):
    free = sample.generate(lm, PROMPTS, 24, temperature=0)
    tok = _CharTokenizer()
    text = tok.decode(free[0])
    stop = text[6:9]  # a string that first ends at some step of row 0
    end = text.index(stop) + len(stop)
    out = sample.sample(lm, PROMPTS, 24, temperature=0, stop=[stop, "#never#"], tokenizer=tok)
    assert out.tokens[0] == free[0][:end] and out.finished[0]
    for free_row, cut in zip(free, out.tokens):
        assert free_row[:len(cut)] == cut
        assert (stop in tok.decode(cut)) == (len(cut) < 24) or tok.decode(cut).endswith(stop)
    with pytest.raises(ValueError, match="tokenizer"):
        sample.generate(lm, PROMPTS, 4, stop="x")


def test_any_of_several_eos_ids_ends_a_sample(lm):
    free = sample.generate(lm, PROMPTS, 16, temperature=0)  # greedy rows do not depend on each other

    def cut(row, eos):  # the reference: a row ends at its first EOS, whichever id it is
        ends = [k + 1 for k, t in enumerate(row) if t in eos]
        return row[:ends[0]] if ends else row
    first = free[2][5]
    second = next(t for row in free for k, t in enumerate(row)  # a row's first token that ends it before `first`
                  if t != first and first not in row[:k] and t not in row[:k])
    out = sample.sample(lm, PROMPTS, 16, temperature=0, eos_token_id=[first, second])
    assert out.tokens == [cut(row, {first, second}) for row in free]
    assert out.finished == [len(t) < 16 or t[-1] in (first, second) for t in out.tokens]
    assert any(t[-1] == second for t in out.tokens if len(t) < 16)  # the second id did end a sample


def _eos_ending_some(lm, gens):
    """An EOS id that ends some of 12 samples early and not others (so rows leave mid-generation)."""
    for eos in range(3, 64):
        ro = sample.sample(lm, PROMPTS, 30, num_samples=3, eos_token_id=eos, generator=gens())
        if 3 <= sum(ro.finished) <= 9:
            return eos, ro
    raise AssertionError("no EOS id ends between 3 and 9 of the 12 samples")


def _decode_calls(monkeypatch):
    """Per decode step: (batch rows, attention window, the cache's buffer addresses, whether our
    own step ran), recorded by a wrapper around sample.decode_step."""
    calls = []
    step = sample.decode_step

    def recording_step(model, qkv, cache, token, *args):
        calls.append((token.shape[0], cache.window, tuple(layer.keys.data_ptr() for layer in cache.layers),
                      qkv is not None))
        return step(model, qkv, cache, token, *args)
    monkeypatch.setattr(sample, "decode_step", recording_step)
    return calls


def test_cache_keeps_its_buffers_and_rows_leave_only_at_reads(lm, monkeypatch):
    def gens():
        return [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    eos, every_step = _eos_ending_some(lm, gens)
    calls = _decode_calls(monkeypatch)
    monkeypatch.setattr(sample, "sync_every", lambda device: 8)  # what an accelerator does
    every_8th = sample.sample(lm, PROMPTS, 30, num_samples=3, eos_token_id=eos, generator=gens())
    later = sample.generate(lm, PROMPTS[1:], 12, temperature=0)  # a smaller call reuses the buffers
    # one generator per prompt: when finished rows leave does not change any sample
    assert every_8th == every_step
    assert len({buffers for _, _, buffers, _ in calls}) == 1  # the same buffers throughout, and for the next call
    width = max(map(len, PROMPTS))
    batches = [rows for rows, *_ in calls[:-12]]
    for step, (rows, window, _, _) in enumerate(calls[:-12]):
        assert window == width + step + 1  # on the CPU: the live rows, the columns written
    changes = [s for s in range(1, len(batches)) if batches[s] != batches[s - 1]]
    assert batches[0] == 12 and changes and all((s + 1) % 8 == 0 for s in changes)
    assert later == [row[:12] for row in sample.generate(lm, PROMPTS, 12, temperature=0)[1:]]


def test_bucketed_steps_give_the_same_samples(lm, monkeypatch):
    """What a GPU runs, on the CPU (without the graph capture): batches rounded up to a bucket
    of rows, attention over the written columns rounded up to a bucket, rows past the live ones
    computing filler, live rows packed to the front as others finish. Same samples as exact steps."""
    def gens():
        return [torch.Generator().manual_seed(11 + i) for i in range(len(PROMPTS))]
    eos, _ = _eos_ending_some(lm, gens)
    calls = _decode_calls(monkeypatch)
    exact = sample.sample(lm, PROMPTS, 30, num_samples=3, eos_token_id=eos, generator=gens())
    live = [rows for rows, *_ in calls]
    calls.clear()
    sample._DECODERS[lm].buckets = (4, 16)  # rows, columns
    bucketed = sample.sample(lm, PROMPTS, 30, num_samples=3, eos_token_id=eos, generator=gens())
    assert bucketed.tokens == exact.tokens and bucketed.finished == exact.finished
    for a, b in zip(bucketed.logprobs, exact.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    width = max(map(len, PROMPTS))
    assert [rows for rows, *_ in calls] == [4 * -(-n // 4) for n in live]
    assert any(rows > n for (rows, *_), n in zip(calls, live))  # filler rows did run
    assert {window for _, window, _, _ in calls} == {16, 32, width + 30}  # width + 30: all the columns there are


def test_decode_steps_read_grouped_key_value_heads_without_copies(monkeypatch):
    """GQA (4 query heads, 2 key/value heads): only the prefill repeats the key/value heads;
    a decode step reads the cache as it is, whatever its length."""
    from transformers.integrations import sdpa_attention
    lm = _diverse(MODELS["llama-gqa"](0), 0)
    copied = []
    repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda states, n: copied.append(states.shape[2]) or repeat(states, n))
    sample.generate(lm, PROMPTS, 6, temperature=0)
    width = max(map(len, PROMPTS))
    assert copied == [width] * 4  # keys and values of the prefill's 2 layers


def test_every_forward_names_the_cache_as_the_installed_transformers_does(monkeypatch):
    """transformers 5.25 renamed the forwards' `past_key_values` to `cache` (the old name logs a
    deprecation on every call): the sampler's prefill and decode steps (through the model's own
    forward too) and the shared-prompt training forward pass the cache only under a name the
    called forward's signature has (`past_key_values` before 5.25)."""
    import inspect

    import forward
    lm = new_tiny_model(seed=0).eval()
    seen, wrong = [], []

    def check(module, args, kwargs):
        for name in {"past_key_values", "cache"} & kwargs.keys():
            seen.append(name)
            if name not in inspect.signature(module.forward).parameters:
                wrong.append(f"{type(module).__name__}({name}=...)")
    for module in (lm, lm.model):
        module.register_forward_pre_hook(check, with_kwargs=True)
    monkeypatch.setattr(sample, "OWN_STEP", False)  # decode through the model's forward, with our cache
    sample.sample(lm, [[5, 6, 7], [8, 9]], 4, num_samples=2, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 7, 10, 11], [5, 6, 7, 12, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    response = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.float)
    forward.sequence_logprobs(lm, ids, attention, response, start=3, groups=[0, 0])  # the prompt runs once
    assert len(seen) >= 3 and not wrong, wrong
