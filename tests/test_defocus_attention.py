"""De-focus attention (nn/attention.py, `defocus`) against a direct numpy form of DAN's Eq. 8,
its initial values, and the shared core unchanged with it off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.nn.attention import Attention
from evejax.nn.transformer import TransformerConfig, TransformerStack
from evejax.sharding import unbox


def _eq8(p, x, form, num_heads, num_kv_heads, pos_scale):
    """y_t = sum_{s<=t} softmax_s(Re(sum_i q~_{t,i} conj(k~_{s,i}) e^{i theta_i (t-s)}) with the decay) v_s:
    the rotation as a complex relative phase (pairs (2i, 2i+1) as complex numbers), never as absolute
    rotations of q and k; float64."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), p)
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"])
    k = np.einsum("btd,dkh->btkh", x, p["key"]["kernel"])
    v = np.einsum("btd,dkh->btkh", x, p["value"]["kernel"])
    group = num_heads // num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    theta = np.repeat(p["defocus_freq"], group, axis=0)                  # [N, H/2]
    lam = -np.exp(p["defocus_decay"])                                     # [N]
    qc, kc = q[..., 0::2] + 1j * q[..., 1::2], k[..., 0::2] + 1j * k[..., 1::2]
    t = x.shape[1]
    rel = (np.arange(t)[:, None] - np.arange(t)[None, :]) / pos_scale     # [T, S]
    phase = np.exp(1j * theta[:, None, None, :] * rel[None, :, :, None])  # [N, T, S, H/2]
    dots = np.real(np.einsum("btni,bsni,ntsi->bnts", qc, np.conj(kc), phase)) / np.sqrt(q.shape[-1])
    decay = lam[:, None, None] * rel[None]                                # [N, T, S]
    logits = dots * np.exp(decay) if form == "scale" else dots + decay
    logits = np.where(rel[None, None] >= 0, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs, v)
    return np.einsum("btnh,nhd->btd", out, p["out"]["kernel"])


@pytest.mark.parametrize("form,num_kv_heads,pos_scale", [("scale", 4, 1.0), ("bias", 4, 2.0), ("scale", 2, 1.0)])
def test_defocus_attention_equals_eq8(form, num_kv_heads, pos_scale):
    layer = Attention(num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, rope_layout="interleaved",
                      defocus=form, defocus_position_scale=pos_scale)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    seg = jnp.ones((2, 7), jnp.int32)
    params = unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x, pos, seg)["params"])
    # Move theta and lambda off their (head-independent, RoPE-like) init so a per-head mix-up shows.
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    params["defocus_freq"] = jax.random.uniform(keys[0], params["defocus_freq"].shape, maxval=1.5)
    params["defocus_decay"] = jax.random.normal(keys[1], params["defocus_decay"].shape) - 1.0
    out = jax.jit(layer.apply)({"params": params}, x, pos, seg)
    np.testing.assert_allclose(out, _eq8(params, x, form, 4, num_kv_heads, pos_scale), rtol=1e-4, atol=1e-5)


def test_defocus_initial_values():
    layer = Attention(num_heads=3, num_kv_heads=3, head_dim=8, defocus="scale", rope_base=100.0)
    x = jnp.zeros((1, 2, 24))
    params = unbox(jax.jit(layer.init)(jax.random.PRNGKey(0), x, jnp.zeros((1, 2), jnp.int32),
                                       jnp.ones((1, 2), jnp.int32))["params"])
    # RetNet's per-head decays gamma_h = 1 - 2^-(5 + h), as lambda = ln gamma = -exp(lambda_hat).
    np.testing.assert_allclose(-np.exp(params["defocus_decay"]), np.log(1 - 2.0 ** -(5 + np.arange(3))), rtol=1e-5)
    # Rotation frequencies start at RoPE's: base^(-2i/H).
    np.testing.assert_allclose(params["defocus_freq"], np.broadcast_to(100.0 ** (-np.arange(0, 8, 2) / 8), (3, 4)),
                               rtol=1e-6)


def _stack_out(cfg):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    seg = jnp.ones((2, 6), jnp.int32)
    stack = TransformerStack(cfg)
    params = jax.jit(stack.init)(jax.random.PRNGKey(1), x, pos, seg)["params"]
    return params, jax.jit(stack.apply)({"params": params}, x, pos, seg)[0]


def test_defocus_off_adds_nothing_and_on_changes_the_core():
    base = TransformerConfig(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                             remat="none")
    params, out = _stack_out(base)
    assert not any("defocus" in "/".join(map(str, path)) for path, _ in jax.tree_util.tree_leaves_with_path(params))
    on_params, on_out = _stack_out(base.replace(defocus="bias"))
    assert unbox(on_params["layers"]["attention"]["defocus_decay"]).shape == (2, 4)
    assert unbox(on_params["layers"]["attention"]["defocus_freq"]).shape == (2, 2, 4)
    assert not np.allclose(on_out, out, atol=1e-3)
    with pytest.raises(ValueError, match="causal=True"):
        base.replace(defocus="scale", causal=False).validate()
    with pytest.raises(ValueError, match="'xla'"):
        _stack_out(base.replace(defocus="scale", attention_impl="dot"))
