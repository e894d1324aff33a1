"""The optimizer of a stage, from config: schedule, freezing and weight-decay masks.

Parameters are named by their "/"-joined path, e.g.
`decoder/layers/mlp/wo/kernel` or, inside EVE, `llm/decoder/layers/mlp/wo/kernel`.
Patterns are Python regexes that must match a whole path (`re.fullmatch`).

  config.stage.trainable   parameters that train; every other one is frozen:
                           `optax.partition` (formerly `multi_transform`) gives
                           it `optax.set_to_zero()`, so it gets a zero update
                           and no optimizer state at all.
  config.optim.no_decay    trainable parameters left out of weight decay
                           (norms, biases, embeddings, as the config says); a
                           generic list, so a pattern may match nothing.

The trainable group is global-norm clipping followed by AdamW, with linear
warmup over a fraction of the steps and then cosine decay (HF's
`get_cosine_schedule_with_warmup`, which all three papers' code uses; with
`optim.warmup_init_frac` the warmup starts from that share of the peak, as
timm's CosineLRScheduler `warmup_lr_init` in the DAN code).

  config.train.batch_schedules   {batch key: dict(start, end, epochs, steps_per_epoch)}:
                           a scalar the step adds to every (micro-)batch, a function
                           of the update count u: start + (end - start) * e / (epochs - 1),
                           e = min(u // steps_per_epoch, epochs - 1), i.e. constant over
                           an epoch and linear over epochs from start to end (DAN's
                           drop-path maximum; start == end is a constant).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


def path_str(key_path) -> str:
    """`(DictKey('decoder'), DictKey('layers'), ...)` -> "decoder/layers/..."."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def path_mask(params: Any, patterns: Sequence[str], what: str) -> Any:
    """A tree of bools like `params`: does any pattern fully match the leaf's path?

    A pattern that matches nothing is an error naming `what` (the config key),
    so a typo cannot silently freeze or decay the wrong parameters.
    """
    compiled = [re.compile(p) for p in patterns]
    used = [False] * len(compiled)

    def one(key_path, _):
        path = path_str(key_path)
        hit = False
        for i, rx in enumerate(compiled):
            if rx.fullmatch(path):
                used[i] = hit = True
        return hit

    mask = jax.tree_util.tree_map_with_path(one, params)
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
        some = [path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(params)][:8]
        raise ValueError(f"{what}: pattern(s) {unused} match no parameter path; paths look like {some}")
    return mask


def make_schedule(optim, total_steps: int) -> Callable:
    """Learning rate as a function of the update count (0 for the first update).

    kind "cosine": linear 0 -> lr over ceil(warmup_frac * steps) updates, then
    cosine down to min_lr_frac * lr at `total_steps`; "constant": the same
    warmup, then flat.
    """
    warmup = math.ceil(optim.warmup_frac * total_steps)
    peak, end = optim.lr, optim.lr * optim.min_lr_frac
    start = optim.lr * optim.get("warmup_init_frac", 0.0)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(start, peak, warmup, max(total_steps, warmup + 1), end)
    if optim.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(start, peak, warmup), optax.constant_schedule(peak)], [warmup])
    raise ValueError(f"config.optim.schedule={optim.schedule!r} is not known; use 'cosine' or 'constant'")


def epoch_linear(start: float, end: float, epochs: int, steps_per_epoch: int) -> Callable:
    """Update count -> float32 value: constant within an epoch, linear over epochs (module docstring)."""
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"a batch schedule needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, "
                         f"{steps_per_epoch}")

    def value(count):
        epoch = jnp.minimum(jnp.asarray(count) // steps_per_epoch, epochs - 1).astype(jnp.float32)
        return jnp.float32(start) + jnp.float32(end - start) * epoch / max(epochs - 1, 1)

    return value


def batch_schedules(train) -> dict[str, Callable]:
    """{batch key: update count -> value} of config.train.batch_schedules (absent: none)."""
    given = train.get("batch_schedules", None) or {}
    out = {}
    for key, spec in given.items():
        fields = dict(spec)
        unknown = sorted(set(fields) ^ {"start", "end", "epochs", "steps_per_epoch"})
        if unknown:
            raise KeyError(f"config.train.batch_schedules.{key} needs exactly start, end, epochs, "
                           f"steps_per_epoch; it differs in {unknown}")
        out[key] = epoch_linear(float(fields["start"]), float(fields["end"]), int(fields["epochs"]),
                                int(fields["steps_per_epoch"]))
    return out


@dataclasses.dataclass
class Optimizer:
    tx: optax.GradientTransformation
    schedule: Callable          # update count -> learning rate
    trainable: Any              # bool tree like the params


def make_optimizer(optim, trainable_patterns: Sequence[str], params: Any, total_steps: int) -> Optimizer:
    """The stage's optimizer for `params` (arrays or shapes; only paths are read)."""
    schedule = make_schedule(optim, total_steps)
    trainable = path_mask(params, trainable_patterns, "config.stage.trainable")
    if not any(jax.tree.leaves(trainable)):
        raise ValueError("config.stage.trainable selects no parameter")
    no_decay = list(optim.no_decay)

    def decay_mask(tree):
        # Called by optax on the trainable subset, where frozen leaves are
        # empty MaskedNodes, so paths are recomputed rather than precomputed.
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: not any(re.fullmatch(p, path_str(kp)) for p in no_decay), tree)

    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    labels = jax.tree.map(lambda t: TRAINABLE if t else FROZEN, trainable)
    tx = optax.partition({TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=schedule, trainable=trainable)
