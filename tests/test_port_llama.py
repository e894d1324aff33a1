"""LLaMA port: transformers LlamaForCausalLM <-> CausalLM, both directions, CLIs, greedy decoding."""
import copy
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evejax import cli  # noqa: E402
from evejax.eval.generate import generate_full_recompute, greedy_generate, left_pad  # noqa: E402
from evejax.models.llm import CausalLM  # noqa: E402
from evejax.port import io, tables  # noqa: E402
from evejax.port.checkpoint import load_checkpoint  # noqa: E402
from evejax.sharding import unbox  # noqa: E402

TOLERANCE = 1e-5  # max |diff| / max |reference| in float32





def _hf_model(seed=0, **overrides):
    config = transformers.LlamaConfig(**{
        **dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
               initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               attn_implementation="eager"),
        **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(seed=0, lengths=(12, 7, 10)):
    """Left-padded random prompts: tokens, mask [B, T] numpy int32."""
    rng = np.random.default_rng(seed)
    return left_pad([rng.integers(3, 256, n).tolist() for n in lengths], pad_id=0)


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(_positions(mask), dtype=torch.long))
    return out.logits.numpy()


def _jax_logits(cfg, params, tokens, mask):
    return np.asarray(CausalLM(cfg).apply({"params": params}, tokens, positions=_positions(mask),
                                          segment_ids=mask))


def _rel_diff(got, ref, mask):
    real = mask.astype(bool)  # outputs at padded positions are meaningless on both sides
    return float(np.max(np.abs(got[real] - ref[real])) / np.max(np.abs(ref[real])))


@pytest.mark.parametrize("padded", [False, True])
def test_hf_weights_imported_give_hf_logits(padded):
    hf = _hf_model()
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    params = tables.to_flax(_state(hf), cfg)
    tokens, mask = _batch(lengths=(12, 7, 10) if padded else (12, 12))
    diff = _rel_diff(_jax_logits(cfg, params, tokens, mask), _hf_logits(hf, tokens, mask), mask)
    print(f"llama HF -> JAX logits, padded={padded}: max rel diff {diff:.2e}")
    assert diff <= TOLERANCE


def _random_jax_params(cfg, seed=0):
    init = jax.jit(lambda key: CausalLM(cfg).init(key, np.zeros((1, 4), np.int32))["params"])
    params = unbox(init(jax.random.PRNGKey(seed)))
    params = jax.tree.map(np.array, params)
    rng = np.random.default_rng(seed)
    for norm in (params["decoder"]["layers"]["attention_norm"], params["decoder"]["layers"]["mlp_norm"],
                 params["final_norm"]):
        norm["scale"] = rng.uniform(0.5, 1.5, norm["scale"].shape).astype(np.float32)
    return params


