"""InternViT-300M-448px + InternVL2-2B's vision feature path (HoVLE's stage-1 teacher):
the model against the PyTorch reference with the official names, the port both ways
(in memory and through `evejax import --family internvit` / `evejax export`), bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from evejax.models import vit  # noqa: E402
from evejax.nn.transformer import TransformerConfig, TransformerStack  # noqa: E402
from evejax.sharding import unbox  # noqa: E402
from evejax.port import commands, internvit  # noqa: E402
from evejax.port.io import CheckpointError  # noqa: E402
from evejax.port.torch_ref import internvit as ref  # noqa: E402

TOL = 1e-5  # max |jax - torch| / max |torch|, float32
TINY_VISION = dict(num_channels=3, patch_size=4, image_size=32, qkv_bias=True, hidden_size=32,
                   num_attention_heads=4, intermediate_size=64, qk_normalization=False, num_hidden_layers=2,
                   hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6, initializer_factor=1.0)


def _chat_config(**fields):
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "vision_config": {"architectures": ["InternVisionModel"], **TINY_VISION},
            "llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 48},
            "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 32, **fields}


def _randomised(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # far from the init (ls = 1, norms = 1/0), so a mis-mapped tensor shows
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module.eval()


def _reference(hf: dict, seed: int = 0):
    vision = ref.InternVisionConfig.from_hf_config_dict(hf.get("vision_config", hf))
    if "vision_config" not in hf:
        return _randomised(ref.InternVisionModel(vision), seed)
    fields = {k: hf[k] for k in ("select_layer", "downsample_ratio", "ps_version") if k in hf}
    chat = ref.InternVLVisionConfig(vision, hf["llm_config"]["hidden_size"], **fields)
    return _randomised(ref.InternVLVision(chat), seed)


def _torch_features(model, pixels_nhwc, ps_version="v2"):
    with torch.no_grad():
        x = torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy())
        if isinstance(model, ref.InternVLVision):
            return model(x).numpy()
        last = model(x)[0][:, 1:]  # a bare InternVisionModel: InternVL2's path without mlp1
        g = int(last.shape[1] ** 0.5)
        shuffled = ref.pixel_shuffle(last.reshape(last.shape[0], g, g, -1), 0.5, ps_version)
        return shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1]).numpy()


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _pixels(n=2):
    return np.random.default_rng(1).normal(size=(n, 32, 32, 3)).astype(np.float32)


def test_layer_scale_is_an_additive_core_option():
    """layer_scale_init=1 is the plain layer; scales of 0 make every layer the identity."""
    t = TransformerConfig(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
                          causal=False, rope_base=None, remat="none")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16))
    pos, seg = jnp.broadcast_to(jnp.arange(5), (2, 5)), jnp.ones((2, 5), jnp.int32)
    scaled = t.replace(layer_scale_init=1.0)
    abstract = jax.eval_shape(lambda: TransformerStack(scaled).init(jax.random.PRNGKey(0), x, pos, seg)["params"])
    layers = abstract["layers"]
    assert layers["attention_layer_scale"].value.shape == layers["mlp_layer_scale"].value.shape == (2, 16)
    assert layers["mlp_layer_scale"].names == ("layers", "norm")
    rng = np.random.default_rng(0)
    plain = {"layers": {k: jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), v)
                        for k, v in unbox(layers).items() if not k.endswith("_layer_scale")}}
    apply = lambda cfg, p: TransformerStack(cfg).apply({"params": p}, x, pos, seg)[0]  # noqa: E731
    with_scales = lambda value: {"layers": {**plain["layers"], "attention_layer_scale": jnp.full((2, 16), value),  # noqa: E731
                                            "mlp_layer_scale": jnp.full((2, 16), value)}}
    np.testing.assert_allclose(apply(scaled, with_scales(1.0)), apply(t, plain), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(apply(scaled, with_scales(0.0)), x)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_is_internvls(version):
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 6)).astype(np.float32)
    want = ref.pixel_shuffle(torch.from_numpy(x), 0.5, version).numpy()
    got = vit.pixel_shuffle(jnp.asarray(x), 0.5, version)
    assert got.shape == (2, 4, 4, 24)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fields", [{}, {"select_layer": 0, "ps_version": "v1"}, {"select_layer": -2},
                                    {"vision_config": {**TINY_VISION, "qkv_bias": False}}],
                         ids=["internvl2", "embeddings_v1", "layer-2", "no_qkv_bias"])
def test_features_match_reference_in_memory(fields):
    hf = _chat_config(**fields)
    model = _reference(hf)
    cfg = internvit.from_hf_config(hf)
    state = _state(model)
    params = internvit.to_flax(state, cfg)
    pixels = _pixels()
    got = vit.teacher_features(cfg, params, jnp.asarray(pixels))
    want = _torch_features(model, pixels)
    assert got.shape == want.shape == (2, 16, 48)
    assert _rel_err(got, want) <= TOL
    back = internvit.to_torch(params, cfg)
    assert list(back) == list(state)  # the official names, in the official order
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def _write_hf(directory, hf, state):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    safetensors_numpy.save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize("layout", ["internvl", "internvit"])
def test_import_and_export_commands_keep_the_features(tmp_path, capsys, layout):
    """InternVL2-2B-style checkpoint (vision_model.* + mlp1.* + language_model.*, the last left
    out) or a bare InternViT-300M-448px one -> evejax checkpoint -> official names again."""
    hf = _chat_config() if layout == "internvl" else {"model_type": "intern_vit_6b", **TINY_VISION}
    model = _reference(hf)
    state = _state(model)
    extra = {"language_model.model.tok_embeddings.weight": np.ones((5, 48), np.float32)}
    _write_hf(tmp_path / "hf", hf, {**state, **(extra if layout == "internvl" else {})})
    pixels = _pixels()
    want = _torch_features(model, pixels)

    assert commands.import_main(["--family", "internvit", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert ("left out 1 tensors" in out) == (layout == "internvl")
    cfg, params = internvit.load_checkpoint(tmp_path / "ckpt")
    assert (cfg.llm_dim is None) == (layout == "internvit")
    assert _rel_err(vit.teacher_features(cfg, params, jnp.asarray(pixels)), want) <= TOL

    assert commands.export_main([str(tmp_path / "ckpt"), str(tmp_path / "exported")]) == 0
    exported_hf = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert internvit.from_hf_config(exported_hf) == cfg
    fresh = _reference(hf, seed=7)  # other weights until the exported ones are loaded
    assert _rel_err(_torch_features(fresh, pixels), want) > 0.1
    exported = safetensors_numpy.load_file(str(tmp_path / "exported" / "model.safetensors"))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    assert _rel_err(_torch_features(fresh, pixels), want) <= TOL


def test_bad_state_dict_names_every_problem():
    hf = _chat_config()
    cfg = internvit.from_hf_config(hf)
    state = _state(_reference(hf))
    del state["vision_model.encoder.layers.1.ls2"]
    state["mlp1.1.weight"] = state["mlp1.1.weight"][:, :-1]
    state["vision_model.encoder.layers.0.attn.q_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(CheckpointError) as e:
        internvit.to_flax(state, cfg, source="ckpt.safetensors")
    msg = str(e.value)
    assert "ckpt.safetensors" in msg and "1 missing, 1 unexpected, 1 shape mismatches" in msg
    for name in ("vision_model.encoder.layers.1.ls2", "mlp1.1.weight (expected", "attn.q_norm.weight"):
        assert name.split(" ")[0] in msg


def test_config_reading_follows_the_official_defaults_and_refuses_by_name():
    official_defaults = {k: v for k, v in _chat_config().items()
                         if k not in ("select_layer", "downsample_ratio", "ps_version")}
    cfg = internvit.from_hf_config(official_defaults)
    assert (cfg.select_layer, cfg.downsample_ratio, cfg.ps_version, cfg.llm_dim) == (-1, 0.5, "v1", 48)
    with pytest.raises(CheckpointError, match="qk_normalization"):
        internvit.from_hf_config(_chat_config(vision_config={**TINY_VISION, "qk_normalization": True}))
    with pytest.raises(CheckpointError, match="llm_config.hidden_size"):
        internvit.from_hf_config(_chat_config(llm_config={"architectures": ["InternLM2ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="force_image_size"):
        internvit.from_hf_config(_chat_config(force_image_size=64))
    with pytest.raises(CheckpointError, match="downsample_ratio"):
        internvit.from_hf_config(_chat_config(downsample_ratio=0.4))


def test_internvl2_2b_size_shapes_and_parameter_count():
    """The real teacher: 448 px -> 256 tokens x 2048 (InternLM2-1.8B's input width); InternViT-300M
    is 304.0M parameters (its model card: "Params (M): 304"), mlp1 12.6M."""
    cfg = vit.get_internvl_config("internvl2_2b")
    params = internvit.abstract_params(cfg)
    out = jax.eval_shape(lambda p, x: vit.teacher_features(cfg, p, x), params,
                         jax.ShapeDtypeStruct((3, 448, 448, 3), jnp.float32))
    assert out.shape == (3, 256, 2048)
    count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert count(params["vision_model"]) == 304_012_288
    assert round(count(params["vision_model"]) / 1e6) == 304
    assert count(params["mlp1"]) == 4096 + 4096 + 4096 * 2048 + 2048 + 2048 * 2048 + 2048
    # the same count from the official names and shapes the port expects
    assert sum(int(np.prod(s)) for s in internvit.torch_shapes(cfg).values()) == count(params)
