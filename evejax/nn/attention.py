"""Multi-head / grouped-query attention with masks given as data and a KV cache.

Masks are built from per-token data, never from the model type:
- `segment_ids` [B, T] int: 0 is padding, tokens attend only within their
  segment (packing puts several samples in one row);
- `causal` (static): key index <= query index;
- `prefix` [B, T] bool: tokens marked True see each other bidirectionally
  (prefix-LM), on top of the causal rule.
`impl` chooses the kernel: "xla" (einsum, softmax in float32), "cudnn"/"dot"
(`jax.nn.dot_product_attention`, which routes to XLA on CPU/TPU) or "splash"
(the Pallas TPU kernel, evejax/nn/splash.py; decoding with the cache uses "xla").

De-focus attention (De-focus Attention Networks, arXiv 2406.04342, Eq. 8), `defocus` set, causal only:
  y_t = sum_{s<=t} Softmax_s(q_t^T e^{lambda (t-s)} e^{i theta (t-s)} k_s / sqrt(H)) v_s
The rotation is RoPE with learned frequencies `defocus_freq` [K, H/2] (theta, one set per key head),
applied to q and k; lambda = -exp(`defocus_decay` [N]), one decay per head, enters the logits as
`defocus="scale"`: logit * e^{lambda (t-s)} (Eq. 8 as printed: a multiplier on q^T k, as a decay
applied to q and k "following the common implementation of RoPE" gives) or `defocus="bias"`:
logit + lambda (t-s) (ALiBi-like: the attention weights themselves decay by e^{lambda (t-s)}, the
kernel of the paper's bandpass argument, Eq. 6-7). The paper gives neither the form it ran nor
any initial value, and no De-focus ViT code is released (reference/dan.md §1, §10), so:
- default "scale": the equation as printed;
- theta starts at the RoPE frequencies `rope_base`^(-2i/H) (a learnable RoPE starts as RoPE);
- lambda_h starts at ln(1 - 2^-(a + b h)) for head h, (a, b) = `defocus_decay_init`, default
  (5, 1): RetNet's per-head decays, which De-focus RetNet makes learnable;
- positions (for theta and the decay alike) are divided by `defocus_position_scale`, the
  resolution knob the official Mamba calls rope_scale_factor.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from evejax.nn.layers import Dense, constrain, param_with_axes
from evejax.nn.rope import apply_rope, inverse_frequencies, rotate_pairs
from evejax.nn.splash import splash_attention


def make_mask(q_segment, kv_segment, q_index, kv_index, causal: bool,
              q_prefix=None, kv_prefix=None):
    """Boolean mask [B, 1, T, S]; True where query t may attend key s."""
    same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
    if causal:
        allowed = kv_index[:, None, :] <= q_index[:, :, None]
        if q_prefix is not None:
            allowed = allowed | (q_prefix[:, :, None] & kv_prefix[:, None, :])
        same = same & allowed
    return same[:, None]


def _decayed(logits, decay, form: str):
    return logits * jnp.exp(decay) if form == "scale" else logits + decay


def attend(q, k, v, mask, *, scale: float, impl: str = "xla", decay=None, decay_form: str = "scale",
           causal_blocks: int = 1):
    """q [B, T, N, H], k/v [B, S, K, H] with N % K == 0, mask [B, 1, T, S] -> [B, T, N, H].

    decay [B, N, T, S] float32 (de-focus, xla only): lambda (t - s), applied as `decay_form`.
    causal_blocks c > 1 (xla; the caller vouches that the mask is causal over the same positions,
    T == S, T % c == 0): query block i of T / c rows attends keys [0, (i + 1) T / c) only, so the
    key blocks the causal rule masks entirely are not computed ((c + 1) / 2c of the scores). Rows
    with a key allowed get the same softmax; a row with none (padding) averages fewer values.
    """
    if causal_blocks > 1 and impl == "xla":
        rows = q.shape[1] // causal_blocks
        return jnp.concatenate([
            attend(q[:, i * rows:(i + 1) * rows], k[:, :(i + 1) * rows], v[:, :(i + 1) * rows],
                   mask[:, :, i * rows:(i + 1) * rows, :(i + 1) * rows], scale=scale,
                   decay=None if decay is None else decay[:, :, i * rows:(i + 1) * rows, :(i + 1) * rows],
                   decay_form=decay_form)
            for i in range(causal_blocks)], axis=1)
    if decay is not None and impl != "xla":
        raise ValueError(f"de-focus attention runs with attention impl 'xla', not {impl!r}")
    if impl in ("dot", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation="cudnn" if impl == "cudnn" else None)
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r} is not known; use 'xla', 'dot', 'cudnn' or 'splash'")
    b, t, n, h = q.shape
    kv = k.shape[2]
    if kv == n:
        # Plain multi-head attention keeps 4-D [B, N, T, S] logits: XLA:CPU runs
        # the softmax and its gradient on them much faster than on the grouped
        # 5-D form with a unit group axis (about 40% less attention time).
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
        if decay is not None:
            logits = _decayed(logits, decay, decay_form)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if decay is not None:
        logits = _decayed(logits, decay.reshape(logits.shape), decay_form)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    """x [B, T, D] -> [B, T, D].

    Params: query [D, N, H], key/value [D, K, H], out [N, H, D] (+ biases).
    With `decode=True` keys and values are written into the `cache` collection
    (sized by the input at init) and queries attend to everything cached so far.
    With the `intermediates` collection mutable it also sows the attention weights
    [B, N, T, S] as `attention_weights` (evejax viz).
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    rope_base: Optional[float] = 10000.0
    rope_layout: str = "rotate_half"
    rope_scaling: Optional[tuple] = None  # (("type", "dynamic"), ("factor", 2.0)): hashable
    max_position_embeddings: int = 0
    impl: str = "xla"
    defocus: Optional[str] = None  # None, "scale" or "bias" (module docstring)
    defocus_decay_init: tuple = (5.0, 1.0)
    defocus_position_scale: float = 1.0
    splash_block_q: int = 512
    splash_block_kv: int = 512
    xla_causal_blocks: int = 1  # `attend`'s causal_blocks, when causal with no prefix and T divides
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    flatten: bool = False  # Dense.flatten

    @nn.compact
    def __call__(self, x, positions, segment_ids, prefix=None, decode: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, flatten=self.flatten)
        q = Dense((self.num_heads, self.head_dim), ("embed",), ("heads", "head_dim"),
                  use_bias=self.qkv_bias, name="query", **kw)(x)
        k = Dense((self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "head_dim"),
                  use_bias=self.qkv_bias, name="key", **kw)(x)
        v = Dense((self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "head_dim"),
                  use_bias=self.qkv_bias, name="value", **kw)(x)
        q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None)), "query_proj")
        k = checkpoint_name(constrain(k, ("batch", "length", "act_kv_heads", None)), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", "length", "act_kv_heads", None)), "value_proj")

        b, t = x.shape[:2]
        if self.defocus is not None:
            q, k = self._defocus_rotation(q, k, positions)
        elif self.rope_base is not None:
            # Dynamic NTK sees the length so far, max(positions) + 1 over the whole
            # batch, as transformers does: not this chunk's length, so one-token
            # decode steps scale like the prompt they extend. Cached keys keep
            # the scaling of the step that wrote them, as in HF's cache.
            rope = dict(base=self.rope_base, layout=self.rope_layout,
                        scaling=dict(self.rope_scaling) if self.rope_scaling else None,
                        max_position_embeddings=self.max_position_embeddings,
                        seq_len=jnp.max(positions) + 1)
            q = apply_rope(q, positions, **rope)
            k = apply_rope(k, positions, **rope)
        q_index = jnp.broadcast_to(jnp.arange(t), (b, t))
        kv_index, kv_segment, kv_prefix = q_index, segment_ids, prefix
        if decode:
            k, v, kv_segment, kv_prefix, q_index, kv_index = self._update_cache(k, v, segment_ids, prefix)

        if self.impl == "splash" and not decode:
            out = splash_attention(q, k, v, segment_ids, causal=self.causal, scale=self.head_dim ** -0.5,
                                   block_q=self.splash_block_q, block_kv=self.splash_block_kv,
                                   prefix=prefix)
        else:
            mask = make_mask(segment_ids, kv_segment, q_index, kv_index, self.causal,
                             prefix, kv_prefix)
            decay = None if self.defocus is None else self._defocus_decay(q_index, kv_index)
            blocks = self.xla_causal_blocks
            out = attend(q, k, v, mask, scale=self.head_dim ** -0.5,
                         impl="xla" if self.impl == "splash" else self.impl, decay=decay,
                         decay_form=self.defocus or "scale",
                         causal_blocks=blocks if self.causal and prefix is None and not decode and t % blocks == 0
                         else 1)
            if self.is_mutable_collection("intermediates"):
                # The weights [B, N, T, S] for inspection (evejax viz; not on the splash path): the
                # einsum kernel on one-hot values.
                eye = jnp.broadcast_to(jnp.eye(k.shape[1], dtype=jnp.float32)[None, :, None], (*k.shape[:3], k.shape[1]))
                self.sow("intermediates", "attention_weights",
                         attend(q.astype(jnp.float32), k.astype(jnp.float32), eye, mask, scale=self.head_dim ** -0.5,
                                impl="xla", decay=decay, decay_form=self.defocus or "scale").transpose(0, 2, 1, 3))
        out = constrain(out, ("batch", "length", "act_heads", None))
        return Dense((x.shape[-1],), ("heads", "head_dim"), ("embed",), use_bias=self.out_bias,
                     name="out", **kw)(out)

    def _defocus_rotation(self, q, k, positions):
        """q, k rotated by the learned per-head frequencies: angle = positions / scale * theta."""
        base = inverse_frequencies(self.head_dim, self.rope_base)
        # One set per key head, shared by the query heads it serves, so q^T k stays relative.
        freq = self.param("defocus_freq", param_with_axes(
            lambda key, shape, dtype: jnp.broadcast_to(base, shape).astype(dtype), ("kv_heads", None)),
            (self.num_kv_heads, self.head_dim // 2), self.param_dtype)
        pos = positions.astype(jnp.float32)[:, :, None, None] / self.defocus_position_scale
        angle = pos * freq.astype(jnp.float32)                        # [B, T, K, H/2]
        group = self.num_heads // self.num_kv_heads
        return (rotate_pairs(q, jnp.repeat(angle, group, axis=2), self.rope_layout),
                rotate_pairs(k, angle, self.rope_layout))

    def _defocus_decay(self, q_index, kv_index):
        """lambda_n (t - s) / scale: [B, N, T, S] float32, lambda = -exp(defocus_decay); 0 at t <= s
        (those are masked anyway, and exp of a positive distance could overflow)."""
        a, slope = self.defocus_decay_init

        def init(key, shape, dtype):
            rate = -jnp.log1p(-(2.0 ** -(a + slope * jnp.arange(shape[0], dtype=jnp.float32))))
            return jnp.log(rate).astype(dtype)

        decay_hat = self.param("defocus_decay", param_with_axes(init, ("heads",)), (self.num_heads,),
                               self.param_dtype)
        dist = jnp.maximum(q_index[:, :, None] - kv_index[:, None, :], 0).astype(jnp.float32)
        return -jnp.exp(decay_hat.astype(jnp.float32))[None, :, None, None] * (
            dist[:, None] / self.defocus_position_scale)

    def _update_cache(self, k, v, segment_ids, prefix):
        # Keys are cached after RoPE, as HF does, so decoding matches it exactly.
        # Variable names differ from the submodules' ("key", "value"): linen
        # gives variables and submodules one namespace.
        b, t = k.shape[:2]
        is_init = not self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cseg = self.variable("cache", "cached_segment", jnp.zeros, segment_ids.shape, jnp.int32)
        cpre = self.variable("cache", "cached_prefix", jnp.zeros, segment_ids.shape, jnp.bool_)
        idx = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if is_init:
            index = jnp.broadcast_to(jnp.arange(t), (b, t))
            return k, v, segment_ids, prefix, index, index
        start = idx.value
        upd = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), start, axis=1)
        ck.value, cv.value = upd(ck.value, k), upd(cv.value, v)
        cseg.value = upd(cseg.value, segment_ids)
        if prefix is not None:
            cpre.value = upd(cpre.value, prefix)
        idx.value = start + t
        s = ck.value.shape[1]
        q_index = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        kv_index = jnp.broadcast_to(jnp.arange(s), (b, s))
        return (ck.value, cv.value, cseg.value, cpre.value if prefix is not None else None,
                q_index, kv_index)
