"""Train state, its shardings, and the jitted training step.

The step is jitted once with explicit in/out shardings and the state donated;
it is the only place shardings are applied. `loss_fn(params, batch, rng) ->
(loss, metrics)` is the model-specific part.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from evejax import sharding


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def abstract_state(model: nn.Module, init_args: tuple, init_kwargs: dict,
                   optimizer: optax.GradientTransformation, mesh, rules=sharding.LOGICAL_RULES):
    """Shapes and shardings of the train state, without allocating anything.

    Returns (boxed_shapes, shardings): `boxed_shapes` keeps the logical names
    of the parameters, `shardings` is a TrainState of NamedShardings.
    """
    def init(rng):
        params = model.init(rng, *init_args, **init_kwargs)["params"]
        return params

    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    param_sh = sharding.tree_shardings(boxed, mesh, rules)
    params_shape = sharding.unbox(boxed)
    opt_shape = jax.eval_shape(optimizer.init, params_shape)
    opt_sh = optimizer_state_shardings(opt_shape, params_shape, param_sh, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
    return boxed, shardings


def optimizer_state_shardings(opt_shape, params_shape, param_sh, mesh):
    """Optimizer leaves shaped like a parameter take that parameter's sharding.

    Moments are stored in sub-trees with the same structure as the params; any
    other leaf (counts, scalars, placeholders of frozen parts) is replicated.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_def = jax.tree.structure(params_shape)

    def visit(node):
        if jax.tree.structure(node) == params_def:
            return jax.tree.map(
                lambda leaf, p, s: s if getattr(leaf, "shape", None) == p.shape else replicated,
                node, params_shape, param_sh)
        if isinstance(node, (tuple, list)) and not hasattr(node, "_fields"):
            return type(node)(visit(n) for n in node)
        if hasattr(node, "_fields"):  # namedtuple states (ScaleByAdamState, ...)
            return type(node)(*(visit(n) for n in node))
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return jax.tree.map(lambda _: replicated, node)

    return visit(opt_shape)


def init_state(model, init_args, init_kwargs, optimizer, shardings: TrainState, rng) -> TrainState:
    """Creates the state directly sharded on the mesh (no host copy of the params)."""
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = sharding.unbox(model.init(params_rng, *init_args, **init_kwargs)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng)

    return jax.jit(init, out_shardings=shardings)(rng)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    state_shardings: TrainState, batch_shardings: Any,
                    accum_steps: int = 1, donate: bool = True):
    """Returns step(state, batch) -> (state, metrics), jitted with shardings.

    With `accum_steps > 1` the batch's leading dimension is split into that many
    micro-batches whose gradients are averaged (weighted by their loss weight)
    inside the step, so large global batches fit small slices.
    """
    def grads_of(params, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        return loss, metrics, grads

    def step(state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        if accum_steps == 1:
            loss, metrics, grads = grads_of(state.params, batch, step_rng)
        else:
            loss, metrics, grads = _accumulate(grads_of, state.params, batch, step_rng, accum_steps)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,) if donate else ())


def _accumulate(grads_of, params, batch, rng, n):
    micro = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

    def body(carry, xs):
        mb, r = xs
        loss, metrics, grads = grads_of(params, mb, r)
        w = metrics.get("weight", jnp.ones((), jnp.float32))
        acc_loss, acc_w, acc_g, acc_m = carry
        acc_g = jax.tree.map(lambda a, g: a + g * w, acc_g, grads)
        acc_m = jax.tree.map(lambda a, m: a + m * w, acc_m, metrics)
        return (acc_loss + loss * w, acc_w + w, acc_g, acc_m), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    m_shape = jax.eval_shape(lambda: grads_of(params, jax.tree.map(lambda x: x[0], micro), rng)[1])
    m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, m0)
    (loss, w, grads, metrics), _ = jax.lax.scan(body, init, (micro, jax.random.split(rng, n)))
    inv = 1.0 / jnp.maximum(w, 1e-9)
    return loss * inv, jax.tree.map(lambda m: m * inv, metrics), jax.tree.map(lambda g: g * inv, grads)


def adamw(lr: float | Callable = 1e-4, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: Optional[float] = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW: the default optimizer of every paper here."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
