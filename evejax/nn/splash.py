"""Splash attention (the Pallas TPU kernel shipped with jax) behind `Attention(impl="splash")`.

q [B, T, N, H], k/v [B, T, K, H] with N % K == 0, segment_ids [B, T] -> [B, T, N, H].

The kernel takes a static mask per head (`CausalMask`, `FullMask`) and-ed with
segment ids, so of the masks evejax expresses as data it covers causal,
bidirectional, packing and padding (segment 0): a real token never sees a
padding key, as in `make_mask`. Padding queries see earlier padding keys
instead of nothing, which changes only outputs at padding positions, which
no loss reads. A prefix-LM mask is per-row data the static mask cannot hold:
it is refused by name (use attention_impl "xla"). Decoding with a KV cache
stays on the XLA path (queries and cache differ in length).

Under a mesh the kernel runs per shard through `shard_map`: batch over the
axes of the logical `batch` rule, heads over those of `act_heads` (keys and
values are repeated up to the query heads when their head count does not
divide the same way). T is padded to a multiple of the block with segment 0
and cut back afterwards. Off TPU the kernel runs in Pallas interpret mode:
exact but slow, for tests; CPU configs use "xla".
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

LANES = 128  # TPU lane width: the kernel's blocks are multiples of it


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size(block: int, length: int) -> int:
    """The configured block, or the whole (lane-padded) sequence when that is shorter."""
    if block <= 0 or block % LANES:
        raise ValueError(f"splash block size {block} must be a positive multiple of {LANES}; "
                         "set splash_block_q / splash_block_kv in the model overrides")
    return min(block, _round_up(length, LANES))


def _kernel(heads: int, length: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
    mask_type = splash.CausalMask if causal else splash.FullMask
    mask = splash.MultiHeadMask([mask_type((length, length)) for _ in range(heads)])
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _local(q, k, v, segment_ids, *, causal, scale, block_q, block_kv):
    """One shard: q [b, T, n, H], k/v [b, T, k, H], segment_ids [b, T] -> [b, T, n, H]."""
    t, n = q.shape[1], q.shape[2]
    bq, bkv = block_size(block_q, t), block_size(block_kv, t)
    length = _round_up(t, max(bq, bkv))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    # The kernel wants [heads, T, H] per example; it does not scale the logits.
    heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)  # noqa: E731
    seg = pad(segment_ids.astype(jnp.int32))
    args = (heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v),
            splash.SegmentIds(q=seg, kv=seg))
    # The platform compiled for (not the host's: `evejax plan` lowers for TPU
    # on a CPU host) picks Mosaic or the interpreter.
    run = lambda interpret: jax.vmap(_kernel(n, length, causal, bq, bkv, interpret))  # noqa: E731
    out = jax.lax.platform_dependent(*args, tpu=run(False), default=run(True))
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)


def splash_attention(q, k, v, segment_ids, *, causal: bool, scale: float, block_q: int = 512,
                     block_kv: int = 512, prefix=None):
    """See the module docstring; shapes as there."""
    from evejax import sharding

    if prefix is not None:
        raise ValueError("attention_impl 'splash' takes causal, bidirectional and segment (packing, "
                         "padding) masks; a prefix-LM mask (prefix=...) is per-row data its static "
                         "mask cannot hold: use attention_impl 'xla' for this model")
    n, kv_heads = q.shape[2], k.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_local, causal=causal, scale=scale, block_q=block_q, block_kv=block_kv)
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
    q_spec = sharding.logical_to_spec(("batch", "length", "act_heads", None), q.shape, mesh, rules)
    kv_spec = sharding.logical_to_spec(("batch", "length", "act_kv_heads", None), k.shape, mesh, rules)
    if kv_spec[2] != q_spec[2]:
        # Each shard must hold the key/value heads of its query heads.
        k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
        kv_spec = q_spec
    seg_spec = P(q_spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
