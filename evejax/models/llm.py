"""Decoder-only language models: LLaMA/Vicuna and InternLM2 on the shared core.

CausalLM: tokens [B, T] (or inputs_embeds [B, T, D]) -> logits [B, T, V] float32,
plus, with `return_hidden=True`, all hidden states [L + 1, B, T, D] in the HF
convention (0 = embeddings, k = output of layer k, L = after the final norm).

Parameters (Flax paths, stacked layers on axis 0):
  embed_tokens/embedding [V, D]; decoder/layers/{attention_norm,mlp_norm}/scale [L, D];
  decoder/layers/attention/{query,key,value}/kernel [L, D, N|K, H];
  decoder/layers/attention/out/kernel [L, N, H, D];
  decoder/layers/mlp/{wi_gate,wi_up}/kernel [L, D, F]; decoder/layers/mlp/wo/kernel [L, F, D];
  final_norm/scale [D]; lm_head/kernel [D, V].
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from evejax.nn.layers import Dense, RMSNorm, constrain, default_kernel_init, param_with_axes
from evejax.nn.transformer import TransformerConfig, TransformerStack


@dataclasses.dataclass(frozen=True)
class LMConfig:
    family: str  # "llama" or "internlm2": decides the port table
    vocab_size: int
    transformer: TransformerConfig
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0

    def replace(self, **kw) -> "LMConfig":
        t_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        t_kw = {k: v for k, v in kw.items() if k in t_fields}
        own = {k: v for k, v in kw.items() if k not in t_fields}
        unknown = set(own) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"LM config has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, transformer=self.transformer.replace(**t_kw), **own)


def _llama(vocab, d, layers, heads, kv_heads, mlp, max_pos=4096, **kw) -> LMConfig:
    t = TransformerConfig(num_layers=layers, embed_dim=d, num_heads=heads, num_kv_heads=kv_heads,
                          head_dim=d // heads, mlp_dim=mlp, norm_eps=1e-5, rope_base=10000.0,
                          max_position_embeddings=max_pos, **kw)
    return LMConfig("llama", vocab, t, bos_id=1, eos_id=2, pad_id=0)


def _internlm2(vocab, d, layers, heads, kv_heads, mlp, max_pos=32768, **kw) -> LMConfig:
    t = TransformerConfig(num_layers=layers, embed_dim=d, num_heads=heads, num_kv_heads=kv_heads,
                          head_dim=d // heads, mlp_dim=mlp, norm_eps=1e-5, rope_base=1e6,
                          rope_scaling=(("type", "dynamic"), ("factor", 2.0)),
                          max_position_embeddings=max_pos, **kw)
    return LMConfig("internlm2", vocab, t, bos_id=1, eos_id=2, pad_id=2)


SIZES = {
    # Vicuna-7B v1.5 (reference/eve.md §1.1).
    "vicuna_7b": lambda: _llama(32000, 4096, 32, 32, 32, 11008),
    # The ~110M LLaMA of `evejax bench lm`.
    "llama_110m": lambda: _llama(32000, 768, 12, 12, 12, 2048),
    "llama_tiny": lambda: _llama(256, 64, 2, 4, 2, 128, max_pos=512),
    # InternLM2-chat-1.8B as HoVLE uses it (reference/hovle.md §1.3).
    "internlm2_1_8b": lambda: _internlm2(92553, 2048, 24, 16, 8, 8192),
    "internlm2_tiny": lambda: _internlm2(256, 64, 2, 4, 2, 128, max_pos=64),
}


def get_config(size: str, **overrides) -> LMConfig:
    if size not in SIZES:
        raise ValueError(f"LM size {size!r} is not known; use one of {sorted(SIZES)}")
    return SIZES[size]().replace(**overrides) if overrides else SIZES[size]()


def segment_positions(segment_ids):
    """Positions that restart at 0 in every segment: [B, T] -> [B, T] int32."""
    idx = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)


class CausalLM(nn.Module):
    cfg: LMConfig

    def setup(self):
        t = self.cfg.transformer
        dtype, pdtype = jnp.dtype(t.dtype), jnp.dtype(t.param_dtype)
        self.embed_tokens = nn.Embed(
            self.cfg.vocab_size, t.embed_dim, dtype=dtype, param_dtype=pdtype,
            embedding_init=param_with_axes(default_kernel_init, ("vocab", "embed")))
        self.decoder = TransformerStack(t)
        self.final_norm = RMSNorm(eps=t.norm_eps, dtype=dtype, param_dtype=pdtype)
        self.lm_head = Dense((self.cfg.vocab_size,), ("embed",), ("vocab",), dtype=dtype, param_dtype=pdtype,
                             flatten=t.matmul_2d)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def __call__(self, tokens=None, *, inputs_embeds=None, positions=None, segment_ids=None,
                 prefix=None, decode: bool = False, deterministic: bool = True,
                 return_hidden: bool = False, drop_path_rate=None):
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        x = x.astype(jnp.dtype(self.cfg.transformer.dtype))
        b, t = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = segment_positions(segment_ids)
        x = constrain(x, ("batch", "length", "act_embed"))
        h, layer_out = self.decoder(x, positions, segment_ids, prefix, decode=decode,
                                    deterministic=deterministic, return_hidden=return_hidden,
                                    drop_path_rate=drop_path_rate)
        h = self.final_norm(h)
        logits = constrain(self.lm_head(h), ("batch", "length", "act_vocab")).astype(jnp.float32)
        if not return_hidden:
            return logits
        hidden = jnp.concatenate([x[None], layer_out[:-1], h[None]], axis=0)
        return logits, hidden


def training_flops_per_step(cfg: LMConfig, batch: int, seq_len: int) -> float:
    """MaxText's model FLOPs of one forward+backward step.

    6 x matmul parameters x tokens (the embedding lookup is not a matmul) plus
    attention scores and values, 12 x B x T^2 x N x H x L, halved for causal masks.
    Rematerialisation is not counted.
    """
    t = cfg.transformer
    d, hq, hk, hd, f, layers = t.embed_dim, t.num_heads, t.num_kv_heads, t.head_dim, t.mlp_dim, t.num_layers
    per_layer = d * hd * (hq + 2 * hk) + hq * hd * d + d * f * (3 if t.mlp_gated else 2)
    matmul_params = layers * per_layer + d * cfg.vocab_size
    tokens = batch * seq_len
    attention = 12 * batch * seq_len * seq_len * hq * hd * layers
    if t.causal:
        attention /= 2
    return 6.0 * matmul_params * tokens + attention
