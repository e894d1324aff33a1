"""The De-focus Mamba mixer (evejax/nn/mamba.py): both scans against a sequential loop, the whole
mixer against a numpy transcription of the official forward, the official init, causality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.nn import mamba
from evejax.sharding import unbox


def _sequential_scan(delta, u, b, c, a):
    """h_t = exp(delta_t a) h_{t-1} + delta_t u_t b_t, y_t = h_t . c_t, one token at a time (numpy, float64)."""
    delta, u, b, c, a = (np.asarray(x, np.float64) for x in (delta, u, b, c, a))
    h = np.zeros((u.shape[0], u.shape[2], a.shape[1]))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * a) * h + (delta[:, t] * u[:, t])[..., None] * b[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h, c[:, t]))
    return np.stack(ys, axis=1)


def test_scans_equal_the_sequential_scan():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    bsz, length, e, n = 2, 13, 6, 4
    delta = jax.nn.softplus(jax.random.normal(keys[0], (bsz, length, e)))
    u = jax.random.normal(keys[1], (bsz, length, e))
    b, c = jax.random.normal(keys[2], (2, bsz, length, n))
    a = -jnp.exp(jax.random.normal(keys[3], (e, n)))
    want = _sequential_scan(delta, u, b, c, a)
    # Chunks of 4 pad 13 tokens to 16; 64 is one chunk longer than the sequence.
    variants = [("associative", 1), ("chunked", 4), ("chunked", 64), ("tokens", 1)]
    scans = {v: jax.jit(lambda uu, v=v: mamba.selective_scan(delta, uu, b, c, a, scan=v[0], chunk=v[1]))
             for v in variants}
    for v in variants:
        np.testing.assert_allclose(scans[v](u), want, rtol=1e-5, atol=1e-5, err_msg=str(v))
    # Gradients too: the chunked scan is rematerialised, the associative one is not.
    grads = [jax.jit(jax.grad(lambda uu, v=v: jnp.sum(jnp.sin(scans[v](uu)))))(u) for v in variants[:2]]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_token_scan_gradients_equal_autodiff_of_the_plain_scan():
    """The "tokens" scan's hand-written backward (one reverse scan, dA summed in its carry, the other
    gradients contracted over all tokens at once) against jax.grad of the associative scan, for every
    input, inside jax.checkpoint as the remat'ed blocks call it, and at a length of one token."""
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    for bsz, length, e, n in [(2, 13, 6, 4), (3, 1, 5, 2)]:
        delta = jax.nn.softplus(jax.random.normal(keys[0], (bsz, length, e)))
        u = jax.random.normal(keys[1], (bsz, length, e))
        b, c = jax.random.normal(keys[2], (2, bsz, length, n))
        a = -jnp.exp(jax.random.normal(keys[3], (e, n)))
        cotangent = jax.random.normal(keys[4], (bsz, length, e))

        def grads(kind, remat):
            scan = lambda *xs: mamba.selective_scan(*xs, scan=kind)  # noqa: E731
            scan = jax.checkpoint(scan) if remat else scan
            return jax.jit(jax.grad(lambda *xs: jnp.vdot(scan(*xs), cotangent), argnums=range(5)))(delta, u, b, c, a)

        want = grads("associative", False)
        for remat in (False, True):
            for name, got, ref in zip(("delta", "u", "B", "C", "A"), grads("tokens", remat), want):
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))),
                                           err_msg=f"d{name} at {(bsz, length, e, n)}, remat={remat}")


