"""Small building blocks: logical-axis helpers, norms, dense layers, MLPs, DropPath.

All shapes are [..., features] unless stated. Parameters are created in
`param_dtype` and carry logical axis names; computation runs in `dtype`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names, a no-op outside a mesh context.

    Uses the same divisibility rule as parameter shardings, so tiny models on
    large meshes replicate the dimension instead of failing.
    """
    from evejax import sharding

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
    spec = sharding.logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


class RMSNorm(nn.Module):
    """RMSNorm as in LLaMA/InternLM2: statistics in float32, scale after the cast back."""
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", param_with_axes(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias (CLIP, PEL/PAL); statistics in float32."""
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        feat = x.shape[-1]
        scale = self.param("scale", param_with_axes(nn.initializers.ones, (self.axis_name,)),
                           (feat,), self.param_dtype)
        bias = self.param("bias", param_with_axes(nn.initializers.zeros, (self.axis_name,)),
                          (feat,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, param_dtype, name: str) -> nn.Module:
    if kind == "rms":
        return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "layer":
        return LayerNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm {kind!r} is not known; use 'rms' or 'layer'")


class Dense(nn.Module):
    """Linear map from the last `len(in_axes)` dims to `features` with logical axes.

    kernel: [*in_dims, *features], logical names `in_axes + out_axes`.
    `flatten` computes it as one 2-D matmul [prod(lead), prod(in)] x [prod(in),
    prod(features)] (same parameters, same result): on XLA:CPU this lets the
    weight gradient (a contraction over batch and length) run without
    transposing copies of the activations. TPU handles the N-D form natively,
    where the reshapes could cost relayouts for lengths that are not a
    multiple of 8.
    """
    features: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    flatten: bool = False

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = self.param("kernel", param_with_axes(self.kernel_init, self.in_axes + self.out_axes),
                            (*in_shape, *self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.flatten:
            lead, size = x.shape[:-n_in], math.prod(in_shape)
            y = jnp.dot(x.reshape(-1, size), kernel.reshape(size, -1)).reshape(*lead, *self.features)
        else:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
        if self.use_bias:
            bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.out_axes),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not known; use one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Gated (SwiGLU: `gated=True`) or plain two-layer MLP: [..., d] -> [..., d]."""
    hidden: int
    act: str = "silu"
    gated: bool = True
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    flatten: bool = False  # Dense.flatten

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, flatten=self.flatten)
        up = lambda name: Dense((self.hidden,), ("embed",), ("mlp",), name=name, **kw)(x)
        h = activation(self.act)(up("wi_gate" if self.gated else "wi"))
        if self.gated:
            h = h * up("wi_up")
        h = checkpoint_name(h, "mlp_hidden")
        h = constrain(h, ("batch", "length", "act_mlp"))
        return Dense((d,), ("mlp",), ("embed",), name="wo", **kw)(h)


class DropPath(nn.Module):
    """Stochastic depth: zeroes a whole sample's residual branch with probability `rate`.

    `rate` is a call argument (may be traced) so it can follow a schedule.
    """

    @nn.compact
    def __call__(self, x, rate, deterministic: bool = True):
        if deterministic:
            return x
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)
