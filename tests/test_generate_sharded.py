"""Batched generation on a mesh of the 8 fake CPU devices (data 2 x fsdp 2 x tensor 2): parameters
sharded by the model's logical axes, rows over the data axes; the tokens equal the unsharded run's,
sampled for a CausalLM from embeddings (as EVE decodes), greedy for HoVLE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpoint_io import _init
from test_hovle_eval import MODEL as HOVLE_MODEL
from test_hovle_eval import SPECIAL, TOKENIZER

from evejax import sharding
from evejax.eval import evaluate as ev
from evejax.eval import generate as gen
from evejax.models import hovle, llm


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_causal_lm_tokens_on_a_mesh_equal_the_unsharded_run(mesh):
    cfg = llm.get_config("llama_tiny")
    model = llm.CausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 4.0, sharding.unbox(params))
    rng = np.random.default_rng(0)
    tokens, mask = gen.left_pad([rng.integers(3, 256, n).tolist() for n in (3, 9, 5, 2, 7, 4, 6, 8)], pad_id=0)
    embeds = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), method="embed"))
    run = lambda m: np.asarray(gen.greedy_generate(  # noqa: E731
        model, params, None, mask, 6, inputs_embeds=embeds, sampling=gen.Sampling(temperature=1.5, top_p=0.9),
        rng=jax.random.PRNGKey(4), mesh=m))
    alone = run(None)
    assert len(set(alone.ravel().tolist())) > 4, alone
    np.testing.assert_array_equal(run(mesh), alone)

    # the parameters really are split: the query projection over fsdp (embed) and tensor (heads)
    placed, _ = gen._on_mesh(mesh, model, params, (mask,), (mask,))
    q = placed["decoder"]["layers"]["attention"]["query"]["kernel"]
    assert {"fsdp", "tensor"} <= set(jax.tree.leaves(tuple(q.sharding.spec))), q.sharding.spec
    with pytest.raises(ValueError, match="6 rows does not divide over the mesh's 4 data-parallel"):
        gen.greedy_generate(model, params, tokens[:6], mask[:6], 2, mesh=mesh)


def test_hovle_tokens_on_a_mesh_equal_the_unsharded_run(mesh):
    cfg, params = _init(HOVLE_MODEL, 3)
    answerer = gen.HoVLEAnswerer(cfg, params, TOKENIZER, SPECIAL, 4)
    questions = ev.heldout_questions(4)
    tiled = [answerer.tiles(cfg, q.image) for q in questions]
    tokens, mask = gen.left_pad([answerer.prompt_ids(q.question, t.num_tiles) for q, t in zip(questions, tiled)],
                                TOKENIZER.pad_id)
    args = (hovle.HoVLE(cfg), params, tokens, mask, np.stack([t.pixels for t in tiled]), 4)
    tile_mask = np.stack([t.tile_mask for t in tiled])
    alone = np.asarray(gen.greedy_generate_hovle(*args, tile_mask=tile_mask))
    assert len(set(alone.ravel().tolist())) > 2, alone
    np.testing.assert_array_equal(np.asarray(gen.greedy_generate_hovle(*args, tile_mask=tile_mask, mesh=mesh)), alone)
