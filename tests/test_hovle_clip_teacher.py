"""HoVLE stage 1 with the CLIP teacher (models/vit.py ClipTeacher, configs/hovle.py:*stage1_clip):
CLIP's interpolated positions against HF, the guard that keeps the learned projection out of
the distillation loss, and a tiny stage 1 from imported CLIP + LLM checkpoints."""
import jax
import numpy as np
import pytest

from evejax import config as config_lib
from evejax.models import eve, hovle, registry, vit
from evejax.port import checkpoint as port_checkpoint
from evejax.port import clip as port_clip
from evejax.sharding import unbox
from evejax.train import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_clip_at_a_larger_tile_matches_hf_interpolate_pos_encoding():
    """ClipViT(interpolate_pos_encoding=True) = HF CLIPVisionModel(..., interpolate_pos_encoding=True):
    the tiny teacher's CLIP (42 px, 3 x 3 grid) on 56 px tiles (4 x 4), every hidden state."""
    cfg = vit.get_clip_teacher_config("clip_tiny").clip
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**port_clip.hf_config(cfg),
                                                                    attn_implementation="eager")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    params = port_clip.to_flax({k: v.numpy() for k, v in hf.state_dict().items()}, cfg, vision_model=False)
    pixels = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        want = hf(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True,
                  interpolate_pos_encoding=True).hidden_states
    got = vit.ClipViT(cfg).apply({"params": params}, pixels, return_hidden=True,
                                 interpolate_pos_encoding=True).hidden_states
    assert got.shape == (3, 2, 17, 32)
    for k, h in enumerate(want):
        diff = np.max(np.abs(np.asarray(got[k]) - h.numpy())) / np.max(np.abs(h.numpy()))
        assert diff <= 1e-5, (k, diff)
    with pytest.raises(ValueError, match="position embeddings are not interpolated"):
        vit.ClipViT(cfg).apply({"params": params}, pixels)


@pytest.fixture(scope="module")
def model_and_batch():
    """(config, spec, initial params, batch), read-only: both tests below start from one init."""
    config = config_lib.load("configs/hovle.py:tiny_stage1_clip")
    spec = registry.build(config.model)
    # Compiled whole: op by op, the init of the model with its teacher costs a minute.
    params = unbox(jax.jit(spec.module.init)(jax.random.PRNGKey(0), *spec.init_args)["params"])
    rng = np.random.default_rng(1)
    s, p = spec.config.image_size, spec.config.hovle.tile_slots
    batch = {"pixels": rng.standard_normal((2, p, s, s, 3)).astype(np.float32),
             "tile_mask": np.array([[True] * p, [True, True, False, False]]),
             "text_tokens": rng.integers(3, 240, (2, 8)).astype(np.int32),
             "text_segment_ids": np.ones((2, 8), np.int32)}
    return config, spec, params, batch


def test_the_distillation_loss_never_reaches_the_projection(model_and_batch):
    """The guard: distill_image and distill_text give the whole teacher (CLIP and projection) a zero
    gradient, so the student cannot pull its target towards a collapse; the projection learns
    from teacher_projection alone, which moves nothing but the projection and its reconstruction."""
    config, spec, params, batch = model_and_batch
    assert sorted(params["teacher"]) == ["clip", "projection", "reconstruction"]
    assert dict(config.stage.losses) == dict(distill_image=1.0, distill_text=1.0, teacher_projection=1.0)

    # Both gradients in one compiled program: op by op, the two backward passes cost minutes.
    @jax.jit
    def grads(p):
        return [jax.grad(lambda q: spec.loss_fn(q, batch, jax.random.PRNGKey(2))[1][term])(p)
                for term in ("distill_image", "teacher_projection")]

    nonzero = lambda tree: any(bool(np.any(np.asarray(x) != 0)) for x in jax.tree.leaves(tree))  # noqa: E731
    distill, projection = grads(params)
    assert not nonzero(distill["teacher"]) and nonzero(distill["embedding_model"])
    assert nonzero(projection["teacher"]["projection"]) and nonzero(projection["teacher"]["reconstruction"])
    assert not nonzero(projection["teacher"]["clip"]) and not nonzero(projection["embedding_model"])
    assert not nonzero(projection["language_model"])


