"""HoVLE model: batched / padded "post" rows against the batch-1 official semantics, the L2
normalisation, the bicubic position resize, the placeholder check, the config, the registry
entry (loss mask, batch shapes, FLOPs) and the 2.6B parameter count."""
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_hovle_port import (CTX, EMBEDDING, IMG_END, IMG_START, TOLERANCE, official_config,  # noqa: E402
                             reference, rel)

from evejax.models import hovle, registry  # noqa: E402
from evejax.models import llm as llm_lib  # noqa: E402
from evejax.port import hovle as hovle_port  # noqa: E402
from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig, VisionEmbeddings  # noqa: E402


def _row(rng, before, after, tiles, per_tile):
    text = lambda k: rng.integers(3, 240, k).tolist()  # noqa: E731
    return [1] + text(before) + [IMG_START] + [CTX] * per_tile * tiles + [IMG_END] + text(after)


def _random_params(cfg, seed=0):
    """N(0, 0.1) values in the shapes `HoVLE(cfg).init` makes, without compiling the init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), hovle.abstract_params(cfg))


def _params(model, loc, **overrides):
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = hovle_port.config_from_hf({**official_config(loc), **overrides})
    return cfg, hovle_port.to_flax(state, cfg)


@pytest.mark.parametrize("loc,normalize", [("post", False), ("pre", True)])
def test_packed_and_padded_batch_matches_the_reference_sample_by_sample(loc, normalize):
    """Row 0 packs samples 0 and 1 (segments 1, 2; tiles 0, 1), row 1 holds sample 2 and padding.
    One tile per sample keeps every segment below the dynamic-NTK thresholds: scaling follows
    the batch's longest row (as transformers for padded batches), which a sample alone does not see."""
    model = reference(loc, seed=1)
    model.normalize_encoder_output = normalize
    cfg, params = _params(model, loc, normalize_encoder_output=normalize)
    assert cfg.normalize_encoder_output == normalize
    layouts, packing = [(3, 4), (2, 2), (4, 3)], [[0, 1], [2]]
    samples = [_row(np.random.default_rng(i), *lay, 1, 4) for i, lay in enumerate(layouts)]
    hd_samples = [_row(np.random.default_rng(i), *lay, 1, 16) for i, lay in enumerate(layouts)]
    tiles = np.random.default_rng(3).standard_normal((len(samples), 3, 56, 56)).astype(np.float32)
    n = max(sum(len(samples[i]) for i in row) for row in packing)
    tokens, segments = np.zeros((2, n), np.int32), np.zeros((2, n), np.int32)
    pixels = np.zeros((2, 2, 56, 56, 3), np.float32)
    where = {}
    for b, row in enumerate(packing):
        at = 0
        for k, i in enumerate(row):
            tokens[b, at:at + len(samples[i])], segments[b, at:at + len(samples[i])] = samples[i], k + 1
            pixels[b, k] = tiles[i].transpose(1, 2, 0)
            where[i] = (b, slice(at, at + len(samples[i])))
            at += len(samples[i])
    tile_mask = np.array([[True, True], [True, False]])
    got = jax.jit(hovle.HoVLE(cfg).apply)({"params": params}, tokens, pixels, segments, tile_mask)
    for i, (sample, hd_sample) in enumerate(zip(samples, hd_samples)):
        with torch.no_grad():
            want = model(torch.from_numpy(tiles[i:i + 1]), torch.tensor([sample]), torch.tensor([hd_sample]))
        assert rel(got[where[i]], want[0].numpy()) <= TOLERANCE


