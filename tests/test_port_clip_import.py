"""`evejax import --family clip` / `evejax export CLIP_CKPT`: a HF CLIPVisionModel (or a whole
CLIPModel) -> evejax CLIP checkpoint -> EVE's `clip` teacher slot (stage 1's `clip=DIR`
import) and back to a CLIPVisionModel directory."""
import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evejax import config as config_lib  # noqa: E402
from evejax import sharding  # noqa: E402
from evejax.models import registry, vit  # noqa: E402
from evejax.port import clip, commands  # noqa: E402
from evejax.train import trainer  # noqa: E402

TOL = 1e-5  # max |jax - hf| / max |hf|, float32


def _hf_vision_config():
    # EVE tiny's teacher, vit.clip_vit(32, 4, 32, 2, 4, 64), written out as HF fields.
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=4, image_size=32, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(_hf_vision_config()).eval()
    with torch.no_grad():  # far from HF's init, so a mis-mapped norm or bias shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="module")
def eve_tiny():
    """configs/eve.py:tiny_stage1's model: (EVEConfig, boxed abstract params)."""
    spec = registry.build(config_lib.load("configs/eve.py:tiny_stage1").model)
    boxed = jax.eval_shape(lambda r: spec.module.init(r, *spec.init_args, **spec.init_kwargs)["params"],
                           jax.random.PRNGKey(0))
    return spec.config, boxed


def _hidden_states(model, pixels_nhwc):
    with torch.no_grad():
        out = model(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states])


def _rel_err(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


def test_import_matches_hf_and_fits_eve_teacher_slot(hf_model, eve_tiny, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    assert commands.import_main(["--family", "clip", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["format"] == "evejax.clip"
    assert commands.import_main(["--family", "clip", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 1

    cfg, params = clip.load_checkpoint(tmp_path / "ckpt")
    pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3), dtype=np.float32)
    hidden = jax.jit(lambda p, x: vit.ClipViT(cfg).apply({"params": p}, x, return_hidden=True).hidden_states)
    assert _rel_err(np.asarray(hidden(params, pixels)), _hidden_states(hf_model, pixels)) <= TOL

    eve_cfg, boxed = eve_tiny
    eve_clip = sharding.unbox(boxed)["clip"]
    assert clip.hf_config(cfg) == clip.hf_config(eve_cfg.clip)
    assert _shapes(params) == _shapes(eve_clip)  # same tree, shapes and dtypes

    # A whole CLIPModel (hub layout: `vision_model.*` beside the text tower) gives the same tower.
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=_hf_vision_config().to_dict(),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    full.vision_model.load_state_dict(hf_model.state_dict())
    full.save_pretrained(tmp_path / "full")
    note = clip.import_clip(tmp_path / "full", tmp_path / "ckpt_full")
    assert "left out" in note
    _, from_full = clip.load_checkpoint(tmp_path / "ckpt_full")
    jax.tree.map(np.testing.assert_array_equal, from_full, params)


def test_stage1_import_places_clip_in_eve_and_export_round_trips(hf_model, eve_tiny, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    clip.import_clip(tmp_path / "hf", tmp_path / "ckpt")
    _, params = clip.load_checkpoint(tmp_path / "ckpt")

    # The trainer's import start, onto the sharded abstract EVE tree (the 7b mesh: fsdp over 8 devices).
    _, boxed = eve_tiny
    mesh = sharding.make_mesh(dict(slice=1, data=1, fsdp=-1, tensor=1))
    shardings = sharding.tree_shardings(boxed, mesh)
    abstract = sharding.unbox(boxed)
    start = ConfigDict(dict(kind="import", workdir="", path=f"clip={tmp_path / 'ckpt'}"))
    placed, origin = trainer.imported_params(start, abstract, shardings)
    assert "clip=" in origin
    jax.tree.map(np.testing.assert_array_equal, placed["clip"], params)
    jax.tree.map(lambda new, s: (new.dtype == np.float32 and new.sharding == s) or pytest.fail(str(s)),
                 placed["clip"], shardings["clip"])
    assert all(placed[k] is abstract[k] for k in abstract if k != "clip")

    # Export: a directory CLIPVisionModel.from_pretrained loads strictly, holding the same weights.
    assert commands.export_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    model, info = transformers.CLIPVisionModel.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    want = hf_model.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


def test_non_clip_config_is_refused(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "llama.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(clip.CheckpointError, match="model_type 'llama' is not a CLIP model"):
        clip.import_clip(tmp_path / "hf", tmp_path / "ckpt", config=tmp_path / "llama.json")
    assert not (tmp_path / "ckpt").exists()
