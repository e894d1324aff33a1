"""`evejax bench lm` at a toy size: both frameworks run and the reported figures agree with each other."""
import pytest

from evejax import bench
from evejax.models import llm

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_parse_options():
    assert bench.parse_options("remat=full, scan_unroll=2,matmul_2d=False") == dict(
        remat="full", scan_unroll=2, matmul_2d=False)
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_options("remat")


def test_lm_bench_toy_size():
    res = bench.run_lm("llama_tiny", batch=2, seq_len=16, steps=1, repeats=2, matmul_size=64,
                       variants=[dict(remat="full", matmul_2d=False)], warmup=1)
    assert res.variants[0] == bench.BENCH_OPTIONS
    assert res.variants[1] == dict(bench.BENCH_OPTIONS, remat="full", matmul_2d=False)
    assert len(res.jax_step_s) == 2 and all(len(s) == 2 for s in res.jax_samples)
    assert min(res.jax_step_s) > 0 and res.torch_step_s > 0
    assert res.flops_per_step == llm.training_flops_per_step(llm.get_config("llama_tiny"), 2, 16)
    assert len(res.jax_faults) == 2 and min(res.jax_faults + [res.torch_faults]) >= 0
    # Each worker set up host memory before its framework started.
    assert res.allocator.startswith(("glibc malloc keeps", "system allocator (not glibc)")), res.allocator
    assert res.peak_flops == max(res.jax_matmul_flops, res.torch_matmul_flops) > 0
    s = res.jax_step_s[0]
    assert res.tokens_per_s(s) == pytest.approx(32 / s)
    assert res.fraction_of_peak(s) == pytest.approx(res.flops_per_step / s / res.peak_flops)
    # Both start from random weights on the same tokens: losses near log(vocab) = 5.5.
    assert all(abs(x - 5.5) < 1.0 for x in res.jax_loss + [res.torch_loss])
    table = bench.format_lm(res)
    assert "x torch tokens/s" in table and "fraction of peak" in table and "variant 1" in table
    assert "page faults/step" in table and res.allocator in table
