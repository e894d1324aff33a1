"""CLIP vision tower: parity with HF `CLIPVisionModel` both ways, and the L/14-336 size.

Weights are random and far from HF's init (LayerNorm scales 1, biases 0), so a
mis-mapped norm or bias shows up as a large difference.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.models import vit
from evejax.port import clip, io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5  # max |jax - hf| / max |hf|, float32
EVE_PREFIX = "model.vision_clip.backbone."
# reference/eve.md §5: CLIP-ViT-L/14-336 vision tower inside the EVE checkpoint.
L14_336_PARAMS = 303_507_456


def _hf_tiny_config():
    # Written out, not from clip.hf_config, so HF's own defaults (quick_gelu,
    # eps 1e-5) check ours; shapes as vit.CLIP_SIZES["tiny"].
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=4, image_size=16, attn_implementation="eager")


def _hf_model(seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(_hf_tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def _pixels(cfg, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.num_channels), dtype=np.float32)


def _hf_outputs(model, pixels_nhwc):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    return {"hidden_states": np.stack([h.numpy() for h in out.hidden_states]),
            "last_hidden_state": out.last_hidden_state.numpy(),
            "pooler_output": out.pooler_output.numpy()}


@functools.cache
def _forward(cfg):
    return jax.jit(lambda params, x: vit.ClipViT(cfg).apply({"params": params}, x, return_hidden=True))


def _jax_outputs(cfg, params, pixels_nhwc):
    out = _forward(cfg)(params, jnp.asarray(pixels_nhwc))
    return {k: np.asarray(v) for k, v in out._asdict().items()}


def _rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _assert_match(jax_out, hf_out):
    hidden_j, hidden_h = jax_out["hidden_states"], hf_out["hidden_states"]
    assert hidden_j.shape == hidden_h.shape
    errors = {
        "layer -2": _rel_err(hidden_j[-2], hidden_h[-2]),
        "layer -1": _rel_err(hidden_j[-1], hidden_h[-1]),
        "all layers": _rel_err(hidden_j, hidden_h),
        "last_hidden_state": _rel_err(jax_out["last_hidden_state"], hf_out["last_hidden_state"]),
        "pooler_output": _rel_err(jax_out["pooler_output"], hf_out["pooler_output"]),
    }
    assert all(e <= TOL for e in errors.values()), errors
    return errors


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: 0.5 * rng.standard_normal(x.shape, dtype=np.float32),
                        clip.abstract_params(cfg))


def test_import_hf_weights_matches_hf_hidden_states(tmp_path):
    cfg = vit.get_clip_config("tiny")
    model = _hf_model()
    pixels = _pixels(cfg)
    want = _hf_outputs(model, pixels)

    # transformers 5 keeps CLIPVisionModel's names without the `vision_model.` scope in memory.
    in_memory = {k: v.numpy() for k, v in model.state_dict().items()}
    _assert_match(_jax_outputs(cfg, clip.to_flax(in_memory, cfg, vision_model=False), pixels), want)

    # Hub checkpoints carry the scope, EVE's adds its prefix, and other towers sit beside it.
    hub = {"vision_model." + k: v for k, v in in_memory.items()}
    hub["vision_model.embeddings.position_ids"] = np.arange(cfg.num_patches + 1)[None]
    hub["text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
    io.save_state_dict(hub, tmp_path)
    loaded = io.load_state_dict(tmp_path)
    _assert_match(_jax_outputs(cfg, clip.to_flax(loaded, cfg), pixels), want)
    eve = {EVE_PREFIX + k: v for k, v in hub.items()} | {"model.norm.weight": np.ones(8, np.float32)}
    _assert_match(_jax_outputs(cfg, clip.to_flax(eve, cfg, prefix=EVE_PREFIX), pixels), want)


def test_export_jax_weights_loads_strictly_into_hf_and_matches(tmp_path):
    cfg = vit.get_clip_config("tiny")
    params = _random_params(cfg)
    pixels = _pixels(cfg, seed=2)
    got = _jax_outputs(cfg, params, pixels)

    state = clip.to_torch(params, cfg)
    io.save_state_dict(state, tmp_path)
    io.save_config_json(clip.hf_config(cfg), tmp_path)
    model, info = transformers.CLIPVisionModel.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    _assert_match(got, _hf_outputs(model.eval(), pixels))

    fresh = transformers.CLIPVisionModel(_hf_tiny_config()).eval()
    unscoped = clip.to_torch(params, cfg, vision_model=False)
    result = fresh.load_state_dict({k: torch.tensor(v) for k, v in unscoped.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_match(got, _hf_outputs(fresh, pixels))

    back = clip.to_flax(clip.to_torch(params, cfg, prefix=EVE_PREFIX), cfg, prefix=EVE_PREFIX)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_mismatched_state_dict_lists_every_problem():
    cfg = vit.get_clip_config("tiny")
    state = clip.to_torch(_random_params(cfg), cfg)
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    state["vision_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    state["vision_model.embeddings.position_embedding.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(io.CheckpointError) as err:
        clip.to_flax(state, cfg)
    message = str(err.value)
    assert "missing: vision_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "unexpected: vision_model.encoder.layers.2.mlp.fc2.bias" in message
    assert "shape mismatch: vision_model.embeddings.position_embedding.weight" in message


def test_wrong_image_size_is_refused():
    cfg = vit.get_clip_config("tiny")
    with pytest.raises(ValueError, match="position embeddings are not interpolated"):
        vit.ClipViT(cfg).init(jax.random.key(0), jnp.zeros((1, 20, 20, 3)))


def test_l14_336_parameter_count_matches_eve_checkpoint_and_hf():
    cfg = vit.get_clip_config("L/14-336")
    abstract = clip.abstract_params(cfg)  # jax.eval_shape: nothing allocated
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == L14_336_PARAMS

    # HF on the meta device: shapes only. The EVE figure counts post_layernorm
    # (2 x 1024, unused by the teacher's layer -2 features) and not the
    # `position_ids` buffer (577 int64, non-persistent).
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip.hf_config(cfg)))
    assert sum(p.numel() for p in hf.parameters()) == L14_336_PARAMS
    assert sum(p.numel() for n, p in hf.named_parameters() if "post_layernorm" in n) == 2048
    assert "embeddings.position_ids" not in hf.state_dict()
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert clip.torch_shapes(cfg, vision_model=False) == hf_shapes


def test_l14_336_config_is_openai_clip_vit_large_patch14_336():
    # vision_config of the hub's config.json for openai/clip-vit-large-patch14-336.
    openai = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  num_channels=3, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    ours = clip.hf_config(vit.get_clip_config("L/14-336"))
    assert {k: ours[k] for k in openai} == openai


def test_hf_config_round_trip():
    for size in vit.CLIP_SIZES:
        cfg = vit.get_clip_config(size)
        assert clip.from_hf_config(clip.hf_config(cfg)) == cfg
    full_clip = {"projection_dim": 768, "vision_config": clip.hf_config(vit.get_clip_config("L/14-336"))}
    assert clip.from_hf_config(full_clip) == vit.get_clip_config("L/14-336")
