"""The De-focus Mamba mixer (De-focus Attention Networks, `classification/models/mamba_block.py`).

x [B, L, D] -> [B, L, D], causal in L (so right padding never changes a real token):

  in_proj                      u, z [B, L, E]           (u the first E outputs, z the gate)
  u <- SiLU(causal depthwise conv over L, kernel K, bias)
  x_proj(u)                    dt_low [B, L, R], B, C [B, L, N]
  B, C rotated: angle[t, n] = (t / rope_scale_factor) * freq[n]; pairs (2k, 2k + 1) but each
      element keeps its own freq (the official `theta_shift`, not a true 2 x 2 rotation)
  delta = softplus(dt_proj(dt_low), bias in float32) / delta_scale_factor   [B, L, E]
  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  y_t = h_t . C_t,  A = -exp(A_log)   (float32)
  y <- y / sqrt(mean over each group of G channels of y^2 + 1e-6)   (no affine, float32)
  y <- (y + D u) * SiLU(z);  out_proj                 [B, L, D]

Parameters (E = intermediate_size, N = state_size, R = time_step_rank, K = conv_kernel);
official name after the arrow:
  in_proj/kernel [D, 2, E]      <- in_proj.weight [2E, D]
  conv1d/kernel [K, E], bias [E] <- conv1d.weight [E, 1, K], conv1d.bias
  x_proj/kernel [E, R + 2N]     <- x_proj.weight
  dt_proj/kernel [R, E], bias [E] <- dt_proj.weight, dt_proj.bias
  A_log [E, N], D [E], freq [N]  <- same names
  out_proj/kernel [E, D]        <- out_proj.weight

The scan: `scan="associative"` runs `jax.lax.associative_scan` over all of L with the state
[B, L, E, N] materialised; `scan="chunked"` runs a sequential `lax.scan` over chunks of
`scan_chunk` tokens, associative inside each chunk, rematerialised, so only the carried state
[B, E, N] and the chunk's states live at once (the backward pass recomputes them); `scan="tokens"`
runs a `lax.scan` over single tokens that keeps every state [L, B, E, N] for a hand-written
backward (a `jax.custom_vjp`: one reverse scan for the state's cotangent, dA summed in its carry,
the other gradients each one contraction over all tokens), instead of autodiff's per-chunk
reductions: on CPU Mamba-B's scan forward + backward is 2.2x faster than chunked, at the cost of
the [L, B, E, N] states (39 MB a block at batch 2) during a block's backward.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from evejax.nn.layers import Dense, constrain, param_with_axes

SCANS = ("associative", "chunked", "tokens")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    embed_dim: int
    intermediate_size: int
    state_size: int = 16
    time_step_rank: int = 48
    conv_kernel: int = 4
    group_norm_size: int = 64
    rope_scale_factor: float = 1.0   # positions are divided by it (resolution transfer)
    delta_scale_factor: float = 1.0  # delta is divided by it (resolution transfer)
    # dt_proj init (official `_init_mamba_weights`): weight U(+-R^-0.5 * scale), bias the inverse
    # softplus of dt log-spaced from time_step_min to time_step_max over the E channels.
    time_step_scale: float = 1.0
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # "tokens" is 2.2x faster than "chunked" on CPU but keeps [L, B, E, N] states for the backward
    # (the CPU bench uses it: evejax/bench.py DAN_OPTIONS); "chunked" keeps one [B, E, N] state.
    scan: str = "chunked"
    # 2: the fastest chunk on CPU, Mamba-B's scan forward + backward 0.44 s per block against 4.3 s
    # at 32 (`evejax bench dan`); TPU not measured.
    scan_chunk: int = 2
    matmul_2d: bool = False  # Dense.flatten for every projection: faster on CPU, not needed on TPU
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self) -> "MambaConfig":
        if self.scan not in SCANS:
            raise ValueError(f"Mamba scan {self.scan!r} is not known; use one of {SCANS}")
        if self.scan_chunk < 1:
            raise ValueError(f"Mamba scan_chunk must be >= 1, got {self.scan_chunk}")
        if self.intermediate_size % self.group_norm_size:
            raise ValueError(f"intermediate_size={self.intermediate_size} is not a multiple of "
                             f"group_norm_size={self.group_norm_size}")
        if self.state_size % 2:
            raise ValueError(f"the rotation of B and C pairs channels: state_size must be even, got "
                             f"{self.state_size}")
        return self


def _combine(left, right):
    """Composition of two affine maps h -> a h + b, `left` applied first."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _scan_chunk(h0, delta, u, b_mat, c_mat, a):
    """One chunk of the selective scan from state h0 [B, E, N]; delta/u [B, c, E], b/c [B, c, N].
    Returns (last state [B, E, N], y [B, c, E])."""
    decay = jnp.exp(delta[..., None] * a)                            # [B, c, E, N]
    inject = (delta * u)[..., None] * b_mat[:, :, None, :]           # [B, c, E, N]
    decay, inject = jax.lax.associative_scan(_combine, (decay, inject), axis=1)
    h = decay * h0[:, None] + inject
    return h[:, -1], jnp.einsum("blen,bln->ble", h, c_mat)


