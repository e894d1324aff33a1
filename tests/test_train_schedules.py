"""Per-step scalars made inside the train step (DAN's drop-path maximum over epochs), the warmup's
starting learning rate, and the EMA of the params, against their closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from ml_collections import ConfigDict

from evejax import sharding
from evejax.train import optimizer as optimizer_lib
from evejax.train import step as step_lib


def test_the_drop_path_maximum_per_epoch_equals_its_closed_form():
    # De-focus Mamba-B: 0.1 -> 0.75 over 300 epochs; the official run prints these (dan.md §12).
    rate = optimizer_lib.epoch_linear(0.1, 0.75, 300, 1251)
    for epoch, want in ((0, 0.1), (150, 0.426087), (299, 0.75)):
        for count in (epoch * 1251, epoch * 1251 + 1250):
            np.testing.assert_allclose(float(rate(count)), want, atol=1e-6)
    assert float(rate(300 * 1251 + 7)) == np.float32(0.75)   # past the end: the last epoch's value
    np.testing.assert_allclose([float(rate(e * 1251)) for e in range(300)],
                               [0.1 + e / 299 * 0.65 for e in range(300)], atol=1e-6)
    constant = optimizer_lib.epoch_linear(0.4, 0.4, 90, 5)   # the IN-21k pre-train's constant 0.4
    assert {float(constant(c)) for c in range(0, 450, 7)} == {np.float32(0.4)}


def test_the_warmup_starts_from_warmup_init_frac_of_the_peak():
    optim = ConfigDict(dict(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.01, warmup_init_frac=0.001,
                            schedule="cosine"))
    lr = optimizer_lib.make_schedule(optim, 100)
    np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10)), float(lr(100))],
                               [1e-6, 1e-6 + 0.5 * (1e-3 - 1e-6), 1e-3, 1e-5], rtol=1e-5)
    np.testing.assert_allclose(float(lr(55)), 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)), rtol=1e-5)


class Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("w", nn.initializers.ones, (4,))


def test_the_step_feeds_scheduled_scalars_to_every_micro_batch_and_keeps_the_ema():
    mesh = sharding.make_mesh(dict(data=-1))
    module, tx = Scale(), optax.sgd(0.1)

    def loss_fn(params, batch, rng):
        # The loss reads the scheduled rate: the gradient is 2 * rate * w.
        rate = batch["drop_path_rate"]
        loss = rate * jnp.sum(params["w"] ** 2) + 0.0 * jnp.sum(batch["x"])
        return loss, {"seen_rate": rate}

    schedules = {"drop_path_rate": optimizer_lib.epoch_linear(0.1, 0.5, 3, 2)}
    with sharding.rules_context(mesh):
        _, shardings = step_lib.abstract_state(module, (jnp.zeros((1, 4)),), {}, tx, mesh, ema=True)
        state = step_lib.init_state(module, (jnp.zeros((1, 4)),), {}, tx, shardings, jax.random.PRNGKey(0))
        batch = {"x": jax.device_put(jnp.zeros((8, 4)), sharding.batch_sharding(mesh, 2))}
        for accum in (1, 2):
            step = step_lib.make_train_step(loss_fn, tx, shardings, {"x": sharding.batch_sharding(mesh, 2)},
                                            accum, donate=False, ema_decay=0.9, batch_scalars=schedules)
            s, w, ema = state, np.ones(4), np.ones(4)
            for count, want in enumerate([0.1, 0.1, 0.3, 0.3, 0.5, 0.5, 0.5]):
                s, metrics = step(s, batch)
                np.testing.assert_allclose(float(metrics["seen_rate"]), want, rtol=1e-6)
                np.testing.assert_allclose(float(metrics["drop_path_rate"]), want, rtol=1e-6)
                w = w - 0.1 * 2 * want * w
                ema = 0.9 * ema + 0.1 * w
                np.testing.assert_allclose(np.asarray(s.params["w"]), w, rtol=1e-5)
                np.testing.assert_allclose(np.asarray(s.ema_params["w"]), ema, rtol=1e-5)
