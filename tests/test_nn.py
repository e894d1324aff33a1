"""The shared core: RoPE layouts, masks as data, attention kernels, remat policies, DropPath."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.models import llm
from evejax.nn import attention, rope
from evejax.nn.layers import DropPath
from evejax.nn.transformer import REMAT_POLICIES


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-12))


def test_rope_layouts_are_a_permutation_of_each_other():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    # Interleaved pairs (2i, 2i+1) are rotate-half pairs (i, i+4) after this permutation.
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
    a = rope.apply_rope(x[..., perm], pos, layout="rotate_half")
    b = rope.apply_rope(x, pos, layout="interleaved")[..., perm]
    assert _rel(a, b) < 1e-6
    # Relative: <R(p)q, R(p+k)k> depends only on k.
    q, k = x[:1, :1], x[1:, :1]
    dots = [float(jnp.sum(rope.apply_rope(q, jnp.array([[p]])) * rope.apply_rope(k, jnp.array([[p + 2]]))))
            for p in (0, 3, 7)]
    assert np.allclose(dots, dots[0], rtol=1e-5)


def test_rope_dynamic_scaling_only_beyond_max_positions():
    short = rope.inverse_frequencies(8, 1e4, seq_len=32, scaling={"type": "dynamic", "factor": 2.0},
                                     max_position_embeddings=32)
    long = rope.inverse_frequencies(8, 1e4, seq_len=64, scaling={"type": "dynamic", "factor": 2.0},
                                    max_position_embeddings=32)
    plain = rope.inverse_frequencies(8, 1e4)
    np.testing.assert_array_equal(short, plain)
    assert np.all(np.asarray(long[1:]) < np.asarray(plain[1:]))
    # The length may be traced, so one compiled decode step serves every length so far.
    traced = jax.jit(lambda n: rope.inverse_frequencies(8, 1e4, seq_len=n, scaling={"type": "dynamic", "factor": 2.0},
                                                        max_position_embeddings=32))
    np.testing.assert_array_equal(traced(32), plain)
    np.testing.assert_allclose(traced(64), long, rtol=1e-6)
    with pytest.raises(ValueError, match="not known"):
        rope.inverse_frequencies(8, 1e4, scaling={"type": "yarn"})


def test_mask_semantics():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    idx = jnp.arange(5)[None]
    causal = attention.make_mask(seg, seg, idx, idx, causal=True)[0, 0]
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(causal, expected)
    full = attention.make_mask(seg, seg, idx, idx, causal=False)[0, 0]
    assert full[0, 1] and not full[0, 2] and not full[4].any()
    prefix = jnp.array([[True, True, False, False, False]])
    pm = attention.make_mask(seg, seg, idx, idx, causal=True, q_prefix=prefix, kv_prefix=prefix)[0, 0]
    assert pm[0, 1] and not pm[2, 3]


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped (GQA) and plain multi-head paths
def test_attention_impls_agree(kv_heads):
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(ks[0], (2, 6, 4, 8))
    k = jax.random.normal(ks[1], (2, 6, kv_heads, 8))
    v = jax.random.normal(ks[2], (2, 6, kv_heads, 8))
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 2, 2]])
    idx = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = attention.make_mask(seg, seg, idx, idx, causal=True)
    # Compiled: one program each instead of one per operation of an eager call.
    a, b = (jax.jit(lambda *qkv, impl=impl: attention.attend(*qkv, mask, scale=8 ** -0.5, impl=impl))(q, k, v)
            for impl in ("xla", "dot"))
    valid = np.asarray(seg > 0)
    assert _rel(np.asarray(a)[valid], np.asarray(b)[valid]) < 1e-5
    # Reference: repeat KV heads, plain softmax.
    rep = 4 // kv_heads
    kr, vr = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, kr) * 8 ** -0.5
    logits = jnp.where(mask, logits, -1e30)
    ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), vr)
    assert _rel(np.asarray(a)[valid], np.asarray(ref)[valid]) < 1e-5

    # Gradients (the multi-head path has a hand-written backward) against autodiff of the reference.
    def reference(q, k, v):
        kr, vr = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, kr) * 8 ** -0.5, -1e30)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), vr)

    weight = jax.random.normal(jax.random.PRNGKey(2), q.shape) * valid[:, :, None, None]
    loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * weight)
    got = jax.jit(jax.grad(loss(lambda *x: attention.attend(*x, mask, scale=8 ** -0.5)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5
    with pytest.raises(ValueError, match="not known"):
        attention.attend(q, k, v, mask, scale=1.0, impl="flash9")


@pytest.mark.parametrize("kv_heads, blocks, defocus", [(2, 2, None), (4, 4, "bias")])  # GQA and multi-head paths
def test_causal_blocks_skip_masked_keys_with_the_same_outputs_and_gradients(kv_heads, blocks, defocus):
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = jax.random.normal(ks[0], (2, 8, 4, 8))
    k = jax.random.normal(ks[1], (2, 8, kv_heads, 8))
    v = jax.random.normal(ks[2], (2, 8, kv_heads, 8))
    seg = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2]])
    idx = jnp.broadcast_to(jnp.arange(8), (2, 8))
    mask = attention.make_mask(seg, seg, idx, idx, causal=True)
    decay = None if defocus is None else -0.3 * jnp.abs(jax.random.normal(ks[3], (2, 4, 8, 8)))
    valid = np.asarray(seg > 0)
    weight = jax.random.normal(ks[4], q.shape) * valid[:, :, None, None]

    def run(c):
        f = lambda q, k, v: attention.attend(q, k, v, mask, scale=8 ** -0.5, decay=decay,  # noqa: E731
                                             decay_form=defocus or "scale", causal_blocks=c)
        return f(q, k, v), jax.grad(lambda *x: jnp.sum(f(*x) * weight), argnums=(0, 1, 2))(q, k, v)

    run = jax.jit(run, static_argnums=0)
    (out, grads), (out_blocked, grads_blocked) = run(1), run(blocks)
    assert _rel(np.asarray(out_blocked)[valid], np.asarray(out)[valid]) < 1e-6
    for g, w in zip(grads_blocked, grads):
        assert _rel(g, w) < 1e-6
    # Only the causal path takes blocks: the Attention module keeps one block under a prefix.
    layer = attention.Attention(num_heads=4, num_kv_heads=kv_heads, head_dim=8, xla_causal_blocks=blocks)
    x = jax.random.normal(ks[0], (2, 8, 16))
    params = layer.init(jax.random.PRNGKey(0), x, idx, seg)
    plain = attention.Attention(num_heads=4, num_kv_heads=kv_heads, head_dim=8)
    blocked_apply, plain_apply = jax.jit(layer.apply), jax.jit(plain.apply)
    assert _rel(np.asarray(blocked_apply(params, x, idx, seg))[valid],
                np.asarray(plain_apply(params, x, idx, seg))[valid]) < 1e-6
    prefix = jnp.broadcast_to(jnp.arange(8)[None] < 5, (2, 8))
    np.testing.assert_array_equal(blocked_apply(params, x, idx, seg, prefix), plain_apply(params, x, idx, seg, prefix))


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = llm.get_config("llama_tiny", remat="none")
    model = llm.CausalLM(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, model, params


def test_packed_rows_equal_separate_rows(tiny_lm):
    cfg, model, params = tiny_lm
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, cfg.vocab_size, 5), rng.integers(3, cfg.vocab_size, 7)
    packed = np.concatenate([a, b, [0, 0, 0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 7 + [0] * 4])
    apply = jax.jit(lambda tokens, segment_ids=None: model.apply({"params": params}, tokens, segment_ids=segment_ids))
    out = apply(jnp.asarray(packed), jnp.asarray(seg))
    la, lb = apply(jnp.asarray(a[None])), apply(jnp.asarray(b[None]))
    assert _rel(out[0, :5], la[0]) < 1e-5
    assert _rel(out[0, 5:12], lb[0]) < 1e-5
    np.testing.assert_array_equal(llm.segment_positions(jnp.asarray(seg))[0, :12],
                                  np.r_[np.arange(5), np.arange(7)])


def test_remat_policies_give_identical_gradients(tiny_lm):
    cfg, _, params = tiny_lm
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)))

    def grads(policy):
        model = llm.CausalLM(cfg.replace(remat=policy))
        # Compiled, as training runs it: a policy only decides what XLA keeps for the backward pass.
        return jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)

    ref = grads("none")
    for policy in ("full", "save_dots", "minimal"):
        for g, r in zip(jax.tree.leaves(grads(policy)), jax.tree.leaves(ref)):
            assert _rel(g, r) < 1e-5, policy
    assert set(REMAT_POLICIES) >= {"none", "full", "save_dots"}
    with pytest.raises(ValueError, match="remat policy"):
        llm.CausalLM(cfg.replace(remat="sometimes")).apply({"params": params}, tokens)


def test_drop_path_drops_whole_samples_and_rescales():
    x = jnp.ones((2000, 3))
    y = DropPath().apply({}, x, 0.25, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    rows = np.asarray(y)
    assert np.all(np.isclose(rows, 0.0) | np.isclose(rows, 1 / 0.75))
    assert np.all((rows == rows[:, :1]))
    assert abs(np.mean(rows[:, 0] == 0) - 0.25) < 0.04
    np.testing.assert_array_equal(DropPath().apply({}, x, 0.25, deterministic=True), x)


def test_bf16_compute_keeps_fp32_params():
    cfg = llm.get_config("llama_tiny", dtype="bfloat16", remat="none")
    model = llm.CausalLM(cfg)
    params = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0))
    assert {p.value.dtype for p in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))} == {np.dtype("float32")}
    out = jax.eval_shape(lambda: model.apply(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params),
                                             jnp.zeros((1, 4), jnp.int32)))
    assert out.dtype == jnp.float32


def test_matmul_2d_same_params_same_gradients(tiny_lm):
    """matmul_2d (one 2-D matmul per projection, the CPU bench setting) is a layout choice only."""
    cfg, _, params = tiny_lm
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)))

    def loss_and_grads(**kw):
        model = llm.CausalLM(cfg.replace(**kw))
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)))(params)

    (l2, g2), (l1, g1) = loss_and_grads(matmul_2d=True), loss_and_grads(matmul_2d=False)
    assert abs(float(l2) - float(l1)) <= 1e-5 * abs(float(l1))
    assert jax.tree.structure(g2) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        assert _rel(a, b) < 1e-5
