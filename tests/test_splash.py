"""Splash attention (Pallas interpret mode on CPU) against the XLA einsum path: outputs and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax import sharding
from evejax.nn.attention import Attention, attend, make_mask
from evejax.nn.splash import splash_attention

# Two packed samples then padding in row 0, one sample then padding in row 1, one full row 2.
SEGMENTS = np.array([[1] * 50 + [2] * 60 + [0] * 18,
                     [1] * 100 + [0] * 28,
                     [3] * 128], np.int32)


def _inputs(heads, kv_heads, dtype, t=128, head_dim=32):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    b = SEGMENTS.shape[0]
    q = jax.random.normal(keys[0], (b, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (b, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (b, t, kv_heads, head_dim), dtype)
    cotangent = jax.random.normal(keys[3], (b, t, heads, head_dim), jnp.float32)
    return q, k, v, jnp.asarray(SEGMENTS[:, :t]), cotangent


def _xla(q, k, v, seg, causal):
    index = jnp.broadcast_to(jnp.arange(q.shape[1]), seg.shape)
    return attend(q, k, v, make_mask(seg, seg, index, index, causal), scale=q.shape[-1] ** -0.5)


def _splash(q, k, v, seg, causal, block=128):
    return splash_attention(q, k, v, seg, causal=causal, scale=q.shape[-1] ** -0.5, block_q=block,
                            block_kv=block)


def _loss(fn, seg, cotangent, causal):
    # Only real tokens: padding queries are where the two paths may differ (module docstring).
    real = (seg != 0)[:, :, None, None]
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v, seg, causal).astype(jnp.float32) * cotangent, 0))


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("heads, kv_heads, causal, dtype, tol", [
    (4, 4, True, jnp.float32, 1e-5), (4, 2, True, jnp.float32, 1e-5), (4, 1, True, jnp.float32, 1e-5),
    (4, 2, False, jnp.float32, 1e-5), (4, 2, True, jnp.bfloat16, 2e-2)],
    ids=["mha-causal-f32", "gqa-causal-f32", "mqa-causal-f32", "gqa-bidirectional-f32", "gqa-causal-bf16"])
def test_splash_matches_xla_outputs_and_gradients(heads, kv_heads, causal, dtype, tol):
    q, k, v, seg, cot = _inputs(heads, kv_heads, dtype)
    real = np.asarray(seg != 0)
    out_x, out_s = _xla(q, k, v, seg, causal), _splash(q, k, v, seg, causal)
    assert out_s.shape == out_x.shape and out_s.dtype == out_x.dtype
    assert _rel(out_s[real], out_x[real]) <= tol
    grads_x = jax.grad(_loss(_xla, seg, cot, causal), argnums=(0, 1, 2))(q, k, v)
    grads_s = jax.grad(_loss(_splash, seg, cot, causal), argnums=(0, 1, 2))(q, k, v)
    for gx, gs in zip(grads_x, grads_s):
        assert _rel(gs, gx) <= tol


def test_sequence_not_a_block_multiple_is_padded_and_blocks_smaller_than_it():
    # T = 100 with blocks of 128 pads to 128; T = 128 with blocks 128 of a 256 setting.
    q, k, v, seg, _ = _inputs(4, 2, jnp.float32, t=100)
    real = np.asarray(seg != 0)
    assert _rel(_splash(q, k, v, seg, True, block=512)[real], _xla(q, k, v, seg, True)[real]) <= 1e-5


def test_sharded_over_batch_and_heads_on_8_devices():
    # data=2 x fsdp=2 x tensor=2: batch over (data, fsdp) after padding B to 4, heads over tensor;
    # 2 kv heads of 4 query heads on tensor=2 shard alike, 1 kv head is repeated to the query heads.
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for kv_heads in (2, 1):
        q, k, v, seg, _ = _inputs(4, kv_heads, jnp.float32)
        q, k, v, seg = (jnp.concatenate([x, x[:1]]) for x in (q, k, v, seg))
        with sharding.rules_context(mesh):
            out = jax.jit(lambda *a: _splash(*a, True))(q, k, v, seg)
        real = np.asarray(seg != 0)
        assert _rel(out[real], _xla(q, k, v, seg, True)[real]) <= 1e-5


def test_attention_module_runs_splash_and_refuses_a_prefix_mask():
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 128, 64))
    positions = jnp.broadcast_to(jnp.arange(128), (3, 128))
    seg = jnp.asarray(SEGMENTS)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16)
    params = Attention(**kw).init(jax.random.PRNGKey(0), x, positions, seg)
    out_x = Attention(**kw).apply(params, x, positions, seg)
    out_s = Attention(**kw, impl="splash", splash_block_q=128, splash_block_kv=128).apply(params, x, positions, seg)
    real = np.asarray(seg != 0)
    assert _rel(out_s[real], out_x[real]) <= 1e-5
    with pytest.raises(ValueError, match="prefix-LM mask.*attention_impl 'xla'"):
        Attention(**kw, impl="splash").apply(params, x, positions, seg, prefix=seg > 1)
