"""HoVLE greedy generation with two KV caches (embedding layers, LLM) against full recomputation
and the PyTorch reference, for "pre" and "post"."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

from test_hovle_port import CTX, EMBEDDING, IMG_END, IMG_START, LLM, official_config  # noqa: E402

from evejax.data import shapes  # noqa: E402
from evejax.data import text as text_lib  # noqa: E402
from evejax.eval import evaluate  # noqa: E402
from evejax.eval import generate as gen  # noqa: E402
from evejax.models import eve, hovle  # noqa: E402
from evejax.port import commands, io  # noqa: E402
from evejax.port import eve as eve_port  # noqa: E402
from evejax.port import hovle as hovle_port  # noqa: E402
from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig, InternVLChatModel  # noqa: E402

NEW = 4
# The port tests' tiny HoVLE with positions far below max_position_embeddings: dynamic NTK
# scaling would follow the padded batch's longest row (hovle.py), which a row alone does not see.
GEN_EMBEDDING = {**EMBEDDING, "max_position_embeddings": 512}
GEN_LLM = dataclasses.replace(LLM, max_position_embeddings=512)


def reference(loc, seed=0):
    torch.manual_seed(seed)
    model = InternVLChatModel(HolisticEmbeddingConfig(**GEN_EMBEDDING, pixel_shuffle_loc=loc), GEN_LLM).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    return model


def gen_official_config(loc, normalize=False):
    config = official_config(loc)
    return {**config, "normalize_encoder_output": normalize, "embedding_config": {**config["embedding_config"], "max_position_embeddings": 512},
            "llm_config": GEN_LLM.to_hf_config_dict()}


def ported(model, loc):
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = hovle_port.config_from_hf(gen_official_config(loc, model.normalize_encoder_output))
    return cfg, hovle_port.to_flax(state, cfg)


def prompt(rng, before, after, tiles, per_tile):
    text = lambda k: rng.integers(3, 240, k).tolist()  # noqa: E731
    return [1] + text(before) + [IMG_START] + [CTX] * per_tile * tiles + [IMG_END] + text(after)


@pytest.mark.parametrize("loc,normalize", [("pre", True), ("post", False)])
def test_cached_greedy_equals_full_recomputation_and_the_reference(loc, normalize):
    """Row 0: one tile; row 1: three tiles + thumbnail and a longer prompt (left padding)."""
    model = reference(loc, seed=2)
    model.normalize_encoder_output = normalize
    cfg, params = ported(model, loc)
    assert cfg.normalize_encoder_output == normalize
    layouts = [(3, 4, 1), (2, 7, 4)]
    rows = [prompt(np.random.default_rng(i), *lay, 4) for i, lay in enumerate(layouts)]
    hd_rows = [prompt(np.random.default_rng(i), *lay, 16) for i, lay in enumerate(layouts)]
    tiles = [np.random.default_rng(10 + i).standard_normal((lay[2], 3, 56, 56)).astype(np.float32)
             for i, lay in enumerate(layouts)]
    tokens, mask = gen.left_pad(rows, pad_id=2)
    pixels = np.zeros((2, cfg.tile_slots, 56, 56, 3), np.float32)
    for b, t in enumerate(tiles):
        pixels[b, :len(t)] = t.transpose(0, 2, 3, 1)
    tile_mask = np.arange(cfg.tile_slots)[None] < np.array([[len(t)] for t in tiles])
    module = hovle.HoVLE(cfg)

    cached = np.asarray(gen.greedy_generate_hovle(module, params, tokens, mask, pixels, NEW, tile_mask=tile_mask))
    # A generated <IMG_CONTEXT> is text to the cache but an image slot to the recomputation.
    assert CTX not in cached and len({tuple(r) for r in cached}) == 2, cached
    recomputed = np.asarray(gen.generate_full_recompute_hovle(module, params, tokens, mask, pixels, NEW))
    np.testing.assert_array_equal(cached, recomputed)
    for b in range(2):
        args = (torch.from_numpy(tiles[b]), torch.tensor([rows[b]]), NEW, torch.tensor([hd_rows[b]]))
        want = model.generate(*args, use_cache=False)  # "post": the reference by full recomputation
        if loc == "pre":  # and the official cached branch: new token -> embedding layers -> LLM
            np.testing.assert_array_equal(model.generate(*args, use_cache=True).numpy(), want.numpy())
        np.testing.assert_array_equal(cached[b], want[0].numpy())

    # Any of several stop ids ends a row, which then repeats the first; row 0 stops at its 2nd token.
    stops = (255, int(cached[0, 1]))
    stopped = np.asarray(gen.greedy_generate_hovle(module, params, tokens, mask, pixels, NEW, eos_id=stops,
                                                   tile_mask=tile_mask))
    for got, row in zip(stopped, cached):
        end = next((k for k, t in enumerate(row) if t in stops), NEW - 1)
        np.testing.assert_array_equal(got, np.concatenate([row[:end + 1], [stops[0]] * (NEW - 1 - end)]))
