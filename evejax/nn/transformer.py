"""The one transformer core: a pre-norm layer and a scanned, rematerialised stack.

LLaMA/Vicuna, InternLM2, HoVLE's embedding module, the CLIP teacher and the
De-focus ViT (`defocus`: learned decay and rotation in causal attention) are all
this stack with different `TransformerConfig` options.

Layer: x [B, T, D] -> x + drop_path(attn(norm(x))) -> h + drop_path(mlp(norm(h))).
With `layer_scale_init` set (InternViT, CaiT-style layer scale) each branch is
multiplied by a learned per-channel vector before the residual add:
params `attention_layer_scale` / `mlp_layer_scale` [D], initialised to that value.
Stack: `num_layers` layers under `nn.scan` (parameters stacked on a leading
`layers` axis) and `nn.remat` with a named policy.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from evejax.nn.attention import Attention
from evejax.nn.layers import MLP, DropPath, constrain, make_norm, param_with_axes


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_act: str = "silu"
    mlp_gated: bool = True
    mlp_bias: bool = False
    norm: str = "rms"
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    out_bias: bool = False
    causal: bool = True
    rope_base: Optional[float] = 10000.0
    rope_layout: str = "rotate_half"
    rope_scaling: Optional[tuple] = None
    max_position_embeddings: int = 4096
    drop_path: float = 0.0
    layer_scale_init: Optional[float] = None  # None: no layer scale
    attention_impl: str = "xla"  # "xla" | "dot" | "cudnn" | "splash" (TPU kernel; nn/splash.py)
    # Splash tiles (multiples of 128; MaxText's default 512 compiles on v4, v5e, v5p and v6e).
    splash_block_q: int = 512
    splash_block_kv: int = 512
    # XLA attention: causal scores in this many query blocks, masked key blocks skipped (nn/attention.py).
    xla_causal_blocks: int = 1
    # De-focus attention (nn/attention.py): None (off), "scale" (Eq. 8 as printed) or "bias".
    defocus: Optional[str] = None
    defocus_decay_init: tuple = (5.0, 1.0)
    defocus_position_scale: float = 1.0
    remat: str = "full"
    scan_unroll: int = 1
    matmul_2d: bool = False  # Dense.flatten for every projection: faster on CPU, not needed on TPU
    dtype: str = "float32"
    param_dtype: str = "float32"

    def replace(self, **kw) -> "TransformerConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"TransformerConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **kw)

    def __post_init__(self):
        # A config read back from JSON (model.json, a checkpoint's config) has lists where these
        # hashable tuples were: jit's static arguments must hash and equal configs compare equal.
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(tuple(pair) for pair in self.rope_scaling))
        object.__setattr__(self, "defocus_decay_init", tuple(self.defocus_decay_init))

    def validate(self) -> "TransformerConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_base is not None and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not known; use one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r} is not known; use one of {sorted(REMAT_POLICIES)}")
        if self.defocus is not None and (self.defocus not in ("scale", "bias") or not self.causal
                                         or self.rope_base is None):
            raise ValueError(f"defocus={self.defocus!r} needs 'scale' or 'bias', causal=True and a rope_base "
                             "(its rotation starts at the RoPE frequencies)")
        if self.defocus is not None and self.attention_impl == "splash":
            raise ValueError("defocus attention needs attention_impl 'xla' (the splash kernel has no decay term)")
        return self


ATTENTION_IMPLS = ("xla", "dot", "cudnn", "splash")

_SAVED_NAMES = ("query_proj", "key_proj", "value_proj", "context", "mlp_hidden")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "minimal": jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES),
}


class DecoderLayer(nn.Module):
    """One pre-norm layer; called by nn.scan as (carry, *broadcast) -> (carry, out)."""
    cfg: TransformerConfig
    decode: bool = False
    deterministic: bool = True
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix, drop_path_rate):
        cfg = self.cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        h = make_norm(cfg.norm, cfg.norm_eps, dtype, pdtype, "attention_norm")(x)
        h = Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            causal=cfg.causal, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
            rope_base=cfg.rope_base, rope_layout=cfg.rope_layout, rope_scaling=cfg.rope_scaling,
            max_position_embeddings=cfg.max_position_embeddings, impl=cfg.attention_impl,
            defocus=cfg.defocus, defocus_decay_init=cfg.defocus_decay_init,
            defocus_position_scale=cfg.defocus_position_scale,
            splash_block_q=cfg.splash_block_q, splash_block_kv=cfg.splash_block_kv,
            xla_causal_blocks=cfg.xla_causal_blocks, dtype=dtype, param_dtype=pdtype, flatten=cfg.matmul_2d, name="attention",
        )(h, positions, segment_ids, prefix, decode=self.decode)
        h = checkpoint_name(h, "context")
        h = self._layer_scale(h, "attention_layer_scale")
        drop = DropPath()
        x = x + drop(h, drop_path_rate, deterministic=self.deterministic)
        h = make_norm(cfg.norm, cfg.norm_eps, dtype, pdtype, "mlp_norm")(x)
        h = MLP(cfg.mlp_dim, act=cfg.mlp_act, gated=cfg.mlp_gated, use_bias=cfg.mlp_bias,
                dtype=dtype, param_dtype=pdtype, flatten=cfg.matmul_2d, name="mlp")(h)
        h = self._layer_scale(h, "mlp_layer_scale")
        x = x + drop(h, drop_path_rate, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "act_embed"))
        return x, (x if self.return_hidden else None)

    def _layer_scale(self, h, name: str):
        if self.cfg.layer_scale_init is None:
            return h
        scale = self.param(name, param_with_axes(nn.initializers.constant(self.cfg.layer_scale_init), ("norm",)),
                           (h.shape[-1],), jnp.dtype(self.cfg.param_dtype))
        return h * scale.astype(h.dtype)


class TransformerStack(nn.Module):
    """x [B, T, D] -> (x [B, T, D], per-layer outputs [L, B, T, D] or None).

    `drop_path_rate` is a runtime scalar or per-layer [L] array, so a schedule
    over training steps needs no recompilation.
    """
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix=None, *, decode: bool = False,
                 deterministic: bool = True, return_hidden: bool = False, drop_path_rate=None):
        cfg = self.cfg.validate()
        layer = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=False)
        rate = cfg.drop_path if drop_path_rate is None else drop_path_rate
        rates = jnp.broadcast_to(jnp.asarray(rate, jnp.float32), (cfg.num_layers,))
        scanned = nn.scan(
            layer,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_layers,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(cfg, decode=decode, deterministic=deterministic, return_hidden=return_hidden,
                       name="layers")(x, positions, segment_ids, prefix, rates)