def test_position_embedding_resize_is_torch_bicubic():
    ref = VisionEmbeddings(HolisticEmbeddingConfig(**EMBEDDING))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 1.0)
    grid = 4
    params = {"class_embedding": ref.class_embedding.detach().numpy(),
              "position_embedding": ref.position_embedding.detach().numpy(),
              "patch_embedding": {"kernel": ref.patch_embedding.weight.detach().numpy().transpose(2, 3, 1, 0),
                                  "bias": ref.patch_embedding.bias.detach().numpy()}}
    module = hovle.VisionEmbeddings(64, 14, grid)
    for side in (42, 56, 98):  # grids 3 (shrink), 4 (identity), 7 (grow)
        pixels = np.random.default_rng(side).standard_normal((2, 3, side, side)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(pixels)).numpy()
        got = module.apply({"params": params}, pixels.transpose(0, 2, 3, 1))
        assert got.shape == want.shape and rel(got, want) <= TOLERANCE


def test_placeholder_count_mismatch_is_refused_with_the_counts():
    cfg = hovle.get_config("tiny")
    tokens, pixels = hovle.init_inputs(cfg)
    params = {"params": {}}  # the check comes before any parameter is read or anything is computed
    short = np.asarray(tokens)[:, :-2]  # BOS + 3 placeholders: one fewer than 1 tile x 4
    with pytest.raises(ValueError, match=r"3 <IMG_CONTEXT> tokens \(id 250\) but 1 tile\(s\) x 4 .* = 4"):
        hovle.HoVLE(cfg).apply(params, short, pixels)
    with pytest.raises(ValueError, match=r"row 0: 4 <IMG_CONTEXT> .* 2 tile\(s\)"):
        hovle.HoVLE(cfg).apply(params, tokens, np.concatenate([pixels, pixels], axis=1))
    hovle.check_placeholders(cfg, tokens, np.array([[True, False]]))  # the second slot is padding


def test_config_fields_and_the_2_6b_count():
    cfg = hovle.get_config("tiny", embedding_num_layers=3, num_layers=1, dtype="bfloat16",
                           pixel_shuffle_loc="post", vocab_size=300, embedding_vocab_size=260)
    assert cfg.embedding.transformer.num_layers == 3 and cfg.llm.transformer.num_layers == 1
    assert (cfg.llm.vocab_size, cfg.embedding.vocab_size) == (300, 260)
    assert cfg.embedding.transformer.dtype == cfg.llm.transformer.dtype == "bfloat16"
    with pytest.raises(ValueError, match="no field"):
        hovle.get_config("tiny", embeding_num_layers=3)
    with pytest.raises(ValueError, match="pixel_shuffle_loc='middle'"):
        hovle.get_config("tiny", pixel_shuffle_loc="middle")
    big = hovle.get_config("2.6b")
    assert hovle.param_count(big) == 2_606_327_808
    assert big.image_tokens_per_tile == 256 and hovle.get_config("2.6b_hd").encoder_length(10) == 10 + 3 * 7 * 256