def _previous_states(delta, du, b_mat, a):
    """h_{t-1} for every token, [L, B, E, N] (h_{-1} = 0), and the last state h_{L-1} [B, E, N], of
    h_t = exp(delta_t a) h_{t-1} + du_t b_t; time-major delta, du [L, B, E], b_mat [L, B, N].
    One fused update of the [B, E, N] state per token."""
    def step(h, xs):
        delta_t, du_t, b_t = xs
        return jnp.exp(delta_t[..., None] * a) * h + du_t[..., None] * b_t[:, None, :], h

    h0 = jnp.zeros((*delta.shape[1:], a.shape[-1]), jnp.float32)
    last, prev = jax.lax.scan(step, h0, (delta, du, b_mat))
    return prev, last


def _read_out(prev, last, x, spec):
    """sum of h_t * x_t over one axis for every token t, from the previous states (h_t = prev[t + 1]):
    einsum(spec) of all of prev against x moved one token later (slicing prev would copy it), the
    last token's term from `last`."""
    later = jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])
    tail = jnp.einsum(spec.replace("l", ""), last, x[-1])
    return jnp.concatenate([jnp.einsum(spec, prev, later)[1:], tail[None]])


@jax.custom_vjp
def _scan_tokens(delta, u, b_mat, c_mat, a):
    """selective_scan on time-major delta, u [L, B, E], b_mat, c_mat [L, B, N] -> y [L, B, E]."""
    return _scan_tokens_fwd(delta, u, b_mat, c_mat, a)[0]


def _scan_tokens_fwd(delta, u, b_mat, c_mat, a):
    prev, last = _previous_states(delta, delta * u, b_mat, a)
    return _read_out(prev, last, c_mat, "lben,lbn->lbe"), (delta, u, b_mat, c_mat, a, prev, last)