def test_jax_weights_exported_give_jax_logits():
    hf = _hf_model(seed=1)
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    params = _random_jax_params(cfg)
    hf.load_state_dict({k: torch.tensor(v) for k, v in tables.to_torch(params, cfg).items()}, strict=True)
    tokens, mask = _batch(seed=1)
    diff = _rel_diff(_hf_logits(hf, tokens, mask), _jax_logits(cfg, params, tokens, mask), mask)
    print(f"llama JAX -> HF logits (padded batch): max rel diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_conversion_is_exactly_invertible():
    hf = _hf_model(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    state = _state(hf)
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    assert cfg.transformer.qkv_bias and cfg.transformer.mlp_bias
    params = tables.to_flax(state, cfg)
    back = tables.to_torch(params, cfg)
    assert list(back) == list(state)  # the checkpoint's own (layer-major) order
    assert all(np.array_equal(back[k], state[k]) for k in state)
    again = tables.to_flax(back, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
    tokens, mask = _batch()
    diff = _rel_diff(_jax_logits(cfg, params, tokens, mask), _hf_logits(hf, tokens, mask), mask)
    assert diff <= TOLERANCE


def test_config_round_trip():
    hf = _hf_model()
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    assert tables.config_from_hf(tables.hf_config(cfg), "llama") == cfg
    written = tables.hf_config(cfg, "bfloat16")
    assert written["architectures"] == ["LlamaForCausalLM"] and written["torch_dtype"] == "bfloat16"
    assert transformers.LlamaConfig(**written).num_key_value_heads == 2


def test_cli_import_export_round_trip(tmp_path, capsys):
    hf = _hf_model()
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    hf.save_pretrained(src, max_shard_size="40KB")
    assert (src / io.SAFETENSORS_INDEX_NAME).is_file()

    assert cli.main(["import", "--family", "llama", str(src), str(ckpt)]) == 0
    cfg, params = load_checkpoint(ckpt)
    assert cfg == tables.config_from_hf(hf.config.to_dict(), "llama")
    assert cli.main(["export", str(ckpt), str(out), "--max-shard-size", "50KB"]) == 0
    index = json.loads((out / io.SAFETENSORS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded = _state(loaded)
    assert set(reloaded) == set(_state(hf))
    assert all(np.array_equal(reloaded[k], v) for k, v in _state(hf).items())

    tokens, mask = _batch()
    assert _rel_diff(_jax_logits(cfg, params, tokens, mask), _hf_logits(loaded, tokens, mask), mask) <= TOLERANCE


def test_cli_export_bfloat16(tmp_path):
    import ml_dtypes

    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["import", "--family", "llama", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert io.load_config_json(tmp_path / "out")["torch_dtype"] == "bfloat16"
    exported = io.load_state_dict(tmp_path / "out", keep_dtype=True)
    for name, value in _state(hf).items():
        assert exported[name].dtype == ml_dtypes.bfloat16
        assert np.array_equal(exported[name], value.astype(ml_dtypes.bfloat16))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16


def test_cli_errors_are_one_line(tmp_path, capsys):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["import", "--family", "internlm2", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 1
    assert "model_type 'llama'" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert "not an evejax checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_state_dict_names_every_problem():
    hf = _hf_model()
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    state = _state(hf)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    tables.to_flax(state, cfg)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    state["lm_head.weight"] = state["lm_head.weight"][:100]
    with pytest.raises(io.CheckpointError) as err:
        tables.to_flax(state, cfg)
    message = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected: model.layers.0.self_attn.q_norm.weight" in message
    assert "shape mismatch: lm_head.weight expected (256, 64), got (100, 64)" in message


def _hf_generate(hf, tokens, mask, max_new, eos, use_cache=True):
    hf.generation_config.eos_token_id = eos
    hf.generation_config.pad_token_id = 0 if eos is None else eos  # HF pads finished rows with it
    with torch.no_grad():
        out = hf.generate(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=max_new, do_sample=False, use_cache=use_cache)
    new = out[:, tokens.shape[1]:].numpy()
    fill = np.full((new.shape[0], max_new - new.shape[1]), 0 if eos is None else eos)
    return np.concatenate([new, fill], axis=1)  # HF stops once every row has finished


def test_greedy_decoding_cache_recompute_and_hf_agree():
    hf = _hf_model(seed=2)
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    params = tables.to_flax(_state(hf), cfg)
    model = CausalLM(cfg)
    tokens, mask = _batch(seed=2)
    max_new = 10

    cached = np.asarray(greedy_generate(model, params, tokens, mask, max_new))
    recomputed = np.asarray(generate_full_recompute(model, params, tokens, mask, max_new))
    reference = _hf_generate(hf, tokens, mask, max_new, None)
    print("llama greedy tokens:", cached.tolist())
    np.testing.assert_array_equal(cached, recomputed)
    np.testing.assert_array_equal(cached, reference)
    assert len(set(cached.ravel().tolist())) > 3  # not a degenerate repeat

    # A token that row 0 first emits mid-way as EOS: that row stops there, the others go on.
    step = next(j for j in range(2, max_new) if cached[0, j] not in cached[0, :j])
    eos = int(cached[0, step])
    cached = np.asarray(greedy_generate(model, params, tokens, mask, max_new, eos_id=eos))
    np.testing.assert_array_equal(cached, np.asarray(
        generate_full_recompute(model, params, tokens, mask, max_new, eos_id=eos)))
    np.testing.assert_array_equal(cached, _hf_generate(hf, tokens, mask, max_new, eos))
    assert (cached[0, step:] == eos).all() and eos not in cached[0, :step]


def test_dynamic_rope_decoding_matches_hf_past_max_positions():
    """Dynamic NTK past max_position_embeddings (32), prompts longer (40) and shorter (25) than it.
    HF scales each forward by max(position_ids) + 1 over the batch and its cache keeps keys as they
    were rotated, so one-token steps must scale by the length so far, not by their own length."""
    hf = _hf_model(seed=7, max_position_embeddings=32,
                   rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    assert dict(cfg.transformer.rope_scaling) == {"type": "dynamic", "factor": 2.0}
    params = tables.to_flax(_state(hf), cfg)
    model = CausalLM(cfg)
    fresh = copy.deepcopy(hf)  # HF keeps grown frequencies across calls
    # Both batches 40 wide (one compilation); the second is padded in every row, where HF's
    # positions, not the padded width, set the length. Once grown, HF's frequencies reset only
    # when a call starts below 32, as the second call here does.
    for lengths in ((40, 33), (25, 20)):
        tokens, mask = (np.pad(a, ((0, 0), (40 - max(lengths), 0))) for a in _batch(seed=7, lengths=lengths))
        cached = np.asarray(greedy_generate(model, params, tokens, mask, 12))
        print(f"llama dynamic NTK, prompts {lengths}: {cached.tolist()}")
        np.testing.assert_array_equal(cached, _hf_generate(hf, tokens, mask, 12, None))
        assert len(set(cached.ravel().tolist())) > 6
    # Without a cache every key is rotated by the full length, in one forward.
    tokens, mask = _batch(seed=7, lengths=(52, 45))
    assert _rel_diff(_jax_logits(cfg, params, tokens, mask), _hf_logits(fresh, tokens, mask), mask) <= TOLERANCE


def test_greedy_from_inputs_embeds_matches_tokens():
    hf = _hf_model(seed=3)
    cfg = tables.config_from_hf(hf.config.to_dict(), "llama")
    params = tables.to_flax(_state(hf), cfg)
    model = CausalLM(cfg)
    tokens, mask = _batch(seed=3)
    embeds = model.apply({"params": params}, tokens, method="embed")
    want = np.asarray(greedy_generate(model, params, tokens, mask, 6))
    np.testing.assert_array_equal(np.asarray(greedy_generate(model, params, None, mask, 6, inputs_embeds=embeds)),
                                  want)
    np.testing.assert_array_equal(
        np.asarray(generate_full_recompute(model, params, None, mask, 3, inputs_embeds=embeds)), want[:, :3])


def test_generate_cli(tmp_path, capsys):
    hf = _hf_model(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["import", "--family", "llama", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    prompt = [5, 17, 99, 42]
    assert cli.main(["generate", str(tmp_path / "ckpt"), "--prompt-ids", ",".join(map(str, prompt)),
                     "--max-new", "5", "--no-eos"]) == 0
    printed = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    want = _hf_generate(hf, np.array([prompt]), np.ones((1, 4), np.int64), 5, None)[0]
    assert printed == want.tolist()