def test_tiny_stage1_clip_halves_both_losses_and_leaves_clip_and_llm_bit_identical(tmp_path, train_logged,
                                                                                   model_and_batch):
    """configs/hovle.py:tiny_stage1_clip from an imported LLM (evejax.lm) and CLIP (evejax.clip, into
    teacher/clip): both distillation losses halve, the projection trains by its own loss, CLIP and
    the LLM leave bit-identical."""
    _, spec, params, _ = model_and_batch
    config = config_lib.load("configs/hovle.py:tiny_stage1_clip")   # its own: the run's overrides change it
    rng = np.random.default_rng(7)
    imported = {"language_model": params["language_model"], "clip": params["teacher"]["clip"]}
    imported = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), imported)
    port_checkpoint.save_checkpoint(tmp_path / "llm", spec.config.hovle.llm, imported["language_model"])
    port_clip.save_checkpoint(tmp_path / "clip", spec.config.teacher.clip, imported["clip"])
    result, logged = train_logged(config, tmp_path / "run", [
        "--config.stage.start.kind=import",
        f"--config.stage.start.path=language_model={tmp_path / 'llm'},teacher/clip={tmp_path / 'clip'}"])
    assert result["step"] == config.train.steps and len(logged) == config.train.steps
    for term in ("distill_image", "distill_text", "teacher_projection"):
        first, last = logged[0][term], logged[-1][term]
        assert last <= 0.5 * first, (term, first, last)
    _, trained = ckpt_lib.load_params(str(tmp_path / "run"))
    jax.tree.map(np.testing.assert_array_equal, trained["language_model"], imported["language_model"])
    jax.tree.map(np.testing.assert_array_equal, trained["teacher"]["clip"], imported["clip"])
    kernel = trained["teacher"]["projection"]["fc1"]["kernel"]
    assert not np.array_equal(kernel, params["teacher"]["projection"]["fc1"]["kernel"])


def test_view_size_reads_the_tile_pooled_and_demo_teacher_is_eve_demos_clip():
    """view_size: CLIP reads the tile average-pooled to that side, i.e. the same teacher without it
    on the pooled tile. "clip_demo" (HoVLE demo's stage 1) holds the CLIP that configs/demo.py:teacher
    trains, so `evejax demo --model hovle` imports it as it is, one patch per 16 px shapes cell."""
    cfg = vit.get_clip_teacher_config("clip_demo")
    assert (cfg.image_size, cfg.view, cfg.grid, cfg.num_tokens) == (64, 32, 4, 16)
    teacher_model = config_lib.load("configs/demo.py:teacher").model
    eve_teacher = registry.build(teacher_model).config
    assert cfg.clip.replace(remat=eve_teacher.transformer.remat) == eve_teacher  # the same weights
    # One source: CLIP size "demo", which EVE "demo" and HoVLE's "clip_demo" take as they are.
    assert teacher_model.size == "demo" and cfg.clip == vit.get_clip_config("demo") == eve.get_config("demo").clip
    pooled_cfg = cfg.__class__(cfg.clip, image_size=32, downsample_ratio=1.0, llm_dim=cfg.llm_dim)
    pixels = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    params = vit.ClipTeacher(cfg).init(jax.random.PRNGKey(0), pixels)["params"]
    got = vit.ClipTeacher(cfg).apply({"params": params}, pixels)
    want = vit.ClipTeacher(pooled_cfg).apply({"params": params},
                                              pixels.reshape(2, 32, 2, 32, 2, 3).mean(axis=(2, 4)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="view_size=24 must divide"):
        vit.get_clip_teacher_config("clip_demo", view_size=24)