def _scan_tokens_bwd(res, grad_y):
    """One reverse scan over the tokens for the state's cotangent G_t = dL/dh_t
    (G_t = grad_y_t c_t + exp(delta_{t+1} a) G_{t+1}), then each input's gradient as one contraction over
    all tokens, with x_t = delta_t u_t b_t and the decay's cotangent Q_t = G_t h_{t-1} exp(delta_t a):
      dC_t = sum_e grad_y_t h_t, dB_t = sum_e G_t delta_t u_t, d(delta u)_t = sum_n G_t b_t,
      d delta_t += sum_n Q_t a, dA = sum_{b,t} Q_t delta_t (summed over t in the scan's carry)."""
    delta, u, b_mat, c_mat, a, prev, last = res
    du = delta * u

    def step(carry, xs):  # carry: exp(delta_{t+1} a) G_{t+1}, sum over later tokens of Q delta
        g_next, grad_a = carry
        delta_t, c_t, grad_y_t, h_prev = xs
        g = g_next + grad_y_t[..., None] * c_t[:, None, :]
        g_prev = jnp.exp(delta_t[..., None] * a) * g
        q = g_prev * h_prev
        return (g_prev, grad_a + q * delta_t[..., None]), (g, jnp.sum(q * a, axis=-1))

    zeros = jnp.zeros_like(last)
    (_, grad_a), (g, grad_decay) = jax.lax.scan(step, (zeros, zeros), (delta, c_mat, grad_y, prev), reverse=True)
    g_du = jnp.einsum("lben,lbn->lbe", g, b_mat)
    return (g_du * u + grad_decay, g_du * delta, jnp.einsum("lben,lbe->lbn", g, du),
            _read_out(prev, last, grad_y, "lben,lbe->lbn"), jnp.sum(grad_a, axis=0))


_scan_tokens.defvjp(_scan_tokens_fwd, _scan_tokens_bwd)


def selective_scan(delta, u, b_mat, c_mat, a, *, scan: str = "chunked", chunk: int = 2):
    """y [B, L, E] float32 of h_t = exp(delta_t a) h_{t-1} + delta_t u_t b_t, y_t = h_t . c_t, h_{-1} = 0.

    delta, u [B, L, E]; b_mat, c_mat [B, L, N]; a [E, N]; all float32.
    """
    bsz, length, e = u.shape
    h0 = jnp.zeros((bsz, e, a.shape[-1]), jnp.float32)
    if scan == "associative":
        return _scan_chunk(h0, delta, u, b_mat, c_mat, a)[1]
    if scan == "tokens":
        time_major = lambda x: x.swapaxes(0, 1)  # noqa: E731
        return time_major(_scan_tokens(*map(time_major, (delta, u, b_mat, c_mat)), a))
    if scan != "chunked":
        raise ValueError(f"Mamba scan {scan!r} is not known; use one of {SCANS}")
    chunk = min(chunk, length)
    n = -(-length // chunk)
    # Trailing padding with delta = 0 is the identity map (decay 1, nothing injected).
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk - length), (0, 0)))  # noqa: E731
    split = lambda x: pad(x).reshape(bsz, n, chunk, x.shape[-1]).swapaxes(0, 1)  # noqa: E731

    @jax.checkpoint
    def body(h, xs):
        return _scan_chunk(h, *xs, a)

    _, y = jax.lax.scan(body, h0, tuple(split(x) for x in (delta, u, b_mat, c_mat)))
    return y.swapaxes(0, 1).reshape(bsz, n * chunk, e)[:, :length]


def rotate_state_inputs(x, freq, rope_scale_factor: float):
    """The official `add_rope` on B or C: x [B, L, N] float32, freq [N] -> [B, L, N]."""
    pos = jnp.arange(x.shape[1], dtype=jnp.float32) / rope_scale_factor
    angle = pos[:, None] * freq.astype(jnp.float32)[None, :]
    swapped = jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * jnp.cos(angle) + swapped * jnp.sin(angle)


def _conv_init(key, shape, dtype):
    # PyTorch's Conv1d default (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in = K for depthwise.
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0) / math.sqrt(shape[0])


class _TimeStep(nn.Module):
    """dt_proj: dt_low [B, L, R] -> softplus(dt_low W + bias) [B, L, E] float32 (bias added in float32)."""
    cfg: MambaConfig

    @nn.compact
    def __call__(self, dt_low):
        cfg = self.cfg
        r, e, pdtype = cfg.time_step_rank, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        bound = r ** -0.5 * cfg.time_step_scale
        kernel = self.param("kernel", param_with_axes(
            lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound), (None, "mlp")), (r, e), pdtype)

        def bias_init(key, shape, dtype):
            dt = np.exp(np.linspace(math.log(cfg.time_step_min), math.log(cfg.time_step_max), e))
            dt = np.maximum(dt, cfg.time_step_floor)
            return jnp.asarray(dt + np.log(-np.expm1(-dt)), dtype)

        bias = self.param("bias", param_with_axes(bias_init, ("mlp",)), (e,), pdtype)
        dtype = jnp.dtype(cfg.dtype)
        lead = dt_low.shape[:-1]
        dt = jnp.dot(dt_low.astype(dtype).reshape(-1, r) if cfg.matmul_2d else dt_low.astype(dtype),
                     kernel.astype(dtype)).reshape(*lead, e).astype(jnp.float32)
        return jax.nn.softplus(dt + bias.astype(jnp.float32))


