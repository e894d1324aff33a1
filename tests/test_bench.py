"""`evejax bench lm|hovle` at toy sizes: both frameworks run, the reported figures agree with each
other, and a family's two steps compute the same loss on the same weights and batch."""
import pytest

from evejax import bench
from evejax.models import llm
from evejax.models import registry

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_parse_options():
    assert bench.parse_options("remat=full, scan_unroll=2,matmul_2d=False") == dict(
        remat="full", scan_unroll=2, matmul_2d=False)
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_options("remat")


def test_cpu_model_names_the_generation_and_vector_unit():
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n" \
           "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert bench.cpu_model(zen4) == "AMD EPYC (family 25 model 17, AVX-512)"
    raspberry_pi = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    assert bench.cpu_model(raspberry_pi) == "Raspberry Pi 4 Model B Rev 1.4 (NEON)"


def test_lm_bench_toy_size():
    res = bench.run_lm("llama_tiny", batch=2, seq_len=16, steps=1, repeats=2, matmul_size=64,
                       variants=[dict(remat="full", matmul_2d=False)], warmup=1)
    assert res.variants[0] == dict(bench.BENCH_OPTIONS, xla_causal_blocks=4)
    assert res.variants[1] == dict(bench.BENCH_OPTIONS, xla_causal_blocks=4, remat="full", matmul_2d=False)
    assert len(res.jax_step_s) == 2 and all(len(s) == 2 for s in res.jax_samples)
    assert min(res.jax_step_s) > 0 and res.torch_step_s > 0
    assert res.flops_per_step == llm.training_flops_per_step(llm.get_config("llama_tiny"), 2, 16)
    assert len(res.jax_faults) == 2 and min(res.jax_faults + [res.torch_faults]) >= 0
    # Each worker set up host memory before its framework started.
    assert res.allocator.startswith(("glibc malloc keeps", "system allocator (not glibc)")), res.allocator
    assert res.peak_flops == max(res.jax_matmul_flops, res.torch_matmul_flops) > 0
    s = res.jax_step_s[0]
    assert res.per_second(s) == pytest.approx(32 / s)
    assert res.fraction_of_peak(s) == pytest.approx(res.flops_per_step / s / res.peak_flops)
    # Both start from random weights on the same tokens: losses near log(vocab) = 5.5.
    assert all(abs(x - 5.5) < 1.0 for x in res.jax_loss + [res.torch_loss])
    table = bench.format_result(res)
    assert "x torch tokens/s" in table and "fraction of peak" in table and "variant 1" in table
    assert "page faults/step" in table and res.allocator in table
    assert f"machine: {bench.cpu_model()}," in table and "first loss" not in table  # own inits


def test_hovle_bench_steps_agree_and_the_table():
    """The comparison is fair: the PyTorch reference holds the evejax step's initial weights (moved
    by the port) and reads the same batch, so both first losses agree, and so do the losses
    after the three clipped AdamW steps each ran (one warm-up, two measured)."""
    res = bench.run_bench("hovle", "tiny", batch=2, seq_len=32, steps=1, repeats=2, matmul_size=64, warmup=1)
    assert res.same_weights and res.unit == "tokens" and res.units_per_step == 64
    assert res.torch_first_loss == pytest.approx(res.jax_first_loss[0], rel=1e-5)
    assert res.torch_loss == pytest.approx(res.jax_loss[0], rel=1e-5)
    assert res.jax_loss[0] < res.jax_first_loss[0]  # the steps train
    spec = registry.build(bench.model_config(bench.BENCHES["hovle"], "tiny"))
    assert res.flops_per_step == spec.flops_per_step(2, 32) > 0
    assert min(res.jax_step_s) > 0 and res.torch_step_s > 0 and len(res.torch_samples) == 2
    table = bench.format_result(res)
    assert table.startswith("evejax bench hovle: tiny (embedding 2 + LLM 2 InternLM2 layers")
    assert f"machine: {res.cpu}," in table and res.cpu == bench.cpu_model() != ""
    for row in ("tokens/s", "x torch tokens/s", "fraction of peak", "first loss", "last loss"):
        assert row in table
    assert "InternVLChatModel" in table


def test_unknown_bench_is_named():
    with pytest.raises(ValueError, match="no entry 'dann'.*hovle"):
        bench.run_bench("dann")
    assert bench.main(["dann"]) == 2


