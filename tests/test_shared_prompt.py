"""grpo's shared-prompt forward (sequence_logprobs(..., groups=...): each prompt through the
decoder once) against the plain forward that runs every row's prompt, which test_grpo.py checks
against per-sequence forwards: the same log-probs, entropies, hidden states and summed parameter
gradients (fp32), on Qwen2 (SDPA and eager attention), Llama and Qwen3 (both GQA), with
and without activation checkpointing. The rows: three prompts of different lengths (left
padding), G = 4 responses each, right-padded, in two micro-batches as rl.py cuts them (rows, the
columns they need): one holds part of a group and nothing else, without any padding; the other
one row of that group, three of the next, two of the last.

    python -m pytest -q tests/test_shared_prompt.py    # ~10 s
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from forward import can_share_prompts, pack_rollouts, sequence_logprobs
from model import new_tiny_model

V, G = 50, 4
PROMPT_LENGTHS = (9, 5, 7)
RESPONSE_LENGTHS = (6, 6, 6, 5, 3, 6, 1, 4, 2, 5, 3, 5)
MICRO_BATCHES = ([0, 1, 2], [3, 4, 6, 7, 9, 11])


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: a second thread only waits for its core when other jobs share the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_model(arch):
    torch.manual_seed(0)
    if arch.startswith("qwen2"):
        lm = new_tiny_model(seed=3, vocab_size=V, layers=2, hidden=64)
        if arch == "qwen2-eager":
            lm.set_attn_implementation("eager")
        return lm
    shape = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape))
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))


def rollouts():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(3, V, (n,), generator=g).tolist() for n in RESPONSE_LENGTHS]
    return pack_rollouts(prompts, responses, pad_id=0, device="cpu")


def run(lm, shared, micro_batches=MICRO_BATCHES):
    """Outputs of each micro-batch, and the parameter gradients of a weighted sum of log-probs and
    hidden states, accumulated over the micro-batches as rl.update_minibatch does (none under
    no_grad, as in rl.old_pass)."""
    ids, att, resp, start = rollouts()
    lm.zero_grad(set_to_none=True)
    outs = []
    for rows in micro_batches:
        idx = torch.tensor(rows)
        width = start + max(RESPONSE_LENGTHS[i] for i in rows)
        mb = ids[idx, :width], att[idx, :width], resp[idx, :width]
        out = sequence_logprobs(lm, *mb, start=start, entropy=True, hidden=True, groups=idx // G if shared else None)
        g = torch.Generator().manual_seed(len(outs))
        weights = torch.randn(out.logp.shape, generator=g)
        hidden_weights = torch.randn(out.hidden.shape, generator=g) * mb[1][..., None]  # real tokens only
        if torch.is_grad_enabled():
            ((out.logp * weights).sum() + (out.hidden * hidden_weights).sum()).backward()
        outs.append(out._replace(hidden=out.hidden * mb[1][..., None]))  # pads' states are anyone's guess
    return outs, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def positions_through_first_layer(lm, fn):
    """Token positions the first decoder layer runs during fn() (forward only: a checkpoint
    replay calls forward directly, not through the hook)."""
    seen = []
    hook = lm.get_decoder().layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:2].numel()))
    try:
        result = fn()
    finally:
        hook.remove()
    return sum(seen), result


def close(a, b):
    """Equal up to fp32 rounding, relative to the tensor's scale (summation orders differ: the
    observed gap is ~3e-7 of the largest entry; a missing gradient path is of order 1)."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1)


def assert_same(plain, shared):
    (outs_p, grads_p), (outs_s, grads_s) = plain, shared
    for p, s in zip(outs_p, outs_s):
        assert close(s.logp, p.logp) and p.logp.abs().sum() > 0
        assert close(s.entropy, p.entropy) and close(s.hidden, p.hidden)
    for name in grads_p:
        assert close(grads_s[name], grads_p[name]), name


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "qwen2-eager", "llama", "qwen3"])
def test_shared_prompt_equals_plain_forward(arch, checkpointing):
    lm = new_model(arch).train()
    assert can_share_prompts(lm)
    if checkpointing:
        lm.activation_checkpointing_enable()
    plain_positions, plain = positions_through_first_layer(lm, lambda: run(lm, shared=False))
    shared_positions, shared = positions_through_first_layer(lm, lambda: run(lm, shared=True))
    assert_same(plain, shared)
    # the prompt really ran once per distinct prompt of each micro-batch: (prompts, rows, response columns)
    start = max(PROMPT_LENGTHS)
    widths = [start + max(RESPONSE_LENGTHS[i] for i in rows) for rows in MICRO_BATCHES]
    assert plain_positions == sum(len(rows) * width for rows, width in zip(MICRO_BATCHES, widths))
    assert shared_positions == (1 * start + 3 * 6) + (3 * start + 6 * 5)
    if not checkpointing:  # the old pass: no gradients, eval mode
        lm.eval()
        with torch.no_grad():
            plain, shared = run(lm, shared=False), run(lm, shared=True)
        assert not plain[1] and not shared[1]
        assert_same(plain, shared)


def test_reentrant_checkpointing_falls_back_to_the_plain_forward():
    """Reentrant checkpointing runs layers without autograd, so the prompt's keys would carry no
    gradient: the forward notices, warns, and runs the plain forward (same results)."""
    lm = new_model("qwen2").train()
    lm.activation_checkpointing_enable({"use_reentrant": True})
    plain = run(lm, shared=False)
    with pytest.warns(UserWarning, match="plain forward"):
        shared = run(lm, shared=True)
    assert_same(plain, shared)


def test_rows_of_a_group_must_share_their_prompt():
    lm = new_model("qwen2")
    ids, att, resp, start = rollouts()
    with pytest.raises(ValueError, match="equal prompt columns"):
        sequence_logprobs(lm, ids[3:5], att[3:5], resp[3:5], start=start, groups=torch.tensor([0, 0]))


def test_sliding_window_models_are_not_shared():
    sliding = Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert "sliding_attention" in sliding.layer_types
    assert not can_share_prompts(Qwen2ForCausalLM(sliding))
