"""`evejax bench data`: the required-rate arithmetic and a tiny run."""
import pytest

from evejax.data import bench


def test_required_rate_for_eve_7b_stage2_on_v5p_64():
    per_example = 6 * 7.0e9 * 700 + 2 * 0.3e9 * 577
    need = bench.required_rate(per_example * 512, chips=32, peak_flops=459e12, mfu=0.5, global_batch=512, hosts=8)
    assert need["step_time_s"] == pytest.approx(per_example * 512 / (32 * 459e12 * 0.5))
    assert need["examples_per_s"] == pytest.approx(246.9, abs=0.1)
    assert need["examples_per_s_per_host"] == pytest.approx(30.86, abs=0.01)


def test_bench_runs_on_tiny_images(capsys):
    argv = ["--examples", "8", "--batch", "2", "--batches", "2", "--workers", "0", "--source-size", "64x48",
            "--image-size", "56", "--teacher-size", "28", "--seq-len", "256"]
    assert bench.bench_data(argv) == 0
    out = capsys.readouterr().out
    assert "llava" in out and "arrayrecord" in out and "30.9 examples/s per host" in out