def test_dan_entry_steps_compute_the_same_loss():
    """`evejax bench dan`'s two steps, built in-process at the tiny size: the PyTorch reference holds
    the evejax step's initial weights (moved by port.dan.to_torch) and reads the same pixels and
    labels, so the first losses (the official CE mix) agree; both scan timers run at the step's shapes."""
    entry = bench.BENCHES["dan"]
    jax_step = entry.jax_step("mamba_tiny", 2, 0, entry.options)
    state = entry.to_torch(jax_step.params(), jax_step.config)
    torch_step = entry.torch_step("mamba_tiny", 2, 0, state)
    jax_step.step()
    torch_step.step()
    assert torch_step.first_loss == pytest.approx(jax_step.first_loss, rel=1e-5)
    assert 1.5 < jax_step.first_loss < 3.5  # near log(10 classes) from a fresh init, not a degenerate 0
    assert jax_step.config.drop_path == 0.0 == torch_step.config.drop_path  # the reference has none
    for kind, cfg in (("jax", jax_step.config), ("torch", torch_step.config)):
        scan, calls = entry.part(kind, cfg, 2, 0)
        scan()
        assert calls == cfg.depth == 2
    # The reference with mamba_ssm's own token slicing computes the same step.
    literal = entry.torch_step("mamba_tiny", 2, 0, state, reference_options=dict(scan="mamba_ssm"))
    literal.step()
    assert literal.first_loss == pytest.approx(jax_step.first_loss, rel=1e-5)
    assert "slicing 'mamba_ssm'" in literal.label and "slicing 'time_major'" in torch_step.label
    assert literal.model.blocks[0].mixer.config.scan_slicing == "mamba_ssm"
    with pytest.raises(ValueError, match=r"reference has no option\(s\) \['scna'\]; it takes \['scan'\]"):
        bench.run_bench("dan", reference_options=dict(scna="mamba_ssm"))


def test_generate_bench_same_tokens_and_the_table():
    """`evejax bench generate`: evejax's batched greedy decoding and the PyTorch reference's (the
    reference EVE's splice + transformers' cached generate) on the same weights and prompts give
    the same tokens, row for row, and the table reports rates of new tokens."""
    from evejax import config as config_lib

    demo = config_lib.load("demo.py:stage3").model.overrides.to_dict()
    assert bench.DEMO_EVE_OVERRIDES == dict(demo, with_pal=False)  # the demo's EVE, inference form
    res = bench.run_bench("generate", "demo", batch=4, seq_len=6, steps=1, repeats=1, matmul_size=64, warmup=1)
    assert res.same_weights and res.unit == "tokens" and res.units_per_step == 4 * 6
    assert res.output_rows == 4 and res.same_rows == [4]
    assert res.torch_loss is None and min(res.jax_step_s) > 0 and res.torch_step_s > 0
    table = bench.format_result(res)
    assert table.startswith("evejax bench generate: demo (LLM d 128, 4 layers")
    assert "4 prompts x 6 new tokens, float32, batched greedy decoding" in table
    assert "rows = torch's" in table and "4/4" in table and "last loss" not in table
    assert f"latency ms/token {1e3 * res.jax_step_s[0] / 6:.1f}" in " ".join(table.split())
    assert "LlamaForCausalLM.generate, KV cache" in table and "the registry's count at that length / 3" in table


def test_profile_of_the_tiny_lm_step_accounts_for_every_matmul():
    """The trace's thunks, grouped by part, hold each dot as often as the step runs it: their FLOPs
    add up to what evejax.plan counts in the same compiled HLO (layer loop counted per layer)."""
    from evejax import plan, step_profile

    step = bench.BENCHES["lm"].jax_step("llama_tiny", 2, 16, bench.BENCH_OPTIONS)
    step.step()
    hlo = step.train_step.lower(step.state, step.batch).compile().as_text()
    rows = step_profile.profile(step.step, hlo)
    parts = {(r.part, r.kind) for r in rows}
    for part in ("MLP", "LM head", "attention projections", "attention core (scores, softmax)"):
        assert (part, "matmul") in parts
    assert ("AdamW update, clipping", "other ops") in parts and ("other", "matmul") not in parts
    assert sum(r.flops for r in rows) == pytest.approx(plan.step_cost(hlo, 1).matmul_flops, rel=1e-9)
    assert all(r.seconds > 0 for r in rows)
    table = step_profile.format_rows(rows, peak_flops=1e10)
    assert table.splitlines()[0].startswith("part") and "busy" in table.splitlines()[-1]
