"""HoVLE stage 1: distillation of the embedding module on unpaired images and random text ids,
the frozen InternVL teacher inside the step (models/hovle.py HoVLEDistill, data/unpaired.py,
configs/hovle.py)."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from evejax import config as config_lib
from evejax.data import image as image_lib
from evejax.data import pipeline, sources, unpaired
from evejax.models import hovle, registry, vit
from evejax.port import checkpoint as port_checkpoint
from evejax.port import internvit as port_internvit
from evejax.sharding import unbox
from evejax.train import checkpoint as ckpt_lib


def tiny_model(**kw):
    return ml_collections.ConfigDict(dict(dict(name="hovle", size="tiny", overrides=dict(dtype="float32"),
                                               teacher="tiny",
                                               teacher_overrides=dict(image_size=56, patch_size=14, llm_dim=64)),
                                          **kw))


def test_negative_cosine_is_one_minus_cosine_averaged_over_the_mask():
    rng = np.random.default_rng(0)
    student, target = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    target[1, 2] = -2.5 * student[1, 2]          # opposite direction: 1 - cos = 2
    mask = np.array([[True, False, True], [False, True, True]])
    by_hand = []
    for b, t in zip(*np.nonzero(mask)):
        s, z = student[b, t], target[b, t]
        by_hand.append(1 - s @ z / np.sqrt((s @ s) * (z @ z)))
    got = hovle.negative_cosine(jnp.asarray(student), jnp.asarray(target), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), np.mean(by_hand), rtol=1e-6)
    assert by_hand[-1] == pytest.approx(2.0)
    assert float(hovle.negative_cosine(jnp.asarray(student), jnp.asarray(student), jnp.ones((2, 3)))) \
        == pytest.approx(0.0, abs=1e-6)
    assert float(hovle.negative_cosine(jnp.asarray(student), jnp.asarray(target), jnp.zeros((2, 3)))) == 0.0


@pytest.mark.parametrize("loc", ["pre", "post"])
def test_stage1_model_distils_hovle_outputs_to_the_teacher_and_the_llm_embeddings(loc):
    """"post" distils the shuffled + projected outputs of the HD stream: what the LLM reads."""
    spec = registry.build(tiny_model(overrides=dict(dtype="float32", pixel_shuffle_loc=loc)))
    cfg = spec.config
    params = jax.jit(lambda r: unbox(spec.module.init(r, *spec.init_args)["params"]))(jax.random.PRNGKey(0))
    assert sorted(params) == ["embedding_model", "language_model", "teacher"]
    s, n = cfg.image_size, cfg.hovle.image_tokens_per_tile
    pixels = jax.random.normal(jax.random.PRNGKey(1), (2, 4, s, s, 3))
    tile_mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    text = jnp.array([[3, 7, 1, 249, 0], [5, 5, 5, 9, 11]], jnp.int32)
    text_segments = jnp.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], jnp.int32)
    tokens = jnp.full((2, 4 * n), cfg.hovle.img_context_token_id, jnp.int32)
    mask = jnp.repeat(tile_mask, n, axis=1)
    batch = {"pixels": pixels, "tile_mask": tile_mask, "text_tokens": text, "text_segment_ids": text_segments}

    @jax.jit
    def run(params):
        out = spec.module.apply({"params": params}, pixels, tile_mask, text, text_segments)
        # Image stream: HoVLE's LLM inputs for a row of placeholders, against the teacher per tile.
        student = hovle.HoVLE(cfg.hovle).apply(
            {"params": {k: params[k] for k in ("embedding_model", "language_model")}}, tokens, pixels,
            mask.astype(jnp.int32), tile_mask, method=hovle.HoVLE.embed_inputs).llm_inputs
        teacher = vit.teacher_features(cfg.teacher, params["teacher"], pixels.reshape(8, s, s, 3))
        # Text stream: HoVLE's LLM inputs for a text-only row.
        text_student = hovle.HoVLE(cfg.hovle).apply(
            {"params": {k: params[k] for k in ("embedding_model", "language_model")}}, text,
            jnp.zeros((2, 1, s, s, 3)), text_segments, jnp.zeros((2, 1), bool),
            method=hovle.HoVLE.embed_inputs).llm_inputs
        return out, student, teacher, text_student, spec.loss_fn(params, batch, jax.random.PRNGKey(2))

    out, student, teacher, text_student, (loss, metrics) = run(params)
    np.testing.assert_array_equal(out.image_mask, mask)
    np.testing.assert_allclose(out.image_student[mask], student[mask], atol=1e-6)
    np.testing.assert_allclose(out.image_target, teacher.reshape(2, 4 * n, -1), atol=1e-6)
    # Text stream: targets are the LLM's own embedding rows; padding rows carry no loss.
    np.testing.assert_array_equal(out.text_target, params["language_model"]["embed_tokens"]["embedding"][text])
    np.testing.assert_array_equal(out.text_mask, text_segments > 0)
    np.testing.assert_allclose(out.text_student[0], text_student[0], atol=1e-6)

    image = hovle.negative_cosine(student, teacher.reshape(2, 4 * n, -1), mask)
    np.testing.assert_allclose(metrics["distill_image"], image, rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["distill_image"] + metrics["distill_text"], rtol=1e-6)


def test_teacher_tokens_are_compared_row_major_whatever_the_ps_version():
    teacher = vit.get_internvl_config("tiny")   # grid 8, shuffle 2 -> 4 x 4 tokens
    grid = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    tokens = lambda version: vit.pixel_shuffle(grid, 0.5, version).reshape(2, 16, 12)  # noqa: E731
    got = hovle.teacher_tokens_row_major(teacher.replace(ps_version="v1"), tokens("v1"))
    np.testing.assert_array_equal(got, tokens("v2"))
    np.testing.assert_array_equal(hovle.teacher_tokens_row_major(teacher, tokens("v2")), tokens("v2"))
    assert not np.array_equal(tokens("v1"), tokens("v2"))


def test_a_teacher_that_does_not_match_the_llm_inputs_is_refused():
    with pytest.raises(ValueError, match="teacher gives 16 x 48 features per 32 px tile"):
        registry.build(tiny_model(teacher_overrides={}))


def test_text_ids_are_uniform_over_the_vocabulary_without_the_placeholder():
    ids = unpaired.text_ids(10, (3, 7, 99), 20_000, np.random.default_rng(0))
    assert ids.dtype == np.int32 and set(np.unique(ids)) == {0, 1, 2, 4, 5, 6, 8, 9}
    counts = np.bincount(ids, minlength=10)[[0, 1, 2, 4, 5, 6, 8, 9]]
    assert counts.min() > 0.9 * 20_000 / 8


def test_unpaired_tfds_images_are_read_from_their_feature_and_bad_features_are_counted():
    import io

    png = io.BytesIO()
    Image.fromarray(np.zeros((56, 112, 3), np.uint8)).save(png, format="PNG")
    transform = unpaired.UnpairedMap(unpaired._TFDSImage("image"), image_lib.TilingConfig(56, max_tiles=3), 4, 256,
                                     (250,))
    example = transform((5, {"image": png.getvalue(), "label": 3}), np.random.default_rng(0))
    np.testing.assert_array_equal(example["tile_mask"], [1, 1, 1, 0])   # 2 x 1 tiles + thumbnail
    assert example["index"] == 5 and example["text_tokens"].shape == (4,)
    assert transform((6, {"label": 3}), np.random.default_rng(0)) == {"bad": "malformed"}
    assert transform((7, {"image": b"not an image"}), np.random.default_rng(0)) == {"bad": "corrupt_image"}


def _config(data, **model):
    c = ml_collections.ConfigDict()
    c.model = tiny_model(**model)
    c.data = config_lib.data_config(**data)
    return c


@pytest.mark.parametrize("source", ["llava", "arrayrecord"])
def test_unpaired_batch_reads_only_the_images_of_llava_records(tmp_path, source):
    for i, size in enumerate([(56, 56), (150, 40)]):
        Image.fromarray(np.full(size[::-1] + (3,), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    records = [{"id": "a", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]},
               {"id": "text only", "conversations": [{"from": "human", "value": "hello"}]},
               {"id": "b", "image": "1.png", "conversations": []}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    path = tmp_path / "d.jsonl"
    if source == "arrayrecord":   # images stored inside the shards
        sources.convert_conversations(str(path), str(tmp_path / "shards"), str(tmp_path), embed_images=True,
                                      log=lambda _: None)
        path = tmp_path / "shards"
    config = _config(dict(name=f"unpaired_{source}", path=str(path), image_root=str(tmp_path) * (source == "llava"),
                          seq_len=6, global_batch=2, shuffle=False, seed=3))
    it = pipeline.make_data(config, 0, 1)
    batch = next(it)
    assert batch["pixels"].shape == (2, 4, 56, 56, 3) and batch["tile_mask"].dtype == bool
    # 56 x 56 -> one tile; 150 x 40 -> 3 x 1 tiles + thumbnail.
    np.testing.assert_array_equal(batch["tile_mask"], [[1, 0, 0, 0], [1, 1, 1, 1]])
    assert batch["text_tokens"].shape == (2, 6) and batch["text_tokens"].dtype == np.int32
    assert ((batch["text_tokens"] >= 0) & (batch["text_tokens"] < 256) & (batch["text_tokens"] != 250)).all()
    np.testing.assert_array_equal(batch["text_segment_ids"], np.ones((2, 6)))
    assert it.stats()["skipped_missing_image"] == 1
    again = next(pipeline.make_data(config, 0, 1))
    np.testing.assert_array_equal(again["text_tokens"], batch["text_tokens"])


def test_unpaired_data_takes_its_tiling_and_text_ids_from_a_stage1_model():
    with pytest.raises(ValueError, match="tiling comes from config.model"):
        config = _config(dict(name="unpaired_shapes", global_batch=2))
        config.data = dict(config.data, max_tiles=2)
        pipeline.make_data(config, 0, 1)
    with pytest.raises(ValueError, match="config.model must be a HoVLE stage-1 model"):
        pipeline.make_data(_config(dict(name="unpaired_shapes", global_batch=2), teacher=""), 0, 1)


def test_tiny_stage1_halves_both_losses_and_leaves_llm_and_teacher_bit_identical(tmp_path, train_logged):
    """From an imported LLM (evejax.lm) and InternVL teacher (evejax.internvl), as configs/hovle.py:stage1."""
    config = config_lib.load("configs/hovle.py:tiny_stage1")
    spec = registry.build(config.model)
    shapes = unbox(jax.eval_shape(lambda r: spec.module.init(r, *spec.init_args)["params"], jax.random.PRNGKey(0)))
    rng = np.random.default_rng(7)
    imported = {part: jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), shapes[part])
                for part in ("language_model", "teacher")}
    port_checkpoint.save_checkpoint(tmp_path / "llm", spec.config.hovle.llm, imported["language_model"])
    port_internvit.save_checkpoint(tmp_path / "teacher", spec.config.teacher, imported["teacher"])
    result, logged = train_logged(config, tmp_path / "run", [
        "--config.stage.start.kind=import",
        f"--config.stage.start.path=language_model={tmp_path / 'llm'},teacher={tmp_path / 'teacher'}"])
    assert result["step"] == config.train.steps and len(logged) == config.train.steps
    for term in ("distill_image", "distill_text"):
        first, last = logged[0][term], logged[-1][term]
        assert last <= 0.5 * first, (term, first, last)
    _, trained = ckpt_lib.load_params(str(tmp_path / "run"))
    for part in ("language_model", "teacher"):
        jax.tree.map(np.testing.assert_array_equal, trained[part], imported[part])

    # A next stage (HoVLE, no teacher) restores its params from this one's, as start kind "stage" does.
    hovle_shapes = hovle.abstract_params(spec.config.hovle)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    store = ckpt_lib.Checkpoints(str(tmp_path / "run"), read_only=True)
    restored = store.restore_params(store.latest_step(), hovle_shapes, jax.tree.map(lambda _: one_device,
                                                                                      hovle_shapes))
    store.close()
    assert sorted(restored) == ["embedding_model", "language_model"]
    jax.tree.map(np.testing.assert_array_equal, restored, {k: trained[k] for k in restored})