def test_registry_entry_loss_mask_and_flops():
    spec = registry.build(ml_collections.ConfigDict({"name": "hovle", "size": "tiny"}))
    cfg = spec.config
    rng = np.random.default_rng(0)
    slots = cfg.tile_slots
    rows = [_row(rng, 2, 3, slots, 4) for _ in range(2)]
    tokens = np.array(rows, np.int32)
    b, n = tokens.shape
    specs = spec.batch_specs(b, n)
    assert specs["pixels"].shape == (b, slots, 56, 56, 3) and specs["tokens"].shape == (b, n)
    targets = np.concatenate([tokens[:, 1:], np.full((b, 1), -100)], axis=1).astype(np.int32)
    segments = np.ones((b, n), np.int32)
    segments[1, -2:] = 0
    batch = {"tokens": tokens, "targets": targets, "segment_ids": segments,
             "loss_mask": np.ones((b, n), np.float32),
             "pixels": rng.standard_normal((b, slots, 56, 56, 3)).astype(np.float32),
             "tile_mask": np.ones((b, slots), bool)}
    params = _random_params(cfg)
    (loss, metrics), logits = jax.jit(lambda p: (
        spec.loss_fn(p, batch, jax.random.PRNGKey(1)),
        spec.module.apply({"params": p}, tokens, batch["pixels"], segments)))(params)
    keep = (targets != CTX) & (targets >= 0) & (segments > 0)
    nll = -jax.nn.log_softmax(logits)[np.arange(b)[:, None], np.arange(n)[None], np.maximum(targets, 0)]
    assert metrics["weight"] == keep.sum() < b * n - 2 * slots * 4
    np.testing.assert_allclose(loss, jnp.sum(nll * keep) / keep.sum(), rtol=1e-6)

    parts = hovle.training_flops(cfg, b, n)
    assert spec.flops_per_step(b, n) == sum(parts.values())
    assert parts["llm"] == llm_lib.training_flops_per_step(cfg.llm, b, n)
    post = hovle.training_flops(cfg.replace(pixel_shuffle_loc="post"), b, n)
    # "post" runs the embedding layers on the HD stream: s^2 - 1 = 3 more tokens per image token.
    assert post["embedding"] == hovle.training_flops(cfg, b, n + 3 * slots * 4)["embedding"]
    assert post["vision"] == parts["vision"] and post["llm"] == parts["llm"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU topology needs libtpu (pip install -e .[tpu]; CI installs it)")
def test_plan_compiles_the_sharded_train_step():
    from evejax import plan

    config = ml_collections.ConfigDict({"model": {"name": "hovle", "size": "tiny"}, "optim": {"lr": 1e-3},
                                        "mesh": {"slice": 1, "data": -1, "fsdp": 1, "tensor": 1}})
    topo = plan.parse_topology("v5p-8")
    p = plan.Planner(config, topo, plan.virtual_devices(topo), effort="fast")("full", 2, 32)
    cfg = hovle.get_config("tiny")
    assert p.fits and p.global_batch == 8
    assert p.model_flops == pytest.approx(sum(hovle.training_flops(cfg, 8, 32).values()) / 4)


def test_embedding_drop_path_grows_linearly_over_the_layers():
    """drop_path 1.0 over 2 layers: layer 0 never drops (rate 0), layer 1 always does (rate 1), so
    in training the module is its first layer alone."""
    cfg = hovle.get_config("tiny", embedding_drop_path=1.0, remat="none")
    tokens, pixels = hovle.init_inputs(cfg, batch=2)
    params = _random_params(cfg)
    first = jax.tree.map(lambda x: x[:1], params["embedding_model"]["encoder"])
    one_layer = hovle.get_config("tiny", embedding_num_layers=1, remat="none")
    embed = lambda c, p, **kw: hovle.HoVLE(c).apply(  # noqa: E731
        {"params": p}, tokens, pixels, method=hovle.HoVLE.embed_inputs, **kw).encoder_outputs
    got, want = jax.jit(lambda p, q: (
        embed(cfg, p, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}), embed(one_layer, q)))(
        params, {**params, "embedding_model": {**params["embedding_model"], "encoder": first}})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_causal_blocks_and_unrolled_layers_reach_both_stacks_and_leave_the_logits():
    """xla_causal_blocks and scan_unroll (speed options, README "The demo") are set on the embedding layers
    too, and change no logit of a padded batch of rows whose length 4 divides."""
    cfg = hovle.get_config("tiny", max_tiles=1)
    fast = cfg.replace(xla_causal_blocks=4, scan_unroll=3)
    for stack in (fast.embedding.transformer, fast.llm.transformer):
        assert (stack.xla_causal_blocks, stack.scan_unroll) == (4, 3)
    rng = np.random.default_rng(0)
    rows = [_row(rng, 3, 9, 1, cfg.image_tokens_per_tile), _row(rng, 2, 4, 1, cfg.image_tokens_per_tile)]
    n = 4 * -(-max(map(len, rows)) // 4)
    tokens, segments = np.zeros((2, n), np.int32), np.zeros((2, n), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)], segments[b, :len(row)] = row, 1
    pixels = rng.standard_normal((2, 1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    params = _random_params(cfg)
    logits = [jax.jit(hovle.HoVLE(c).apply)({"params": params}, tokens, pixels, segments) for c in (cfg, fast)]
    real = segments > 0
    np.testing.assert_allclose(logits[1][real], logits[0][real], rtol=1e-5, atol=1e-5)
