"""Optimizer from config and the train step: schedule, freezing, weight decay, accumulation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from evejax import config as config_lib
from evejax import sharding
from evejax.data import synthetic
from evejax.models import registry
from evejax.train import optimizer as optimizer_lib
from evejax.train import step as step_lib

FROZEN = ("embed_tokens/embedding", "final_norm/scale", "lm_head/kernel")


def optim_config(**kw):
    base = dict(lr=1e-3, warmup_frac=0.1, schedule="cosine", min_lr_frac=0.1, b1=0.9, b2=0.999,
                eps=1e-8, weight_decay=0.0, clip_norm=1.0, no_decay=(r".*norm.*", r".*bias", r".*embed.*"))
    return ml_collections.ConfigDict(dict(base, **kw))


def test_schedule_matches_closed_form():
    total, peak, end = 200, 1e-3, 1e-4
    schedule = optimizer_lib.make_schedule(optim_config(), total)
    warmup = math.ceil(0.1 * total)

    def closed(step):
        if step < warmup:
            return peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (0, warmup // 2, warmup, warmup + (total - warmup) // 2, total - 1):
        np.testing.assert_allclose(float(schedule(step)), closed(step), rtol=1e-6, atol=1e-12)
    assert float(schedule(warmup)) == pytest.approx(peak)
    assert float(schedule(warmup + (total - warmup) // 2)) == pytest.approx((peak + end) / 2)


def test_patterns_that_match_nothing_are_named():
    params = {"decoder": {"kernel": jnp.zeros(2)}, "lm_head": {"kernel": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"config.stage.trainable.*'encoder/\.\*'"):
        optimizer_lib.make_optimizer(optim_config(), ["encoder/.*"], params, 10)


def test_weight_decay_skips_norms_biases_embeddings_and_frozen():
    params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}, "attention_norm": {"scale": jnp.ones(3)},
              "embed_tokens": {"embedding": jnp.ones(3)}, "frozen": {"kernel": jnp.ones(3)}}
    opt = optimizer_lib.make_optimizer(optim_config(weight_decay=0.5, warmup_frac=0.0, min_lr_frac=1.0),
                                       [r"dense/.*", r"attention_norm/.*", r"embed_tokens/.*"], params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
    # With zero gradients the AdamW update is exactly -lr * wd * p where decay applies.
    expect = {"dense": {"kernel": -5e-4, "bias": 0.0}, "attention_norm": {"scale": 0.0},
              "embed_tokens": {"embedding": 0.0}, "frozen": {"kernel": 0.0}}
    for (path, u), e in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(expect)):
        np.testing.assert_allclose(u, np.full(3, e), rtol=1e-6, err_msg=optimizer_lib.path_str(path))


@pytest.fixture(scope="module")
def tiny():
    """The tiny LLM's params, initialised once on a data=2 x tensor=4 mesh."""
    mesh = sharding.make_mesh(dict(data=2, tensor=4))
    config = tiny_config()
    spec = registry.build(config.model)
    with sharding.rules_context(mesh):
        boxed = jax.eval_shape(lambda r: spec.module.init(r, *spec.init_args)["params"],
                               jax.random.PRNGKey(0))
        param_sh = sharding.tree_shardings(boxed, mesh)
        params = jax.jit(lambda r: sharding.unbox(spec.module.init(r, *spec.init_args)["params"]),
                         out_shardings=param_sh)(jax.random.PRNGKey(0))
    return mesh, params


def tiny_config(*overrides):
    # No rematerialisation: the same numbers, a faster compile.
    return config_lib.apply_overrides(config_lib.load("configs/llm.py:tiny"), [
        "--config.data.seq_len=16", "--config.model.overrides.remat=none", *overrides])


