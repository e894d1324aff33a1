"""De-focus Attention Networks classifiers (evejax/models/dan.py): sizes from shapes, the drop-path
rate per layer and the auxiliary loss against their closed forms, token order, padding, errors."""
import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from evejax import plan
from evejax.models import dan, registry
from evejax.sharding import unbox


@pytest.mark.parametrize("size,count", [("mamba_s", 25_092_944), ("mamba_b", 92_650_832),
                                        ("mamba_l", 330_117_840)])
def test_param_counts_from_shapes(size, count):
    # reference/dan.md §12: the official build_model counts (README 25.1M, 92.7M, 330.1M).
    assert dan.param_count(dan.get_config(size)) == count


def test_small_with_the_official_config_default_width_is_49m():
    assert dan.param_count(dan.get_config("mamba_s", intermediate_size=1536)) == 49_109_840


TINY = ["mamba_tiny", "vit_tiny"]


@functools.lru_cache(maxsize=None)
def _params(size="mamba_tiny"):
    # No position embedding, so one parameter tree serves every image size.
    model = dan.DANClassifier(dan.get_config(size))
    return unbox(jax.jit(model.init)(jax.random.PRNGKey(1), *dan.init_inputs(model.cfg))["params"])


@functools.lru_cache(maxsize=None)
def _forward(cfg, train: bool):
    """Jitted forward; in training mode (drop path on, fixed dropout key) it takes the maximum rate."""
    model = dan.DANClassifier(cfg)
    if not train:
        return jax.jit(lambda p, x: model.apply({"params": p}, x))
    return jax.jit(lambda p, x, r: model.apply({"params": p}, x, deterministic=False, drop_path_rate=r,
                                               rngs={"dropout": jax.random.PRNGKey(5)}))


def _tiny(size="mamba_tiny", **kw):
    cfg = dan.get_config(size, **kw)
    return cfg, _params(size), jax.random.normal(jax.random.PRNGKey(0), (3, *cfg.image_size, 3))


def test_drop_path_rate_per_layer_is_linear_over_depth():
    np.testing.assert_allclose(dan.drop_path_rates(0.75, 24), 0.75 * np.arange(24) / 23, rtol=1e-6)
    assert float(dan.drop_path_rates(0.3, 1)[0]) == 0.0
    # End to end with depth 2 and maximum rate 1: block 0 (rate 0) always runs, block 1 (rate 1)
    # is always dropped, so the output is the model with block 1's branch zeroed.
    cfg, params, pixels = _tiny()
    train = _forward(cfg, True)
    dropped = train(params, pixels, jnp.float32(1.0))
    mixer = params["blocks"]["mixer"]
    zeroed = {**params, "blocks": {**params["blocks"], "mixer": {
        **mixer, "out_proj": {"kernel": mixer["out_proj"]["kernel"].at[1].set(0.0)}}}}
    np.testing.assert_allclose(dropped.logits, _forward(cfg, False)(zeroed, pixels).logits, rtol=1e-5, atol=1e-6)
    # The maximum rate is a runtime input: a schedule over epochs compiles once.
    np.testing.assert_allclose(train(params, pixels, jnp.float32(0.0)).logits,
                               _forward(cfg, False)(params, pixels).logits, rtol=1e-5, atol=1e-6)
    assert train._cache_size() == 1


def test_auxiliary_loss_equals_its_closed_form():
    rng = np.random.default_rng(0)
    logits, token_logits = rng.normal(size=(3, 5)), rng.normal(size=(3, 4, 5))
    targets = rng.dirichlet(np.ones(5), size=3)
    weights = np.array([1.0, 1.0, 0.0])  # the last row is padding
    loss, ce, aux, weight = dan.classification_loss(
        dan.DANOutput(jnp.asarray(logits, jnp.float32), jnp.asarray(token_logits, jnp.float32)),
        jnp.asarray(targets, jnp.float32), jnp.asarray(weights))
    log_softmax = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))  # noqa: E731
    ce_rows = -(targets * log_softmax(logits)).sum(-1)
    aux_rows = -(targets[:, None] * log_softmax(token_logits)).sum(-1).mean(-1)
    np.testing.assert_allclose(ce, ce_rows[:2].mean(), rtol=1e-6)
    np.testing.assert_allclose(aux, aux_rows[:2].mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, (ce_rows[:2].mean() + aux_rows[:2].mean()) / 2, rtol=1e-6)
    assert float(weight) == 2.0


