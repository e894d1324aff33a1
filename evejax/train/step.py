"""Train state, its shardings, and the jitted training step.

The step is jitted once with explicit in/out shardings and the state donated;
it is the only place shardings are applied. `loss_fn(params, batch, rng) ->
(loss, metrics)` is the model-specific part.

Frozen parameters (a stage's `trainable` mask is False) are closed over as
constants of the loss: no weight gradients are computed or accumulated for
them, and they leave the step exactly as they entered it.
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
    ema_params: Any = None   # exponential moving average of params, when enabled


def abstract_state(model: nn.Module, init_args: tuple, init_kwargs: dict,
                   optimizer: optax.GradientTransformation, mesh, rules=sharding.LOGICAL_RULES,
                   ema: bool = False):
    """Shapes and shardings of the train state, without allocating anything.

    Returns (boxed_shapes, shardings): `boxed_shapes` keeps the logical names
    of the parameters, `shardings` is a TrainState of NamedShardings (its
    `ema_params` is None unless `ema`).
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
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated,
                           ema_params=param_sh if ema else None)
    return boxed, shardings


def optimizer_state_shardings(opt_shape, params_shape, param_sh, mesh):
    """Optimizer leaves that mirror a parameter take that parameter's sharding.

    A leaf mirrors a parameter when its key path ends with the parameter's
    path and the shapes agree: Adam's moments, also inside the masked
    sub-states of `optax.partition`, where frozen parameters leave empty
    `MaskedNode`s. Every other leaf (counts, scalars) is replicated.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {tuple(kp): (p.shape, s) for (kp, p), s in
               zip(jax.tree_util.tree_leaves_with_path(params_shape), jax.tree.leaves(param_sh))}
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def one(key_path, leaf):
        for n in lengths:
            hit = by_path.get(tuple(key_path[-n:])) if len(key_path) >= n else None
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_shape)


def init_state(model, init_args, init_kwargs, optimizer, shardings: TrainState, rng) -> TrainState:
    """Creates the state directly sharded on the mesh (no host copy of the params)."""
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = sharding.unbox(model.init(params_rng, *init_args, **init_kwargs)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng,
                          ema_params=params if shardings.ema_params is not None else None)

    return jax.jit(init, out_shardings=shardings)(rng)


def state_from_params(params, optimizer, shardings: TrainState, rng) -> TrainState:
    """A step-0 state around given params (a previous stage's, imported) with fresh optimizer state.

    `rng` is the state's own key, i.e. what `init_state` keeps after its split.
    """
    def build(params, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=rng, ema_params=params if shardings.ema_params is not None else None)

    return jax.jit(build, out_shardings=shardings)(params, rng)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    state_shardings: TrainState, batch_shardings: Any,
                    accum_steps: int = 1, donate: bool = True, *,
                    trainable: Any = None, ema_decay: float = 0.0,
                    batch_scalars: Optional[dict[str, Callable]] = None):
    """Returns step(state, batch) -> (state, metrics), jitted with shardings.

    With `accum_steps > 1` the batch's leading dimension is split into that many
    micro-batches whose gradients are averaged (weighted by their loss weight)
    inside the step, so large global batches fit small slices. `trainable` is
    a bool tree like the params (None: all train); `grad_norm` is measured
    over the trainable part, before clipping. With `ema_decay > 0` the state
    must carry `ema_params`, which follow the params. `batch_scalars` {key: update count ->
    value} adds those float32 scalars, computed from `state.step`, to every micro-batch.
    """
    def step(state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        scalars = {k: jnp.asarray(fn(state.step), jnp.float32) for k, fn in (batch_scalars or {}).items()}
        if trainable is None:
            train_p, frozen_p = state.params, None
        else:
            train_p, frozen_p = _split(state.params, trainable)

        def grads_of(tp, mb, r):
            mb = dict(mb, **scalars)
            (loss, metrics), grads = jax.value_and_grad(
                lambda p: loss_fn(p if frozen_p is None else _merge(p, frozen_p), mb, r),
                has_aux=True)(tp)
            return loss, metrics, grads

        if accum_steps == 1:
            loss, metrics, grads = grads_of(train_p, batch, step_rng)
        else:
            loss, metrics, grads = _accumulate(grads_of, train_p, batch, step_rng, accum_steps)
        metrics = dict(metrics, **scalars, loss=loss, grad_norm=optax.tree.norm(grads))
        if frozen_p is not None:
            grads = _merge(grads, jax.tree.map(jnp.zeros_like, frozen_p))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if frozen_p is not None:  # bit-exact: p + 0.0 would turn -0.0 into 0.0
            params = _merge(_split(params, trainable)[0], frozen_p)
        ema = state.ema_params
        if ema_decay:
            ema = jax.tree.map(lambda e, p: (e * ema_decay + p * (1.0 - ema_decay)).astype(e.dtype),
                               ema, params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                                  ema_params=ema)
        return new_state, metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,) if donate else ())


def _split(tree, mask):
    """(leaves where mask, leaves where not), each with None in the other's places."""
    return (jax.tree.map(lambda x, m: x if m else None, tree, mask),
            jax.tree.map(lambda x, m: None if m else x, tree, mask))


def _merge(first, second):
    """Inverse of `_split`: takes `first`'s leaves, `second`'s where `first` has None."""
    return jax.tree.map(lambda a, b: b if a is None else a, first, second,
                        is_leaf=lambda x: x is None)


def _accumulate(grads_of, params, batch, rng, n):
    # Micro-batch k takes rows k, k + n, k + 2n, ...: each device's contiguous
    # shard of the batch then contributes equally to every micro-batch, so the
    # split needs no data movement.
    micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)

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