class MambaMixer(nn.Module):
    """x [B, L, D] -> [B, L, D] (see the module docstring)."""
    cfg: MambaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg.validate()
        e, n, r, k = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank, cfg.conv_kernel
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        dense = lambda feats, in_axes, out_axes, name: Dense(  # noqa: E731
            feats, in_axes, out_axes, dtype=dtype, param_dtype=pdtype, flatten=cfg.matmul_2d, name=name)
        act = ("batch", "length", "act_mlp")

        uz = dense((2, e), ("embed",), (None, "mlp"), "in_proj")(x)
        u, z = constrain(uz[:, :, 0], act), constrain(uz[:, :, 1], act)

        u = jax.nn.silu(_CausalConv(k, dtype=dtype, param_dtype=pdtype, name="conv1d")(u))

        dt_low, b_mat, c_mat = jnp.split(dense((r + 2 * n,), ("mlp",), (None,), "x_proj")(u),
                                         [r, r + n], axis=-1)
        freq_init = lambda key, shape, dtype: jnp.asarray(  # noqa: E731
            (100.0 ** (-np.arange(1, n + 1) / n) - 0.01) / (1 - 0.01), dtype)
        freq = self.param("freq", param_with_axes(freq_init, (None,)), (n,), pdtype)
        b_mat = rotate_state_inputs(b_mat.astype(jnp.float32), freq, cfg.rope_scale_factor)
        c_mat = rotate_state_inputs(c_mat.astype(jnp.float32), freq, cfg.rope_scale_factor)
        delta = _TimeStep(cfg, name="dt_proj")(dt_low) / cfg.delta_scale_factor

        a_log = self.param("A_log", param_with_axes(
            lambda key, shape, dtype: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=dtype)), shape),
            ("mlp", None)), (e, n), pdtype)
        u32 = u.astype(jnp.float32)
        y = selective_scan(delta, u32, b_mat, c_mat, -jnp.exp(a_log.astype(jnp.float32)),
                           scan=cfg.scan, chunk=cfg.scan_chunk)
        g = cfg.group_norm_size
        grouped = y.reshape(*y.shape[:-1], e // g, g)
        y = (grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + 1e-6)).reshape(y.shape)
        skip = self.param("D", param_with_axes(nn.initializers.ones, ("mlp",)), (e,), pdtype)
        y = (y + u32 * skip.astype(jnp.float32)) * jax.nn.silu(z.astype(jnp.float32))
        y = constrain(y.astype(dtype), act)
        return dense((x.shape[-1],), ("mlp",), ("embed",), "out_proj")(y)


class _CausalConv(nn.Module):
    """Depthwise causal conv over L: x [B, L, E] -> [B, L, E]; y_t = bias + sum_j kernel[j] x_{t-K+1+j}."""
    kernel_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, e = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", param_with_axes(_conv_init, (None, "mlp")), (k, e), self.param_dtype)
        bias = self.param("bias", param_with_axes(
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0, 1.0) / math.sqrt(k),
            ("mlp",)), (e,), self.param_dtype)
        x = x.astype(self.dtype)
        padded = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
        length = x.shape[1]
        y = sum(padded[:, j:j + length] * kernel[j].astype(self.dtype) for j in range(k))
        return y + bias.astype(self.dtype)
