"""Rotary position embeddings.

Two layouts of the rotated pairs:
- `rotate_half`: pairs (i, i + d/2), as HF LLaMA and InternLM2 store q/k;
- `interleaved`: pairs (2i, 2i + 1), as xPos/RetNet and the original Meta LLaMA.
Scaling: `linear` divides positions by `factor`; `dynamic` is InternLM2's dynamic
NTK, which raises the base once the sequence exceeds `max_position_embeddings`.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def inverse_frequencies(head_dim: int, base: float, seq_len: int = 0,
                        scaling: Optional[dict] = None, max_position_embeddings: int = 0):
    kind = (scaling or {}).get("type")
    if kind == "dynamic" and seq_len > max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    elif kind not in (None, "dynamic", "linear"):
        raise ValueError(f"rope scaling {kind!r} is not known; use 'linear' or 'dynamic'")
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x, positions, *, base: float = 10000.0, layout: str = "rotate_half",
               scaling: Optional[dict] = None, max_position_embeddings: int = 0, seq_len: int = 0):
    """x: [B, T, N, H]; positions: [B, T] (int). Returns x rotated, same dtype."""
    head_dim = x.shape[-1]
    inv = inverse_frequencies(head_dim, base, seq_len, scaling, max_position_embeddings)
    pos = positions.astype(jnp.float32)
    if (scaling or {}).get("type") == "linear":
        pos = pos / scaling["factor"]
    angles = pos[..., None] * inv  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
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
