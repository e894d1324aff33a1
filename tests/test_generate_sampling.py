"""Sampling in the generate loop: temperature 0 is greedy, a seed reproduces the tokens, top-k then
top-p keep exactly the nucleus of a hand-made distribution."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evejax.eval import generate as gen
from evejax.models import llm

# ids 0..4 with probabilities 0.05, 0.5, 0.15, 0.3, 0: the most likely first are 1, 3, 2, 0
PROBS = np.array([0.05, 0.5, 0.15, 0.3, 0.0])
LOGITS = np.log(np.maximum(PROBS, 1e-12)).astype(np.float32)


def kept(top_p, top_k=0):
    return set(np.flatnonzero(np.isfinite(np.asarray(gen.filter_logits(LOGITS[None], top_p, top_k))[0])).tolist())


def test_top_k_then_top_p_keep_exactly_the_nucleus():
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert kept(0.4) == {1}                      # the most likely id alone reaches 0.4
    assert kept(0.75) == {1, 3}                  # 0.5 before id 3 < 0.75; 0.8 before id 2 is not
    assert kept(0.83) == {1, 2, 3}               # 0.8 before id 2 < 0.83
    assert kept(1.0, top_k=2) == {1, 3}
    # top-k first, then the nucleus of the renormalised rest: before id 2 is 0.8 / 0.95 = 0.842 >= 0.83
    assert kept(0.83, top_k=3) == {1, 3}

    # drawn at temperature 1: only the nucleus, in its renormalised proportions 0.625 / 0.375
    rows = 4000
    choose = jax.jit(functools.partial(gen._choose, step=0))
    knobs = gen.Sampling(temperature=1.0, top_p=0.75).knobs()
    drawn = np.asarray(choose(jnp.tile(LOGITS, (rows, 1)), knobs, jax.random.PRNGKey(0)))
    assert set(drawn.tolist()) == {1, 3}
    assert abs(np.mean(drawn == 1) - 0.625) < 0.03
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.Sampling(temperature=1.0, top_p=0.0)


def test_temperature_zero_is_greedy_and_a_seed_reproduces():
    cfg = llm.get_config("llama_tiny")
    model = llm.CausalLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 4.0, params)  # peaked logits: greedy tokens vary along a row
    tokens, mask = gen.left_pad([[1, 5, 7, 9, 11], [1, 30], [1, 2, 3]], pad_id=0)
    new = 8
    greedy = np.asarray(gen.greedy_generate(model, params, tokens, mask, new))
    assert len(set(greedy.ravel().tolist())) > 3, greedy

    def sample(sampling, seed):
        return np.asarray(gen.greedy_generate(model, params, tokens, mask, new, sampling=sampling,
                                              rng=jax.random.PRNGKey(seed)))

    # the sampled path with its cuts on, at temperature 0
    np.testing.assert_array_equal(sample(gen.Sampling(0.0, top_p=0.5, top_k=3), 1), greedy)
    compiled = gen._greedy_cached._cache_size()
    warm = gen.Sampling(temperature=1.5, top_p=0.95, top_k=50)
    first = sample(warm, 7)
    np.testing.assert_array_equal(sample(warm, 7), first)
    assert not np.array_equal(first, greedy) and not np.array_equal(sample(warm, 8), first)
    assert gen._greedy_cached._cache_size() == compiled  # other knobs and seeds: traced, nothing compiled


def test_generate_cli_samples_reproducibly(tmp_path, capsys):
    from evejax import sharding
    from evejax.port import checkpoint

    cfg = llm.get_config("llama_tiny")
    params = sharding.unbox(llm.CausalLM(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
    checkpoint.save_checkpoint(tmp_path / "lm", cfg, jax.tree.map(lambda x: np.asarray(x) * 4.0, params))

    def printed(*flags):
        assert gen.main([str(tmp_path / "lm"), "--prompt-ids", "1,5,7", "--prompt-ids", "4,2", "--max-new", "8",
                         "--no-eos", *flags]) == 0
        return capsys.readouterr().out

    greedy = printed()
    assert printed("--temperature", "0", "--top-k", "3") == greedy
    hot = printed("--temperature", "1.5", "--seed", "3")
    assert printed("--temperature", "1.5", "--seed", "3") == hot != greedy
    with pytest.raises(SystemExit):
        printed("--temperature", "1", "--top-p", "1.5")
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