def _official_mixer(p, x, cfg):
    """numpy float64 transcription of the official MambaMixer.cuda_kernels_forward on x [B, L, D]."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), p)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    proj = x @ p["in_proj"]["kernel"].reshape(x.shape[-1], -1)             # [B, L, 2E]
    e, n, r, k = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel
    u, z = proj[..., :e], proj[..., e:]
    length = x.shape[1]
    padded = np.pad(u, ((0, 0), (k - 1, 0), (0, 0)))
    u = silu(sum(padded[:, j:j + length] * p["conv1d"]["kernel"][j] for j in range(k)) + p["conv1d"]["bias"])
    ssm = u @ p["x_proj"]["kernel"]
    dt_low, b, c = ssm[..., :r], ssm[..., r:r + n], ssm[..., r + n:]
    theta = (np.arange(length) / cfg.rope_scale_factor)[:, None] * p["freq"][None]
    rot = lambda v: np.stack([-v[..., 1::2], v[..., 0::2]], -1).reshape(v.shape)  # noqa: E731
    b, c = (v * np.cos(theta) + rot(v) * np.sin(theta) for v in (b, c))
    delta = np.log1p(np.exp(dt_low @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])) / cfg.delta_scale_factor
    y = _sequential_scan(delta, u, b, c, -np.exp(p["A_log"]))
    g = y.reshape(*y.shape[:2], -1, cfg.group_norm_size)
    y = (g / np.sqrt((g ** 2).mean(-1, keepdims=True) + 1e-6)).reshape(y.shape)
    y = (y + u * p["D"]) * silu(z)
    return y @ p["out_proj"]["kernel"]


def test_mixer_equals_the_official_forward():
    cfg = mamba.MambaConfig(embed_dim=16, intermediate_size=32, state_size=8, time_step_rank=4,
                            group_norm_size=8, rope_scale_factor=2.0, delta_scale_factor=1.5, scan_chunk=3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 16))
    mixer = mamba.MambaMixer(cfg)
    params = unbox(jax.jit(mixer.init)(jax.random.PRNGKey(2), x)["params"])
    # Move freq and A_log off their init so a wrong pairing or sign cannot hide.
    params["freq"] = params["freq"] + 0.3
    params["A_log"] = params["A_log"] + jax.random.normal(jax.random.PRNGKey(3), params["A_log"].shape) * 0.2
    apply = jax.jit(mixer.apply)
    out = apply({"params": params}, x)
    np.testing.assert_allclose(out, _official_mixer(params, np.asarray(x, np.float64), cfg), rtol=2e-4, atol=2e-5)
    # Causal in L: a token's output never depends on later tokens (so right padding is exact).
    later = x.at[:, 7:].set(5.0)
    np.testing.assert_allclose(apply({"params": params}, later)[:, :7], out[:, :7], rtol=1e-5, atol=1e-6)


def test_official_init():
    cfg = mamba.MambaConfig(embed_dim=32, intermediate_size=64, state_size=16, time_step_rank=48)
    params = jax.tree.map(np.asarray, unbox(jax.jit(mamba.MambaMixer(cfg).init)(jax.random.PRNGKey(0),
                                                                                 jnp.zeros((1, 3, 32)))["params"]))
    # The sixteen freq values of reference/dan.md §2, the last exactly 0.
    np.testing.assert_allclose(params["freq"][[0, 1, 7, 15]], [0.7474, 0.5579, 0.0909, 0.0], atol=1e-4)
    np.testing.assert_allclose(params["A_log"], np.broadcast_to(np.log(np.arange(1, 17)), (64, 16)),
                               rtol=1e-6)
    np.testing.assert_array_equal(params["D"], np.ones(64))
    dt = np.log1p(np.exp(params["dt_proj"]["bias"]))
    np.testing.assert_allclose(dt[[0, -1]], [1e-3, 0.1], rtol=1e-4)
    assert np.all(np.diff(np.log(dt)) > 0)
    assert 0.1 < np.abs(params["dt_proj"]["kernel"]).max() <= 48 ** -0.5
    assert params["in_proj"]["kernel"].shape == (32, 2, 64)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="scan 'serial'"):
        mamba.MambaConfig(embed_dim=8, intermediate_size=64, scan="serial").validate()
    with pytest.raises(ValueError, match="group_norm_size=64"):
        mamba.MambaConfig(embed_dim=8, intermediate_size=48).validate()
