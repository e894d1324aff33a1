"""Mesh construction and sharded-step equivalence on 8 fake CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax import sharding
from evejax.models import llm
from evejax.models import losses
from evejax.train import step as train_step


def test_mesh_resolves_rest_and_names_mismatch():
    assert sharding.mesh_shape({"data": -1, "tensor": 2}, 8) == {"slice": 1, "data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match=r"does not fit 8 devices.*3"):
        sharding.mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match=r"has 4 devices but 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not known"):
        sharding.mesh_shape({"model": 8}, 8)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}


def test_logical_spec_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 6, 16), mesh)
    assert tuple(spec) == ("fsdp", None, None)  # 6 heads do not split over tensor=4
    spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh)
    assert tuple(spec) == ("fsdp", "tensor", None)


@functools.lru_cache(maxsize=None)
def _single_device():
    return _loss_and_grads({}, jax.devices()[:1])


def _loss_and_grads(mesh_spec, devices):
    cfg = llm.get_config("llama_tiny", remat="full")
    model = llm.CausalLM(cfg)
    mesh = sharding.make_mesh(mesh_spec, devices)
    batch = losses.dummy_lm_batch(8, 32, cfg.vocab_size, seed=1)
    loss_fn = losses.lm_loss_fn(model)
    init_args = (jnp.zeros((1, 8), jnp.int32),)
    opt = train_step.adamw(1e-3)
    with sharding.rules_context(mesh):
        _, sh = train_step.abstract_state(model, init_args, {}, opt, mesh)
        state = train_step.init_state(model, init_args, {}, opt, sh, jax.random.PRNGKey(0))
        gb = sharding.global_batch(batch, mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(2))[0]),
                     in_shardings=(sh.params, {k: sharding.batch_sharding(mesh) for k in batch}),
                     out_shardings=(None, sh.params))
        loss, grads = fn(state.params, gb)
    return float(loss), jax.tree.map(np.asarray, grads), sh.params


@pytest.mark.parametrize("mesh_spec", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_loss_and_grads_equal_single_device(mesh_spec):
    ref_loss, ref_grads, _ = _single_device()
    loss, grads, shardings = _loss_and_grads(mesh_spec, jax.devices())
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        rel = np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-12)
        assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)
    if "fsdp" in mesh_spec:
        spec = shardings["decoder"]["layers"]["mlp"]["wi_gate"]["kernel"].spec
        assert "fsdp" in jax.tree.leaves(tuple(spec))


def test_7b_params_over_1mib_are_sharded_under_fsdp8():
    cfg = llm.get_config("vicuna_7b", dtype="bfloat16")
    model = llm.CausalLM(cfg)
    mesh = sharding.make_mesh({"fsdp": 8})
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(boxed, mesh)
    shapes = sharding.unbox(boxed)
    total = 0
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
        total += leaf.size
        if leaf.size * 4 > 2**20:
            assert "fsdp" in jax.tree.leaves(tuple(sh.spec)), jax.tree_util.keystr(path)
    assert total == 6_738_415_616  # LLaMA-2-7B, reference/eve.md §5


def test_global_batch_splits_over_data_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    arr = sharding.global_batch({"x": np.arange(16).reshape(8, 2)}, mesh)["x"]
    assert arr.shape == (8, 2)
    assert len({str(s.index) for s in arr.addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(arr), np.arange(16).reshape(8, 2))
