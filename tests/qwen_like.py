"""A stand-in for a real checkpoint, built here with nothing downloaded: a randomly initialised
Qwen2-shaped model with Qwen's real vocabulary size (151,936, where memory is the point) and a
byte-level Qwen2Tokenizer (256 byte symbols, no merges, Qwen's special tokens at their real ids,
a chat template), saved together with save_pretrained. AutoTokenizer reads the folder back as
Qwen2Tokenizer (it picks the class from the model type), exactly as for a real Qwen checkpoint;
like Qwen instruct models, the generation config lists two end-of-sequence ids.
"""
import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

VOCAB = 151_936
SPECIALS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_symbols():
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others for characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def qwen_tokenizer():
    vocab = {s: b for b, s in enumerate(byte_symbols())} | SPECIALS
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_qwen_like(path, hidden=64, layers=2, heads=4, kv_heads=2, seed=0):
    """Save the model and tokenizer into `path`; returns the model."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=SPECIALS["<|im_end|>"],
                         pad_token_id=SPECIALS["<|endoftext|>"])
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[SPECIALS["<|im_end|>"], SPECIALS["<|endoftext|>"]],
                                               pad_token_id=SPECIALS["<|endoftext|>"])
    model.save_pretrained(path)
    qwen_tokenizer().save_pretrained(path)
    return model