@pytest.fixture(scope="module")
def stepped(tiny):
    """One step with accumulation 1 and five with 4 x 2, from the same state.

    Only decoder/ trains, with AdamW at eps=1e3: its update lr * g / (|g| + eps)
    is then linear in the gradient to 1e-5, so equal gradients show as equal
    updates (at eps=1e-8 the first update is about lr * sign(g), and float32
    rounding decides the sign of entries that nearly cancel). lr=1e4 makes the
    updates (~3e-2) dwarf the float32 rounding of the params they are added to.
    """
    mesh, params = tiny
    spec = registry.build(tiny_config().model)
    optim = optim_config(lr=1e4, eps=1e3, warmup_frac=0.0, schedule="constant")
    with sharding.rules_context(mesh):
        opt = optimizer_lib.make_optimizer(optim, [r"decoder/.*"], params, 100)
        _, shardings = step_lib.abstract_state(spec.module, spec.init_args, spec.init_kwargs, opt.tx, mesh,
                                               ema=True)
        state = step_lib.state_from_params(params, opt.tx, shardings, jax.random.PRNGKey(1))
        specs = spec.batch_specs(8, 16)
        batch_sh = {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in specs.items()}
        steps = {accum: step_lib.make_train_step(spec.loss_fn, opt.tx, shardings, batch_sh, accum,
                                                 donate=False, trainable=opt.trainable, ema_decay=0.5)
                 for accum in (1, 4)}
        batches = synthetic.make_data(tiny_config(), 0, 1)
        first = sharding.global_batch(next(batches), mesh)
        one_big = steps[1](state, first)
        history = [steps[4](state, first)]
        for _ in range(4):
            history.append(steps[4](history[-1][0], sharding.global_batch(next(batches), mesh)))
    return shardings, state, one_big, history


def by_path(tree):
    return {optimizer_lib.path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight(stepped):
    _, state, (big, big_metrics), history = stepped
    micro, micro_metrics = history[0]
    before, u1, u4 = by_path(state.params), by_path(big.params), by_path(micro.params)
    diff = math.sqrt(sum(np.sum((u1[p].astype(np.float64) - u4[p]) ** 2) for p in before))
    norm = math.sqrt(sum(np.sum((u1[p].astype(np.float64) - before[p]) ** 2) for p in before))
    assert norm > 0
    assert diff / norm <= 1e-6, diff / norm
    assert float(micro_metrics["loss"]) == pytest.approx(float(big_metrics["loss"]), rel=1e-6)
    assert float(micro_metrics["grad_norm"]) == pytest.approx(float(big_metrics["grad_norm"]), rel=1e-6)


def test_frozen_params_are_bit_identical_and_have_no_optimizer_state(stepped):
    shardings, state, _, history = stepped
    final = history[-1][0]
    before, after = by_path(state.params), by_path(final.params)
    for path in after:
        if path in FROZEN:
            assert np.array_equal(before[path], after[path]), path
        else:
            assert path.startswith("decoder/") and not np.array_equal(before[path], after[path]), path

    opt_paths = [optimizer_lib.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(final.opt_state)]
    for path in FROZEN:
        assert not any(p.endswith(path) for p in opt_paths), path
    for path in after:
        if path.startswith("decoder/"):
            assert sum(p.endswith("/" + path) for p in opt_paths) == 2, path   # Adam's mu and nu

    # Moments live where their parameter lives (heads are split over `tensor`).
    param_sh = by_path_sharding(shardings.params)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in param_sh.values())
    for kp, leaf in jax.tree_util.tree_leaves_with_path(final.opt_state):
        path = optimizer_lib.path_str(kp)
        owner = [p for p in param_sh if path.endswith("/" + p)]
        if owner:
            assert leaf.sharding.spec == param_sh[owner[0]].spec, path

    # The EMA equals the params where they never move, and lags where they do.
    ema = by_path(final.ema_params)
    assert all(np.array_equal(ema[p], after[p]) for p in FROZEN)
    assert not np.array_equal(ema["decoder/layers/mlp/wo/kernel"], after["decoder/layers/mlp/wo/kernel"])


def by_path_sharding(tree):
    return {optimizer_lib.path_str(kp): s for kp, s in jax.tree_util.tree_leaves_with_path(tree)}
