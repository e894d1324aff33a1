"""The PyTorch InternLM2 reference: official names, grouped wqkv, RoPE + dynamic NTK, masks, generate."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evejax.port.torch_ref.internlm2 import (  # noqa: E402
    InternLM2Config,
    InternLM2ForCausalLM,
    InternLM2RMSNorm,
)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def test_state_dict_names_are_official():
    config = InternLM2Config.tiny()
    state = _model(config).state_dict()
    layer = [
        "attention.wqkv.weight", "attention.wo.weight", "attention_norm.weight", "ffn_norm.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    ]
    official = {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"}
    official |= {f"model.layers.{i}.{s}" for i in range(config.num_hidden_layers) for s in layer}
    assert set(state) == official
    assert {k: tuple(v.shape) for k, v in state.items()} == config.param_shapes()
    assert state["model.layers.0.attention.wqkv.weight"].shape == (
        (4 + 2 * 2) * 16, 64)


def test_defaults_and_bias_are_official():
    """configuration_internlm2.py defaults; `bias` puts zero-initialised biases on wqkv and wo only."""
    default = InternLM2Config()
    assert (default.vocab_size, default.hidden_size, default.num_key_value_heads, default.hidden_act) == (
        103168, 4096, 32, "silu")
    assert (default.rms_norm_eps, default.rope_theta, default.max_position_embeddings, default.bias,
            default.pad_token_id) == (1e-6, 10000.0, 2048, True, 0)
    config = dataclasses.replace(InternLM2Config.tiny(), bias=True)
    state = _model(config).state_dict()
    biases = {k for k in state if k.endswith(".bias")}
    assert biases == {f"model.layers.{i}.attention.{m}.bias" for i in range(2) for m in ("wqkv", "wo")}
    assert {k: tuple(v.shape) for k, v in state.items()} == config.param_shapes()
    assert all(not state[k].any() for k in biases)


def test_1_8b_shapes_match_hovle_brief():
    shapes = InternLM2Config.internlm2_1_8b().param_shapes()
    assert shapes["model.layers.23.attention.wqkv.weight"] == (4096, 2048)
    assert shapes["model.layers.0.feed_forward.w2.weight"] == (2048, 8192)
    assert shapes["output.weight"] == (92553, 2048)
    assert sum(np.prod(s) for s in shapes.values()) == 1_889_146_880


def test_hf_config_dict_round_trip():
    config = InternLM2Config.internlm2_1_8b()
    hf = config.to_hf_config_dict()
    assert hf["architectures"] == ["InternLM2ForCausalLM"]
    assert hf["model_type"] == "internlm2"
    assert hf["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert InternLM2Config.from_hf_config_dict(hf) == config


# ---- an independent float64 forward, written per head from separate q/k/v ----

def _rms(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _rope(x, positions, base):
    """x [L, d]: pairs (i, i + d/2) rotate by angle pos * base^(-2i/d); base: scalar or one per position."""
    d = x.shape[-1]
    angle = positions[:, None] * np.broadcast_to(base, positions.shape)[:, None] ** (-np.arange(d // 2) * 2.0 / d)
    x1, x2 = x[:, : d // 2], x[:, d // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _independent_logits(config, weights, ids, base):
    H, K, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    L = len(ids)
    positions = np.arange(L, dtype=np.float64)
    causal = np.tril(np.ones((L, L), bool))
    h = weights["embed"][ids]
    for layer in weights["layers"]:
        x = _rms(h, layer["attention_norm"], config.rms_norm_eps)
        heads = []
        for j in range(H):
            kv = j // (H // K)
            q = _rope(x @ layer["q"][j].T, positions, base)
            k = _rope(x @ layer["k"][kv].T, positions, base)
            v = x @ layer["v"][kv].T
            s = np.where(causal, q @ k.T / np.sqrt(d), -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v)
        h = h + np.concatenate(heads, -1) @ layer["wo"].T
        x = _rms(h, layer["ffn_norm"], config.rms_norm_eps)
        gate = x @ layer["w1"].T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ layer["w3"].T)) @ layer["w2"].T
    return _rms(h, weights["norm"], config.rms_norm_eps) @ weights["output"].T


def _random_weights_into(model, config, seed=1):
    """Random per-head q/k/v matrices, packed into wqkv in the official grouped order."""
    rng = np.random.default_rng(seed)
    H, K, d, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    G = H // K

    def rand(*shape, scale=0.1):
        return rng.standard_normal(shape) * scale

    weights = {"embed": rand(config.vocab_size, D, scale=1.0), "norm": 1 + rand(D),
               "output": rand(config.vocab_size, D), "layers": []}
    state = {"model.tok_embeddings.weight": weights["embed"], "model.norm.weight": weights["norm"],
             "output.weight": weights["output"]}
    for i in range(config.num_hidden_layers):
        layer = {"q": rand(H, d, D), "k": rand(K, d, D), "v": rand(K, d, D), "wo": rand(D, H * d),
                 "w1": rand(config.intermediate_size, D), "w3": rand(config.intermediate_size, D),
                 "w2": rand(D, config.intermediate_size),
                 "attention_norm": 1 + rand(D), "ffn_norm": 1 + rand(D)}
        weights["layers"].append(layer)
        rows = []
        for g in range(K):
            rows += [layer["q"][g * G + s] for s in range(G)] + [layer["k"][g], layer["v"][g]]
        p = f"model.layers.{i}."
        state.update({p + "attention.wqkv.weight": np.concatenate(rows, 0),
                      p + "attention.wo.weight": layer["wo"],
                      p + "feed_forward.w1.weight": layer["w1"], p + "feed_forward.w3.weight": layer["w3"],
                      p + "feed_forward.w2.weight": layer["w2"],
                      p + "attention_norm.weight": layer["attention_norm"],
                      p + "ffn_norm.weight": layer["ffn_norm"]})
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()})
    return weights


@pytest.mark.parametrize("seq_len", [12, 32, 45])
def test_grouped_wqkv_and_rope_match_independent_gqa(seq_len):
    config = InternLM2Config.tiny()
    model = _model(config)
    weights = _random_weights_into(model, config)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, seq_len)

    want = _independent_logits(config, weights, ids, _dynamic_base(config, seq_len))
    got = model(torch.tensor(ids)[None])[0].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _dynamic_base(config, seq_len):
    """Dynamic NTK, written out from the official formula: only above max_position_embeddings."""
    base, factor, d = config.rope_theta, config.rope_scaling["factor"], config.head_dim
    if seq_len > config.max_position_embeddings:
        base *= (factor * seq_len / config.max_position_embeddings - (factor - 1)) ** (d / (d - 2))
    return base


@pytest.mark.parametrize("prompt_len", [25, 40])
def test_cached_steps_rotate_new_tokens_by_the_length_so_far(prompt_len):
    """The official cache: a forward over kv_seq_len cached + new tokens rotates its queries and new
    keys with the base of kv_seq_len; cached keys keep the base of the forward that wrote them."""
    config = InternLM2Config.tiny()
    model = _model(config)
    weights = _random_weights_into(model, config)
    total = 45
    ids = np.random.default_rng(6).integers(0, config.vocab_size, total)
    cache = []
    with torch.no_grad():
        chunks = [model(torch.tensor(ids[:prompt_len])[None], past_key_values=cache)[0]]
        chunks += [model(torch.tensor(ids[j:j + 1])[None], past_key_values=cache)[0]
                   for j in range(prompt_len, total)]
    assert cache[0][0][0].shape == (1, config.num_key_value_heads, total, config.head_dim)
    bases = np.array([_dynamic_base(config, max(prompt_len, j + 1)) for j in range(total)])
    want = _independent_logits(config, weights, ids, bases)
    np.testing.assert_allclose(torch.cat(chunks).numpy(), want, rtol=1e-4, atol=1e-4)
    # Full recomputation rotates every key by the final length instead.
    assert not np.allclose(torch.cat(chunks).numpy(), _independent_logits(config, weights, ids, bases[-1]),
                           rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_is_identity_up_to_max_positions():
    config = InternLM2Config.tiny()
    plain = dataclasses.replace(config, rope_scaling=None)
    dynamic_model, plain_model = _model(config), _model(plain)  # same seed: same weights
    for seq_len in (5, config.max_position_embeddings):
        ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
        assert torch.equal(dynamic_model(ids), plain_model(ids))
    ids = torch.randint(0, config.vocab_size, (2, config.max_position_embeddings + 1))
    assert not torch.allclose(dynamic_model(ids), plain_model(ids))


def test_left_padding_matches_unpadded():
    config = InternLM2Config.tiny()
    model = _model(config)
    ids = torch.randint(3, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    pad = 4
    padded = torch.cat([torch.full((1, pad), 2), ids], -1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], -1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model(padded, attention_mask=mask, position_ids=positions)[:, pad:]
    torch.testing.assert_close(got, model(ids), rtol=1e-5, atol=1e-5)


def test_inputs_embeds_and_hidden_states():
    config = InternLM2Config.tiny()
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    logits, hidden = model(ids, output_hidden_states=True)
    assert len(hidden) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, config.hidden_size) for h in hidden)
    torch.testing.assert_close(hidden[0], model.model.tok_embeddings(ids))
    torch.testing.assert_close(model.output(hidden[-1]), logits)  # last entry is after the final norm
    torch.testing.assert_close(model(inputs_embeds=model.model.tok_embeddings(ids)), logits)
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_rms_norm_statistics_in_float32():
    norm = InternLM2RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 8) * 100).bfloat16()
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(x), want)


def test_greedy_generate_is_deterministic_and_batch_consistent():
    config = InternLM2Config.tiny()
    model = _model(config)
    prompt = torch.randint(3, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    first = model.generate(prompt, max_new_tokens=8)
    assert first.shape == (1, 14)
    assert torch.equal(first, model.generate(prompt, max_new_tokens=8))
    assert first[0, 6] == model(prompt)[0, -1].argmax()

    # A left-padded batch decodes each row as if it were alone.
    other = torch.randint(3, config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([prompt, torch.cat([torch.full((1, 2), 2), other], -1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    out = model.generate(batch, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(out[0], first[0])
    assert torch.equal(out[1, 2:], model.generate(other, max_new_tokens=8)[0])


def test_generate_stops_on_eos():
    config = InternLM2Config.tiny()
    model = _model(config)
    prompt = torch.randint(3, config.vocab_size, (1, 5))
    eos = int(model(prompt)[0, -1].argmax())
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    assert out.shape == (1, 6) and out[0, -1] == eos
