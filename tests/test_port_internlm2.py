"""InternLM2 port: the official-names PyTorch reference <-> CausalLM, both directions, CLIs, greedy decoding."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evejax import cli  # noqa: E402
from evejax.eval.generate import generate_full_recompute, greedy_generate, left_pad  # noqa: E402
from evejax.models.llm import CausalLM  # noqa: E402
from evejax.port import io, tables  # noqa: E402
from evejax.port.checkpoint import load_checkpoint  # noqa: E402
from evejax.port.torch_ref.internlm2 import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from evejax.sharding import unbox  # noqa: E402

TOLERANCE = 1e-5  # max |diff| / max |reference| in float32
PAD = 2  # InternLM2's pad id

# GQA (4 query heads over 2 KV heads) and dynamic NTK that switches on above 32 tokens.
CONFIG = InternLM2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, bias=False,
                         rope_theta=10_000.0, rope_scaling={"type": "dynamic", "factor": 2.0},
                         max_position_embeddings=32, pad_token_id=PAD)


def _reference(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(config).eval()
    with torch.no_grad():  # larger than the official init so greedy choices are clear-cut
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def _cfg():
    return tables.config_from_hf(CONFIG.to_hf_config_dict(), "internlm2")


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(seed=0, lengths=(12, 7, 10)):
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(3, 256, n).tolist() for n in lengths], pad_id=PAD)


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _ref_logits(model, tokens, mask):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(_positions(mask), dtype=torch.long)).numpy()


def _jax_logits(cfg, params, tokens, mask):
    return np.asarray(CausalLM(cfg).apply({"params": params}, tokens, positions=_positions(mask),
                                          segment_ids=mask))


def _rel_diff(got, ref, mask):
    real = mask.astype(bool)  # outputs at padded positions are meaningless on both sides
    return float(np.max(np.abs(got[real] - ref[real])) / np.max(np.abs(ref[real])))


def test_config_matches_reference():
    cfg = _cfg()
    t = cfg.transformer
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.rope_base) == (4, 2, 16, 10_000.0)
    assert dict(t.rope_scaling) == {"type": "dynamic", "factor": 2.0}
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 2)
    assert InternLM2Config.from_hf_config_dict(tables.hf_config(cfg)) == CONFIG
    assert tables.config_from_hf(tables.hf_config(cfg), "internlm2") == cfg
    assert tables.expected_torch_shapes(tables.table(cfg), tables.abstract_params(cfg)) == CONFIG.param_shapes()


def test_missing_config_keys_take_the_official_defaults():
    """configuration_internlm2.py: rms_norm_eps 1e-6, rope_theta 10000, max_position_embeddings 2048,
    bias True, hidden_act silu, no rope scaling, K = N, pad 0 (an InternLM2-7B-like shape)."""
    shape = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4}
    t = tables.config_from_hf({"model_type": "internlm2", **shape}).transformer
    assert (t.norm_eps, t.rope_base, t.max_position_embeddings, t.rope_scaling) == (1e-6, 10000.0, 2048, None)
    assert t.qkv_bias and t.out_bias and not t.mlp_bias and t.mlp_act == "silu" and t.num_kv_heads == 4
    cfg = tables.config_from_hf({"model_type": "internlm2"})
    assert (cfg.vocab_size, cfg.transformer.embed_dim, cfg.transformer.mlp_dim, cfg.transformer.num_layers,
            cfg.transformer.num_heads) == (103168, 4096, 11008, 32, 32)
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 0)


@pytest.mark.parametrize("fields", [{"hidden_act": "gelu"}, {"bias": True},
                                    {"rope_scaling": {"type": "linear", "factor": 2.0}}],
                         ids=["gelu", "bias", "linear_rope"])
def test_official_config_fields_are_applied(fields):
    """Each field the official modeling code reads changes the model as it does there: imported
    weights give the reference's logits (40 tokens, past max_position_embeddings), and config,
    weights and biases export back exactly."""
    config = dataclasses.replace(CONFIG, **fields)
    ref = _reference(config=config)
    cfg = tables.config_from_hf(config.to_hf_config_dict(), "internlm2")
    state = _state(ref)
    params = tables.to_flax(state, cfg)
    tokens, mask = _batch(lengths=(40, 33))
    diff = _rel_diff(_jax_logits(cfg, params, tokens, mask), _ref_logits(ref, tokens, mask), mask)
    print(f"internlm2 {fields}: max rel diff {diff:.2e}")
    assert diff <= TOLERANCE
    # The field matters: the default model on the same weights gives other logits.
    if "bias" not in fields:
        plain = _jax_logits(_cfg(), params, tokens, mask)
        assert _rel_diff(plain, _ref_logits(ref, tokens, mask), mask) > 100 * TOLERANCE
    assert InternLM2Config.from_hf_config_dict(tables.hf_config(cfg)) == config
    assert tables.config_from_hf(tables.hf_config(cfg), "internlm2") == cfg
    back = tables.to_torch(params, cfg)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("fields, named", [
    ({"hidden_act": "relu"}, "'relu'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}},
     "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "0.5"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_unsupported_config_is_refused_by_name(fields, named):
    with pytest.raises(io.CheckpointError, match="config.json") as err:
        tables.config_from_hf({**CONFIG.to_hf_config_dict(), **fields})
    assert named in str(err.value)


def test_activation_aliases_are_the_same_functions():
    """hidden_act names reading accepts compute what transformers' ACT2FN computes for them."""
    transformers = pytest.importorskip("transformers")
    from evejax.nn.layers import ACTIVATIONS

    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    for hf_name, name in tables._FROM_HF_ACTIVATIONS.items():
        want = transformers.activations.ACT2FN[hf_name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](x)), want, rtol=1e-6, atol=1e-6, err_msg=hf_name)


