"""`evejax plan`: slice names, the batch search, and AOT compiles of the tiny LM for a virtual TPU slice."""
import importlib.util

import pytest

from evejax import config as config_lib
from evejax import plan

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU topology needs libtpu (pip install -e .[tpu]; CI installs it)")


@pytest.mark.parametrize("name, chips, libtpu_name", [
    ("v5p-8", 4, "v5:2x2x1"), ("v5p-64", 32, "v5:2x4x4"), ("v5p-128", 64, "v5:4x4x4"),
    ("v4-8", 4, "v4:2x2x1"), ("v4-128", 64, "v4:4x4x4"), ("v5e-8", 8, "v5e:2x4"),
    ("v5e-256", 256, "v5e:16x16"), ("v6e-256", 256, "v6e:16x16"), ("v5litepod-16", 16, "v5e:4x4"),
])
def test_topology_names(name, chips, libtpu_name):
    topo = plan.parse_topology(name)
    assert (topo.chips, topo.libtpu_name) == (chips, libtpu_name)


@pytest.mark.parametrize("name", ["v5p-9", "v5p-4", "v3-8", "h100-8", "v5e-24"])
def test_unknown_topologies_fail(name):
    with pytest.raises(ValueError, match=name):
        plan.parse_topology(name)


@pytest.mark.parametrize("memory", [
    lambda b: 10 + 3 * b, lambda b: 60 + b, lambda b: 10 + b + 0.05 * b * b, lambda b: 10 + 30 * b ** 0.5])
@pytest.mark.parametrize("hbm", [12, 100, 1000, 5000])
def test_search_finds_the_largest_fitting_batch(memory, hbm):
    def probe(b):
        m = memory(b)
        return plan.Plan("full", b, b, 1, fits=m <= hbm, total_bytes=int(m) if m <= hbm else None,
                         argument_bytes=10)

    best, probes = plan.largest_fitting(probe, hbm, max_batch=512)
    truth = max((b for b in range(1, 513) if memory(b) <= hbm), default=0)
    assert (best.batch_per_chip if best else 0) == truth
    assert len(probes) <= 10


def test_recommend_prefers_batch_then_less_remat():
    mk = lambda remat, b: plan.Plan(remat, b, b, 1, fits=True, total_bytes=1)  # noqa: E731
    assert plan.recommend({"none": mk("none", 2), "full": mk("full", 8)}).remat == "full"
    assert plan.recommend({"full": mk("full", 4), "save_dots": mk("save_dots", 4)}).remat == "save_dots"
    assert plan.recommend({"none": None}) is None


def _tiny_flops(global_batch, seq_len):
    """configs/llm.py:tiny by hand: d 64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU 128, vocab 256."""
    per_layer = 64 * 16 * (4 + 2 * 2) + 4 * 16 * 64 + 3 * 64 * 128  # q,k,v + out + gate,up,down = 36864
    matmul_params = 2 * per_layer + 64 * 256                          # + lm_head = 90112
    attention = 12 * global_batch * seq_len ** 2 * 4 * 16 * 2 / 2     # causal: half
    return 6 * matmul_params * global_batch * seq_len + attention


def test_analytic_flops_of_tiny_by_hand():
    assert _tiny_flops(8, 64) == 301_989_888


@needs_libtpu
def test_tiny_step_compiles_for_v5p_8():
    topo = plan.parse_topology("v5p-8")
    planner = plan.Planner(config_lib.load("configs/llm.py:tiny"), topo, plan.virtual_devices(topo),
                           effort="fast")
    p = planner("full", 2, 64)
    assert p.fits and p.global_batch == 8
    assert p.argument_bytes > 0 and p.temp_bytes > 0 and p.total_bytes >= p.argument_bytes
    assert p.xla_flops > 0
    assert p.model_flops == pytest.approx(_tiny_flops(8, 64) / 4)
    # What XLA runs per chip (2 rows of 64): full remat recomputes the forward (8 x params x tokens;
    # the lm_head's too, under the loss's remat) and the attention einsums are not halved.
    layers, lm_head, tokens = 2 * 36864, 64 * 256, 2 * 64
    attention = 2 * 2 * 64 * 64 * 4 * 16 * 2 * 4  # 2 einsums x 2 FLOPs x B T^2 N H L x (fwd, re-fwd, 2 bwd)
    assert p.cost.matmul_flops == pytest.approx(8 * (layers + lm_head) * tokens + attention, rel=1e-6)
    assert p.mesh == "data=4" and p.attention == "xla"


