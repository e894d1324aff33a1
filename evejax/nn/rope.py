"""Rotary position embeddings.

Two layouts of the rotated pairs:
- `rotate_half`: pairs (i, i + d/2), as HF LLaMA and InternLM2 store q/k;
- `interleaved`: pairs (2i, 2i + 1), as xPos/RetNet and the original Meta LLaMA.
Scaling: `linear` divides positions by `factor`; `dynamic` is dynamic NTK (HF LLaMA,
InternLM2), which raises the base once `seq_len`, the length seen so far, exceeds
`max_position_embeddings`. `seq_len` may be a traced scalar, so one compiled decode
step serves every length.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def inverse_frequencies(head_dim: int, base: float, seq_len=0,
                        scaling: Optional[dict] = None, max_position_embeddings: int = 0):
    """[head_dim / 2] float32; `seq_len` (int or int scalar array) matters only to `dynamic`."""
    kind = (scaling or {}).get("type")
    if kind not in (None, "dynamic", "linear"):
        raise ValueError(f"rope scaling {kind!r} is not known; use 'linear' or 'dynamic'")
    if kind == "dynamic":
        factor = scaling["factor"]
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_position_embeddings)
        grown = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        # Up to max_position_embeddings the plain base, exactly, whatever the factor's rounding.
        base = jnp.where(length > max_position_embeddings, grown, base)
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, *, base: float = 10000.0, layout: str = "rotate_half",
               scaling: Optional[dict] = None, max_position_embeddings: int = 0, seq_len=0):
    """x: [B, T, N, H]; positions: [B, T] (int); seq_len: int scalar. Returns x rotated, same dtype."""
    head_dim = x.shape[-1]
    inv = inverse_frequencies(head_dim, base, seq_len, scaling, max_position_embeddings)
    pos = positions.astype(jnp.float32)
    if (scaling or {}).get("type") == "linear":
        pos = pos / scaling["factor"]
    return rotate_pairs(x, (pos[..., None] * inv)[:, :, None, :], layout)


def rotate_pairs(x, angles, layout: str = "rotate_half"):
    """x [B, T, N, H] rotated pair by pair by angles [B, T, N or 1, H/2] (float32); same dtype."""
    sin = jnp.sin(angles)
    cos = jnp.cos(angles)
    xf = x.astype(jnp.float32)
    if layout == "rotate_half":
        x1, x2 = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
    else:
        raise ValueError(f"rope layout {layout!r} is not known; use 'rotate_half' or 'interleaved'")
    return out.astype(x.dtype)
