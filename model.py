"""Models and tokenizers: the built-in tiny model, its tokenizer, loading and saving any causal LM.

    from model import load_model, load_tokenizer
    tok = load_tokenizer("runs/sft/model")            # ours, or AutoTokenizer for anything else
    lm = load_model("runs/sft/model")                  # any transformers causal LM (path or hub name)
    lm, tok = new_tiny_model(seed=0), TinyTokenizer()  # a fresh tiny model to train from scratch

The tiny model is a stock transformers Qwen2 (so `AutoModelForCausalLM.from_pretrained` loads
it); the tokenizer is ours: one token per character, a few whole-word tokens, and numbers
written least-significant digit first inside the model (a known trick that makes carries
learnable for small transformers). Text in and text out are normal: only token order changes.
Imports: torch, transformers. Nothing of ours.
"""
import functools
import inspect
import json
import os
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()  # our own bars are enough; save_pretrained's is noise

TOKENIZER_FILE = "countdown_tokenizer.json"
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_WORDS = ["Numbers: ", "Target: ", "<Solution>", "</Solution>"]
_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
_DIGIT_RUN = re.compile(r"[0-9]+")


def _reverse_digit_runs(text):
    return _DIGIT_RUN.sub(lambda m: m[0][::-1], text)


class TinyTokenizer:
    """Character-level tokenizer with the subset of the transformers tokenizer interface the
    project uses (encode, decode, special ids, save_pretrained), so callers never care which."""

    chat_template = None

    def __init__(self, pieces=None, reverse_digits=True):
        self.pieces = list(pieces or _SPECIALS + _WORDS + _CHARS)
        self.reverse_digits = reverse_digits
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        words = sorted((p for p in self.pieces if len(p) > 1 and p not in _SPECIALS), key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, words)) + r"|.", re.S)
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    def __len__(self):
        return len(self.pieces)

    def encode(self, text, add_special_tokens=False):
        if self.reverse_digits:
            text = _reverse_digit_runs(text)
        ids = [self.ids.get(p, self.unk_token_id) for p in self._split.findall(text)]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=False):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i < len(_SPECIALS)))
        return _reverse_digit_runs(text) if self.reverse_digits else text

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, TOKENIZER_FILE), "w") as f:
            json.dump({"pieces": self.pieces, "reverse_digits": self.reverse_digits}, f)

    @classmethod
    def from_file(cls, path):
        with open(path) as f:
            spec = json.load(f)
        return cls(spec["pieces"], spec["reverse_digits"])


def cache_keyword(module):
    """The keyword a transformers model's (or decoder's) forward takes its KV cache by, and the
    field its output returns it in: "cache" from transformers 5.25 on (where "past_key_values"
    warns on every call that it is deprecated), "past_key_values" before."""
    return _cache_keyword(type(module))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls):
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def new_tiny_model(seed=0, vocab_size=None, layers=4, hidden=128, heads=4, max_positions=2048):
    """A freshly initialised small Qwen2 (~0.87M parameters at the defaults)."""
    config = Qwen2Config(
        vocab_size=vocab_size or len(TinyTokenizer()), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rope_theta=10_000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def is_local(path):
    """A model path is a local directory when it exists or is written like one (./, /, ~);
    anything else is a hub name such as Qwen/Qwen2.5-1.5B-Instruct."""
    return os.path.exists(path) or str(path).startswith((".", "/", "~"))


def check_model_path(path):
    """Raise a one-line ValueError when `path` is local but holds no model (before any loading)."""
    if is_local(path) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        raise ValueError(f"no model at {path} (expected a directory with config.json)")


def _one_line(what, path, error):
    """A loading error of transformers or the hub (offline, not found, gated) as one line."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ValueError(f"cannot load the {what} of {path}: {first}")


def load_tokenizer(path):
    """Our tokenizer if `path` holds one, else the transformers tokenizer of `path` (with a pad id)."""
    ours = os.path.join(os.path.expanduser(path), TOKENIZER_FILE)
    if os.path.isfile(ours):
        return TinyTokenizer.from_file(ours)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path) if is_local(path) else path)
    except (OSError, ValueError) as e:
        raise _one_line("tokenizer", path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, dtype=torch.float32, device="cpu"):
    """Any transformers causal LM, from a local directory or the hub (errors as one line)."""
    check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path) if is_local(path) else path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _one_line("model", path, e) from None
    return model.to(device)


def decoder_layers(model):
    """The repeated blocks of a transformers model (what FSDP shards one by one)."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def eos_token_ids(model, tokenizer):
    """Every id that ends a response: the tokenizer's EOS and the model's generation config
    (instruct models often list several, e.g. <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def save_model(model, tokenizer, path, state_dict=None):
    """A `save_pretrained` directory: safetensors weights, config, tokenizer. `state_dict`: the
    full weights when the module itself holds only a shard (FSDP)."""
    if state_dict is not None and model.config.get_text_config().tie_word_embeddings:
        head = next(name for name, m in model.named_modules() if m is model.get_output_embeddings())
        state_dict = {k: v for k, v in state_dict.items() if k != f"{head}.weight"}  # tied: the embeddings hold it
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def encode_prompt(tokenizer, text, chat=False):
    """Token ids of a prompt: through the tokenizer's chat template when `chat`, else BOS + text."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: use the bare prompt")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)


def token_end_offsets(tokenizer, tokens):
    """End offset (exclusive) in `tokenizer.decode(tokens, skip_special_tokens=True)` of each
    token's text: token k wrote the characters [ends[k-1], ends[k]). Per-token decodes are
    summed; when that does not add up (a byte-level tokenizer splitting a character), prefix
    decodes are used instead (exact, quadratic)."""
    ends, total = [], 0
    for t in tokens:
        total += len(tokenizer.decode([t], skip_special_tokens=True))
        ends.append(total)
    if total != len(tokenizer.decode(tokens, skip_special_tokens=True)):
        ends = [len(tokenizer.decode(tokens[:k + 1], skip_special_tokens=True)) for k in range(len(tokens))]
    return ends