@pytest.mark.parametrize("size", TINY)
def test_class_token_last_and_causal_raster_order(size):
    cfg, params, pixels = _tiny(size)
    out = _forward(cfg, False)(params, pixels)
    assert out.logits.shape == (3, 10) and out.token_logits.shape == (3, cfg.num_patches, 10)
    # Changing the last patch (bottom-right) leaves every earlier image token's logits unchanged
    # and changes the class token's: it comes after every patch.
    p = cfg.patch_size
    changed = _forward(cfg, False)(params, pixels.at[:, -p:, -p:].add(1.0))
    np.testing.assert_allclose(changed.token_logits[:, :-1], out.token_logits[:, :-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed.logits, out.logits, atol=1e-4)


def test_right_padding_is_exact_and_non_square_images_work():
    cfg, params, pixels = _tiny(image_size=(16, 40))
    assert cfg.num_patches == 10
    out = _forward(cfg, False)(params, pixels)
    padded = _forward(cfg.replace(pad_length_to=8), False)(params, pixels)
    np.testing.assert_allclose(padded.logits, out.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded.token_logits, out.token_logits, rtol=1e-5, atol=1e-6)


def test_mamba_matmul_2d_gives_the_same_output():
    from evejax.nn.mamba import MambaConfig, MambaMixer

    cfg = MambaConfig(embed_dim=16, intermediate_size=32, state_size=4, time_step_rank=4, group_norm_size=16)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    params = jax.jit(MambaMixer(cfg).init)(jax.random.PRNGKey(0), x)
    flat, plain = (jax.jit(MambaMixer(dataclasses.replace(cfg, matmul_2d=m)).apply) for m in (True, False))
    np.testing.assert_allclose(flat(params, x), plain(params, x), rtol=1e-5, atol=1e-6)


def test_image_size_not_divisible_by_patch_size_is_named():
    with pytest.raises(ValueError, match=r"image size 224x100 is not divisible by the patch size 16"):
        dan.get_config("mamba_b", image_size=(224, 100))
    with pytest.raises(ValueError, match=r"no field\(s\) \['depthh'\]"):
        dan.get_config("mamba_b", depthh=3)
    with pytest.raises(ValueError, match=r"image size 224x230 is not divisible by the patch size 16"):
        dan.get_config("vit_b", image_size=(224, 230))


def test_registry_entry_loss_metrics_and_batch_contract():
    spec = registry.build(ml_collections.ConfigDict(dict(name="dan", size="mamba_tiny",
                                                         overrides=dict(drop_path=1.0))))
    params = _params()
    pixels = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
    labels = jnp.array([3, 7, -1], jnp.int32)
    probs = jax.nn.one_hot(jnp.maximum(labels, 0), 10) * (labels >= 0)[:, None]
    loss_fn = jax.jit(spec.loss_fn)
    rng = jax.random.PRNGKey(2)
    by_label = loss_fn(params, {"pixels": pixels, "label": labels}, rng)
    by_probs = loss_fn(params, {"pixels": pixels, "label_probs": probs}, rng)
    np.testing.assert_allclose(by_label[0], by_probs[0], rtol=1e-6)
    loss, metrics = by_label
    assert set(metrics) == {"ce", "aux_ce", "accuracy", "weight"} and float(metrics["weight"]) == 2.0
    np.testing.assert_allclose(loss, (metrics["ce"] + metrics["aux_ce"]) / 2, rtol=1e-6)
    # The step's maximum drop-path rate comes with the batch: at 0 the loss is the eval model's.
    out = _forward(dan.get_config("mamba_tiny"), False)(params, pixels)
    want = dan.classification_loss(out, probs, labels >= 0)[0]
    at_zero = loss_fn(params, {"pixels": pixels, "label": labels, "drop_path_rate": jnp.float32(0.0)}, rng)[0]
    np.testing.assert_allclose(at_zero, want, rtol=1e-5)
    assert abs(float(by_label[0]) - float(want)) > 1e-4  # absent: the config's 1.0 drops the last block
    shapes = spec.batch_specs(4, 0)
    assert shapes["pixels"].shape == (4, 32, 32, 3) and shapes["label"].shape == (4,)


def test_analytic_flops_of_tiny_by_hand():
    # mamba_tiny: d 32, E 64, N 8, R 4, K 4, depth 2, 16 patches of 8 x 8 x 3, 10 classes, linear heads.
    block = 32 * 128 + 64 * 4 + 64 * (4 + 16) + 4 * 64 + 3 * 64 * 8 + 64 * 32     # 9472
    macs = 16 * 192 * 32 + 2 * 17 * block + 17 * 32 * 10                          # 420,352
    assert dan.training_flops(dan.get_config("mamba_tiny"), 2) == 6 * 2 * macs


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="compiling for a TPU topology needs libtpu")
def test_plan_compiles_the_tiny_step_for_v5p_8():
    config = ml_collections.ConfigDict(dict(model=dict(name="dan", size="mamba_tiny", overrides=dict()),
                                            mesh=dict(slice=1, data=-1, fsdp=1, tensor=1)))
    topo = plan.parse_topology("v5p-8")
    p = plan.Planner(config, topo, plan.virtual_devices(topo), effort="fast")("full", 2, 0)
    assert p.fits and p.global_batch == 8 and p.temp_bytes > 0
    assert p.model_flops == pytest.approx(dan.training_flops(dan.get_config("mamba_tiny"), 8) / 4)