@needs_libtpu
def test_search_then_too_big_then_bad_mesh(capsys):
    rc = plan.main(["configs/llm.py:tiny", "--topology", "v4-8", "--search", "--policies", "none,full",
                    "--max-batch-per-chip", "4", "--effort", "fast"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "none: largest micro-batch per chip 4" in out and "full: largest micro-batch per chip 4" in out
    assert "recommended" in out

    # [B, heads, T, T] float32 attention probabilities alone: 1024 x 4 x 2048^2 x 4 B = 64 GiB per chip.
    rc = plan.main(["configs/llm.py:tiny", "--topology", "v4-8", "--seq-len", "2048",
                    "--batch-per-chip", "1024", "--remat", "none", "--effort", "fast"])
    out = capsys.readouterr().out
    assert rc == 1 and " no " in out

    rc = plan.main(["configs/llm.py:tiny", "--topology", "v5p-8", "--config.mesh.data=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit v5p-8 (4 chips)" in err and "'data': 3" in err


@needs_libtpu
def test_micro_batches_smaller_than_the_data_parallel_chips_are_refused_and_never_searched(capsys, monkeypatch):
    # 1 row per chip on 8 chips in 4 micro-batches: 2 rows for 8 fsdp chips. Refused before compiling.
    rc = plan.main(["configs/llm.py:tiny", "--topology", "v5e-8", "--batch-per-chip", "1",
                    "--config.train.accum_steps=4", "--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    out, err = capsys.readouterr()
    assert rc == 2 and "global batch" not in out
    assert "4 micro-batches of 2 rows" in err and "8 data-parallel chips (fsdp=8)" in err
    assert "multiple of 32" in err and "--batch-per-chip a multiple of 4" in err

    # --search probes rows per chip per micro-batch at the config's accum_steps, so every compiled
    # micro-batch has a whole number of rows on each of the 4 data-parallel chips of a v4-8.
    compiled = []
    real_call = plan.Planner.__call__

    def recording_call(self, remat, batch_per_chip, *args):
        p = real_call(self, remat, batch_per_chip, *args)
        compiled.append((p.global_batch, p.accum_steps))
        return p

    monkeypatch.setattr(plan.Planner, "__call__", recording_call)
    rc = plan.main(["configs/llm.py:tiny", "--topology", "v4-8", "--search", "--policies", "full",
                    "--max-batch-per-chip", "2", "--effort", "fast", "--config.train.accum_steps=2"])
    out = capsys.readouterr().out
    assert rc == 0 and compiled == [(8, 2), (16, 2)]
    assert "full: largest micro-batch per chip 2: micro-batch 8 rows, x 2 (accum_steps) = global batch 16" in out
    # The config's own global batch, 8, is one micro-batch of those 2 rows per chip.
    assert "global batch 8 (2 micro-batches in the config): 2 rows per chip per micro-batch" in out
    assert "--config.train.accum_steps=1" in out


def _scanned_fsdp_matmul_hlo(devices):
    """4 layers of x @ w[l], w [4, 256, 256] float32 sharded on its rows over n devices, x [64, 256]
    on its batch: the gradient step's optimised HLO."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from evejax import sharding

    mesh = sharding.make_mesh({"fsdp": len(devices)}, devices)
    w_sh = NamedSharding(mesh, P(None, "fsdp", None))
    w = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32, sharding=w_sh)
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))

    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
        return jnp.sum(h ** 2)

    return jax.jit(jax.grad(loss), out_shardings=w_sh).lower(w, x).compile().as_text()


def _check_fsdp_matmul_cost(cost, n, gathered_bytes):
    # Each layer all-gathers its weight forward and backward ((n-1)/n of it sent per chip each
    # time) and reduces the weight gradient (float32) across the n batch shards once; 3 matmuls per layer.
    count, sent = cost.collectives["all-gather"]
    assert count == 2 * 4 and sent == pytest.approx(2 * 4 * 256 * 256 * gathered_bytes * (n - 1) / n)
    count, sent = cost.collectives["all-reduce"]
    assert count == 4 and sent == pytest.approx(4 * 2 * 256 * 256 * 4 * (n - 1) / n)
    assert cost.matmul_flops == pytest.approx(4 * 3 * 2 * (64 // n) * 256 * 256)


def test_collective_counting_of_a_scanned_fsdp_matmul_on_8_cpu_devices():
    import jax

    cost = plan.step_cost(_scanned_fsdp_matmul_hlo(jax.devices()), 8)
    _check_fsdp_matmul_cost(cost, 8, gathered_bytes=4)
    assert cost.collective_bytes == pytest.approx(sum(b for _, b in cost.collectives.values()))


@needs_libtpu
def test_collective_counting_of_a_scanned_fsdp_matmul_compiled_for_v5p_8():
    # XLA:TPU writes no trip count on the loop, wraps the gradient's all-reduce in a fusion, and
    # gathers the float32 weights as bfloat16 (its default matmul precision).
    topo = plan.parse_topology("v5p-8")
    cost = plan.step_cost(_scanned_fsdp_matmul_hlo(plan.virtual_devices(topo)), topo.chips)
    _check_fsdp_matmul_cost(cost, 4, gathered_bytes=2)


@needs_libtpu
def test_windowed_matmul_loops_on_a_32_chip_ring_counted_once():
    """2 scanned layers of h = tanh(h @ w) @ w.T, w [512, 1024] bf16 sharded on its rows over the
    32 chips of a v5p-64, one row of 256 tokens per chip: XLA:TPU turns the weight gradients'
    reduce-scatters into windowed matmul loops unrolled to count by 2."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from evejax import sharding

    topo = plan.parse_topology("v5p-64")
    n, tokens, d, f = topo.chips, 256, 512, 1024
    mesh = sharding.make_mesh({"fsdp": n}, plan.virtual_devices(topo))
    rows = NamedSharding(mesh, P("fsdp", None, None))
    w = jax.ShapeDtypeStruct((2, d, f), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    x = jax.ShapeDtypeStruct((n, tokens, d), jnp.bfloat16, sharding=rows)

    def loss(w, x):
        def layer(h, wl):
            h = jnp.einsum("btf,df->btd", jnp.tanh(jnp.einsum("btd,df->btf", h, wl)), wl)
            return jax.lax.with_sharding_constraint(h, rows), None
        return jnp.sum(jax.lax.scan(layer, x, w)[0].astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile(
        compiler_options={"exec_time_optimization_effort": -1.0}).as_text()
    assert "windowed_dot_general" in hlo
    cost = plan.step_cost(hlo, n)
    # 2 layers x 2 matmuls x (forward, 2 backward), 2 tokens x d x f FLOPs each.
    assert cost.matmul_flops == pytest.approx(2 * 2 * 3 * 2 * tokens * d * f)
    # Each layer's two weight-gradient loops pass ~n-1 bf16 chunks of [d/n, f] around the ring,
    # what a ring reduce-scatter of the gradient sends (a 2x overcount before).
    chunk = d // n * f * 2
    assert cost.collectives["collective-permute"][1] == pytest.approx(2 * 2 * (n - 1) * chunk, rel=0.1)


def test_group_sizes_in_every_replica_group_form():
    assert plan._group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 8) == 4
    assert plan._group_size("replica_groups=[4,8]<=[32], dimensions={0}", 32) == 8
    assert plan._group_size("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, x", 8) == 4
    assert plan._group_size("channel_id=1, use_global_device_ids=true", 16) == 16


@needs_libtpu
@pytest.mark.parametrize("topology", ["v4-8", "v5e-4", "v5p-8", "v6e-4"])
def test_splash_default_blocks_compile_for_every_generation(topology):
    """The tiny LM at 1024 tokens (two 512 blocks) with splash: Mosaic compiles the kernel, whose
    attention FLOPs XLA does not see (the einsum path's exceed the model's)."""
    topo = plan.parse_topology(topology)
    planner = plan.Planner(config_lib.load("configs/llm.py:tiny"), topo, plan.virtual_devices(topo),
                           effort="fast")
    p = planner("none", 1, 1024, "splash")
    assert p.fits and p.attention == "splash"
    assert p.cost.matmul_flops < p.model_flops
    if topology == "v5p-8":
        einsum = planner("none", 1, 1024, "xla")
        assert einsum.cost.matmul_flops > einsum.model_flops
        assert p.temp_bytes < einsum.temp_bytes
