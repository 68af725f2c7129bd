"""One decode step of a Llama or Qwen2 decoder, written out: the model's forward for one token
per row, in a third of its CUDA kernels (a decode step is a chain of small kernels whose count,
not the weights it reads, sets its time on a GPU).

    qkv = stacked_qkv(model)              # once; stacked_qkv(model, into=qkv) after weights change
    logits(model, qkv, cache, token, mask, positions)   # [rows, vocab]; writes the step's keys/values

sample.py calls it inside its fixed-shape step (and so inside CUDA graphs); it reads the
model's modules (embeddings, norms, projections, rotary embedding, LM head) and the cache's
fixed buffers (`cache.layers[i].keys/values`, `cache.slot`, `cache.window`). Other model types
decode through their own forward. Imports: torch. Nothing of ours.
"""
import torch
import torch.nn.functional as F

MODEL_TYPES = ("llama", "qwen2")


def fits(model):
    """Whether logits() computes this model: a Llama or Qwen2 decoder (SiLU MLPs, a rotary
    embedding that depends on the position only)."""
    config = model.config
    return (config.model_type in MODEL_TYPES and config.hidden_act == "silu"
            and model.model.rotary_emb.rope_type in ("default", "linear", "llama3"))


def stacked_qkv(model, into=None):
    """Each layer's q, k and v projections as one [(heads + 2 kv_heads) x dim, hidden] weight
    (and bias): one matmul instead of three. into: the tensors of an earlier call, refilled in
    place (the weights may have changed; CUDA graphs read these addresses)."""
    stacked = []
    for k, layer in enumerate(model.model.layers):
        parts = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        pairs = [([p.weight for p in parts], 0)] + ([([p.bias for p in parts], 1)] if parts[0].bias is not None else [])
        done = [torch.cat(tensors, out=into[k][i]) if into else torch.cat(tensors) for tensors, i in pairs]
        stacked.append((done[0], done[1] if len(done) > 1 else None))
    return stacked


def _rms_norm(x, norm):
    return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)


def _plus_linear(x, y, linear):
    """x + linear(y); without a bias the residual add happens inside the matmul (one kernel)."""
    return torch.addmm(x, y, linear.weight.t()) if linear.bias is None else x + linear(y)


def logits(model, qkv, cache, token, mask, positions):
    """The model's forward for one token per row: logits [rows, vocab]; the row's keys/values go
    to cache column `cache.slot`, attention reads the first `cache.window` columns. Fewer kernels
    than the model's own: fused RMSNorm, q/k/v as one matmul (`qkv`), RoPE on queries and keys at
    once in three ops, the residual added inside the output matmuls, and each key/value head's
    query heads attending as that head's queries (grouped-query attention without copies)."""
    inner, config = model.model, model.config
    rows, heads, kv_heads = token.shape[0], config.num_attention_heads, config.num_key_value_heads
    x = inner.embed_tokens(token)                               # [rows, hidden]
    cos, sin = inner.rotary_emb(x, positions)                   # [rows, 1, dim]
    dim = cos.shape[-1]
    sin = torch.cat([-sin[..., :dim // 2], sin[..., dim // 2:]], -1)  # rotate_half(x) * sin == x.roll(dim/2) * this
    for layer, (weight, bias), kv in zip(inner.layers, qkv, cache.layers):
        attention = layer.self_attn
        q_k_v = F.linear(_rms_norm(x, layer.input_layernorm), weight, bias).view(rows, heads + 2 * kv_heads, dim)
        qk = q_k_v[:, :heads + kv_heads]
        qk = torch.addcmul(qk * cos, qk.roll(dim // 2, -1), sin)
        keys, values = kv.keys[:rows], kv.values[:rows]
        keys.index_copy_(2, cache.slot, qk[:, heads:, None])
        values.index_copy_(2, cache.slot, q_k_v[:, heads + kv_heads:, None])
        queries = qk[:, :heads].view(rows, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(queries, keys[:, :, :cache.window], values[:, :, :cache.window],
                                             attn_mask=mask, scale=attention.scaling)
        x = _plus_linear(x, out.reshape(rows, heads * dim), attention.o_proj)
        h, mlp = _rms_norm(x, layer.post_attention_layernorm), layer.mlp
        x = _plus_linear(x, F.silu(mlp.gate_proj(h)) * mlp.up_proj(h), mlp.down_proj)
    return model.lm_head(_rms_norm(x, inner.norm))