# 40 tokens cross max_position_embeddings=32, so dynamic NTK scaling is compared too.
@pytest.mark.parametrize("lengths", [(12, 12), (12, 7, 10), (40, 33)], ids=["plain", "padded", "ntk"])
def test_reference_weights_imported_give_reference_logits(lengths):
    ref = _reference()
    cfg = _cfg()
    params = tables.to_flax(_state(ref), cfg)
    tokens, mask = _batch(lengths=lengths)
    diff = _rel_diff(_jax_logits(cfg, params, tokens, mask), _ref_logits(ref, tokens, mask), mask)
    print(f"internlm2 reference -> JAX logits, lengths {lengths}: max rel diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_jax_weights_exported_give_jax_logits():
    cfg = _cfg()
    init = jax.jit(lambda key: CausalLM(cfg).init(key, np.zeros((1, 4), np.int32))["params"])
    params = jax.tree.map(np.array, unbox(init(jax.random.PRNGKey(1))))
    rng = np.random.default_rng(1)
    for norm in (params["decoder"]["layers"]["attention_norm"], params["decoder"]["layers"]["mlp_norm"],
                 params["final_norm"]):
        norm["scale"] = rng.uniform(0.5, 1.5, norm["scale"].shape).astype(np.float32)
    ref = InternLM2ForCausalLM(CONFIG).eval()
    ref.load_state_dict({k: torch.tensor(v) for k, v in tables.to_torch(params, cfg).items()}, strict=True)
    tokens, mask = _batch(seed=1)
    diff = _rel_diff(_ref_logits(ref, tokens, mask), _jax_logits(cfg, params, tokens, mask), mask)
    print(f"internlm2 JAX -> reference logits (padded batch): max rel diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_wqkv_grouping_is_official():
    """Query head 2k + s of KV group k sits in rows [(4k + s) H, (4k + s + 1) H) of wqkv (G = 2)."""
    cfg = _cfg()
    state = _state(_reference())
    params = tables.to_flax(state, cfg)
    wqkv = state["model.layers.1.attention.wqkv.weight"]  # [(N + 2K) H, D]
    h = CONFIG.head_dim
    q, k, v = (params["decoder"]["layers"]["attention"][n]["kernel"][1] for n in ("query", "key", "value"))
    for group in range(2):
        rows = lambda slot: wqkv[(4 * group + slot) * h:(4 * group + slot + 1) * h]  # noqa: E731
        for slot in range(2):
            np.testing.assert_array_equal(q[:, 2 * group + slot], rows(slot).T)
        np.testing.assert_array_equal(k[:, group], rows(2).T)
        np.testing.assert_array_equal(v[:, group], rows(3).T)
    back = tables.to_torch(params, cfg)
    assert list(back) == list(state)
    assert all(np.array_equal(back[n], state[n]) for n in state)


def test_cli_import_export_round_trip(tmp_path):
    ref = _reference()
    src, ckpt, out = tmp_path / "official", tmp_path / "ckpt", tmp_path / "out"
    io.save_state_dict(_state(ref), src, max_shard_bytes=40_000)
    io.save_config_json(CONFIG.to_hf_config_dict(), src)
    assert (src / io.SAFETENSORS_INDEX_NAME).is_file()

    assert cli.main(["import", "--family", "internlm2", str(src), str(ckpt)]) == 0
    cfg, params = load_checkpoint(ckpt)
    assert cfg == _cfg()
    assert cli.main(["export", str(ckpt), str(out), "--max-shard-size", "50KB"]) == 0
    assert (out / io.SAFETENSORS_INDEX_NAME).is_file()

    config = InternLM2Config.from_hf_config_dict(io.load_config_json(out))
    assert config == CONFIG
    loaded = InternLM2ForCausalLM(config).eval()
    loaded.load_state_dict({k: torch.tensor(v) for k, v in io.load_state_dict(out).items()}, strict=True)
    assert all(np.array_equal(_state(loaded)[k], v) for k, v in _state(ref).items())
    tokens, mask = _batch()
    assert _rel_diff(_jax_logits(cfg, params, tokens, mask), _ref_logits(loaded, tokens, mask), mask) <= TOLERANCE


def test_bad_state_dict_names_every_problem():
    state = _state(_reference())
    del state["model.layers.0.attention.wo.weight"]
    state["model.layers.0.attention.wq.weight"] = np.zeros((64, 64), np.float32)
    state["model.layers.1.attention.wqkv.weight"] = np.zeros((96, 64), np.float32)  # MHA-sized, not GQA
    with pytest.raises(io.CheckpointError) as err:
        tables.to_flax(state, _cfg())
    message = str(err.value)
    assert "1 missing, 1 unexpected, 1 shape mismatches" in message
    assert "model.layers.0.attention.wo.weight" in message
    assert "model.layers.0.attention.wq.weight" in message
    assert "model.layers.1.attention.wqkv.weight expected (128, 64), got (96, 64)" in message


def _ref_generate(ref, tokens, mask, max_new, eos):
    out = ref.generate(torch.tensor(tokens, dtype=torch.long), max_new, attention_mask=torch.tensor(mask),
                       eos_token_id=eos)
    new = out[:, tokens.shape[1]:].numpy()
    return np.concatenate([new, np.full((new.shape[0], max_new - new.shape[1]), eos)], axis=1)


def test_greedy_decoding_cache_recompute_and_reference_agree():
    ref = _reference(seed=2)
    cfg = _cfg()
    params = tables.to_flax(_state(ref), cfg)
    model = CausalLM(cfg)
    tokens, mask = _batch(seed=2)
    max_new = 10  # 12 + 10 tokens stay below max_position_embeddings, where recomputation agrees

    cached = np.asarray(greedy_generate(model, params, tokens, mask, max_new))
    print("internlm2 greedy tokens:", cached.tolist())
    np.testing.assert_array_equal(cached, np.asarray(generate_full_recompute(model, params, tokens, mask, max_new)))
    reference = ref.generate(torch.tensor(tokens, dtype=torch.long), max_new, attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(cached, reference[:, tokens.shape[1]:].numpy())
    assert len(set(cached.ravel().tolist())) > 3

    step = next(j for j in range(2, max_new) if cached[1, j] not in cached[1, :j])
    eos = int(cached[1, step])
    cached = np.asarray(greedy_generate(model, params, tokens, mask, max_new, eos_id=eos))
    np.testing.assert_array_equal(cached, _ref_generate(ref, tokens, mask, max_new, eos))
    assert (cached[1, step:] == eos).all() and eos not in cached[1, :step]



@pytest.mark.parametrize("lengths", [(40, 33), (25, 20)], ids=["long", "short"])
def test_dynamic_rope_cached_decoding_matches_official_past_max_positions(lengths):
    """Prompts longer and shorter than max_position_embeddings (32), decoded past it: the official
    cache rotates each step's key by the length so far (kv_seq_len) and keeps earlier keys."""
    ref = _reference(seed=11)
    cfg = _cfg()
    params = tables.to_flax(_state(ref), cfg)
    tokens, mask = _batch(seed=11, lengths=lengths)
    cached = np.asarray(greedy_generate(CausalLM(cfg), params, tokens, mask, 12))
    print(f"internlm2 dynamic NTK, prompts {lengths}: {cached.tolist()}")
    reference = ref.generate(torch.tensor(tokens, dtype=torch.long), 12, attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(cached, reference[:, tokens.shape[1]:].numpy())
    assert len(set(cached.ravel().tolist())) > 6


def test_import_grows_the_vocabulary_with_mean_rows(tmp_path, capsys):
    ref = _reference()
    src, ckpt = tmp_path / "official", tmp_path / "ckpt"
    io.save_state_dict(_state(ref), src)
    io.save_config_json(CONFIG.to_hf_config_dict(), src)
    assert cli.main(["import", "--family", "internlm2", str(src), str(ckpt), "--vocab-size", "259"]) == 0
    cfg, params = load_checkpoint(ckpt)
    assert cfg == _cfg().replace(vocab_size=259)
    state = _state(ref)
    embedding, head = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    np.testing.assert_array_equal(embedding[:256], state["model.tok_embeddings.weight"])
    np.testing.assert_array_equal(head[:, :256], state["output.weight"].T)
    np.testing.assert_allclose(embedding[256:], np.repeat(state["model.tok_embeddings.weight"].mean(0)[None], 3, 0),
                               atol=1e-6)
    np.testing.assert_allclose(head[:, 256:], np.repeat(state["output.weight"].mean(0)[:, None], 3, 1), atol=1e-6)
    tokens, mask = _batch()  # the old ids still give the reference's logits
    logits = _jax_logits(cfg, params, tokens, mask)
    assert _rel_diff(logits[..., :256], _ref_logits(ref, tokens, mask), mask) <= TOLERANCE

    assert cli.main(["import", "--family", "internlm2", str(src), str(tmp_path / "cut"), "--vocab-size", "200"]) == 1
    assert "below the checkpoint's 256 rows" in capsys.readouterr().err
    assert not (tmp_path / "cut").exists()
