"""HoVLE stages 2/3 with stage 1's teacher kept (config.model.teacher_data "conversation", the demo's
stages 2 and 3): the step's loss is CE + w x distill_image, 1 - cos between what the LLM reads at each
image placeholder and the frozen teacher's token for it; the teacher stays frozen and never reaches
evaluation or the official export."""
import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from evejax import config as config_lib
from evejax.data import pipeline
from evejax.eval import evaluate
from evejax.models import hovle, registry, vit
from evejax.port import commands
from evejax.port import hovle as hovle_port
from evejax.sharding import unbox
from evejax.train import checkpoint as ckpt_lib
from evejax.train import trainer


def load(*overrides):
    return config_lib.apply_overrides(config_lib.load("configs/hovle.py:demo_stage3"), list(overrides))


@pytest.fixture(scope="module")
def initial_params():
    """The params a fresh demo_stage3 run starts from (the trainer's init at its seed): one init,
    read-only, for both tests."""
    c = load()
    spec = registry.build(c.model)
    rng = jax.random.split(jax.random.PRNGKey(c.train.seed))[0]
    return unbox(jax.jit(spec.module.init)(rng, *spec.init_args)["params"])


def test_the_stage_loss_is_ce_plus_weight_times_the_distance_to_the_teacher_tokens(initial_params):
    c = load("--config.data.global_batch=4", "--config.stage.losses.distill_image=0.5")
    spec = registry.build(c.model)
    params = initial_params
    host = next(pipeline.make_data(c, 0, 1))
    batch = {k: host[k] for k in spec.batch_specs(4, c.data.seq_len)}
    loss, metrics = jax.jit(trainer.weighted_loss(spec.loss_fn, dict(c.stage.losses)))(
        params, batch, jax.random.PRNGKey(1))

    # The same terms computed apart: plain HoVLE's CE on the params without the teacher; its LLM
    # inputs and the teacher's features, paired by hand (the k-th placeholder of a row <-> token k).
    # Each compiled whole: op by op, they cost three times as long.
    student = {k: v for k, v in params.items() if k != "teacher"}
    plain = registry.build(ml_collections.ConfigDict(dict(c.model.to_dict(), teacher="")))
    ce = jax.jit(plain.loss_fn)(student, batch, jax.random.PRNGKey(1))[1]["ce"]
    cfg, teacher_cfg = spec.config, registry._hovle_teacher(c.model)[0].teacher
    embed = jax.jit(lambda p, b: hovle.HoVLE(cfg).apply({"params": p}, b["tokens"], b["pixels"], b["segment_ids"],
                                                        b["tile_mask"], method=hovle.HoVLE.embed_inputs).llm_inputs)
    llm_inputs = np.asarray(embed(student, batch))
    s = cfg.image_size
    features = np.asarray(jax.jit(vit.ClipTeacher(teacher_cfg).apply)({"params": params["teacher"]},
                                                                      batch["pixels"].reshape(-1, s, s, 3))[0])
    features = features.reshape(4, -1, features.shape[-1])   # [B, P n, E], tiles in slot order
    distances = []
    for b in range(4):
        where = np.flatnonzero((batch["tokens"][b] == cfg.img_context_token_id) & (batch["segment_ids"][b] > 0))
        assert len(where) == cfg.image_tokens_per_tile   # one tile per scene
        for k, pos in enumerate(where):
            x, z = llm_inputs[b, pos], features[b, k]
            distances.append(1 - x @ z / np.linalg.norm(x) / np.linalg.norm(z))
    distill = np.mean(distances)
    assert distill > 0.1   # random weights: far from the teacher, so the term weighs something
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill_image"], distill, rtol=1e-4)
    np.testing.assert_allclose(loss, ce + 0.5 * distill, rtol=1e-5)


def _tensors(directory):
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_teacher_stays_frozen_and_out_of_evaluation_and_export(tmp_path, initial_params):
    c = load("--config.stage.start.kind=fresh", "--config.data.global_batch=8", "--config.train.steps=2",
             "--config.train.log_every=1", "--config.train.progress_bar=False")
    result = trainer.train(c, str(tmp_path / "stage3"))
    assert np.isfinite(result["metrics"]["distill_image"]) and result["metrics"]["distill_image"] > 0
    init = initial_params
    _, trained = ckpt_lib.load_params(str(tmp_path / "stage3"))
    jax.tree.map(np.testing.assert_array_equal, trained["teacher"], init["teacher"])
    assert not np.array_equal(trained["embedding_model"]["pixel_shuffle_proj"]["fc1"]["kernel"],
                              init["embedding_model"]["pixel_shuffle_proj"]["fc1"]["kernel"])

    name, cfg, params = evaluate.load_model(tmp_path / "stage3")
    assert (name, type(cfg), sorted(params)) == ("hovle", hovle.HoVLEConfig, ["embedding_model", "language_model"])
    hovle_port.save_checkpoint(tmp_path / "final", cfg, params)
    files = hovle_port.export_hovle(tmp_path / "final", tmp_path / "official")
    names = set().union(*(load_file(f) for f in files if f.suffix == ".safetensors"))
    assert names == set(hovle_port.official_shapes(cfg))
    assert not any("teacher" in n for n in names)
    # `evejax export` of the workdir itself writes the same tensors (its newest checkpoint, no teacher).
    assert commands.export_main([str(tmp_path / "stage3"), str(tmp_path / "official_from_workdir")]) == 0
    want, got = (_tensors(tmp_path / d) for d in ("official", "official_from_workdir"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)

