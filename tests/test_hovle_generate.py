"""HoVLE greedy generation with two KV caches (embedding layers, LLM) against full recomputation
and the PyTorch reference, for "pre" and "post", and `evejax generate CKPT --image --prompt` for
HoVLE and EVE checkpoints against the Python API."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")

from test_hovle_port import CTX, EMBEDDING, IMG_END, IMG_START, LLM, official_config  # noqa: E402

from evejax.data import shapes  # noqa: E402
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
    embedding = {**config["embedding_config"], "max_position_embeddings": 512}
    return {**config, "normalize_encoder_output": normalize, "embedding_config": embedding,
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


# ---- evejax generate CKPT --image IMG --prompt TEXT ----------------------------------------

# Chat and image tokens after the SentencePiece vocabulary (< 240), as added_tokens.json gives them.
ADDED = {"<|im_end|>": 245, "<|im_start|>": 246, "<img>": IMG_START, "</img>": IMG_END, "<IMG_CONTEXT>": CTX}


@pytest.fixture(scope="module")
def hovle_checkpoint(tmp_path_factory):
    """`evejax import --family hovle` of a tiny "pre" HoVLE with a trained tokenizer.model."""
    root = tmp_path_factory.mktemp("hovle_gen")
    official = root / "official"
    official.mkdir()
    words = ["".join(np.random.default_rng(i).choice(list("abcdefghijklmnopqrstuvwxyz"), 5)) for i in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(words * 3), model_prefix=str(official / "tokenizer"), vocab_size=240,
        model_type="unigram", hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (official / "tokenizer.vocab").unlink()
    (official / "added_tokens.json").write_text(json.dumps(ADDED))
    model = reference("pre", seed=5)
    io.save_state_dict({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, official)
    io.save_config_json(gen_official_config("pre"), official)
    assert commands.import_main(["--family", "hovle", str(official), str(root / "ckpt")]) == 0
    return root / "ckpt", model


def _png(path, size, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_generate_cli_answers_with_a_hovle_checkpoint(hovle_checkpoint, tmp_path, capsys):
    ckpt, model = hovle_checkpoint
    picture = _png(tmp_path / "wide.png", (160, 60))  # 3 x 1 tiles + thumbnail at max_tiles 3
    question = "abcde fghij?"
    assert gen.main([str(ckpt), "--image", str(picture), "--prompt", question, "--max-new", "6"]) == 0
    printed = capsys.readouterr().out

    answerer = gen.load_answerer(ckpt, max_new_tokens=6)
    assert isinstance(answerer, gen.HoVLEAnswerer)
    from evejax.eval.benchmarks import run

    assert run.ModelAnswer(answerer).batch_size == gen.HOVLE_BATCH == 8  # eval --bench asks 8 at a time
    answer = answerer.answer([Image.open(picture)], [question])[0]
    assert printed == answer + "\n"

    # The same answer from the reference: the official prompt (BOS, system, 4 tiles x 4
    # <IMG_CONTEXT>, "<image>\n" before the question), tiled pixels, greedy until <|im_end|>.
    ids = answerer.prompt_ids(question, 4)
    start = ids.index(IMG_START)
    assert ids[0] == 1 and ids.count(ADDED["<|im_start|>"]) == 3 and ids.count(ADDED["<|im_end|>"]) == 2
    assert ids[start:start + 18] == [IMG_START] + [CTX] * 16 + [IMG_END] and ids.count(CTX) == 16
    tiled = gen.HoVLEAnswerer.tiles(answerer.cfg, Image.open(picture))
    assert tiled.num_tiles == 4
    pixels = torch.from_numpy(tiled.pixels[:4].transpose(0, 3, 1, 2).copy())
    want = model.generate(pixels, torch.tensor([ids]), 6, eos_token_id=ADDED["<|im_end|>"])[0].tolist()
    assert answer == evaluate.decode_answer(gen._until(want, answerer.stops), answerer.tokenizer)
    assert not evaluate.is_out_of_vocabulary(answer) and answer, answer

    # A tokenizer.model alone has InternLM2's special ids, not this checkpoint's.
    other = ["--tokenizer", str(ckpt.parent / "official" / "tokenizer.model")]
    assert gen.main([str(ckpt), "--image", str(picture), "--prompt", question] + other) == 1
    assert "img_context_token_id is 250" in capsys.readouterr().err


def test_generate_cli_answers_with_an_eve_checkpoint(tmp_path, capsys):
    from test_eve_model import random_jax_params

    demo = eve.get_config("demo")
    cfg = demo.replace(llm=demo.llm.replace(vocab_size=shapes.tokenizer().vocab_size))
    params = random_jax_params(cfg, seed=3)
    eve_port.save_checkpoint(tmp_path / "ckpt", cfg, params)
    picture = tmp_path / "scene.png"
    shapes.render(shapes.scene(0, "heldout")).save(picture)
    question = "what colour is the circle?"
    argv = [str(tmp_path / "ckpt"), "--image", str(picture), "--prompt", question, "--max-new", "3"]
    assert gen.main(argv) == 1  # an EVE checkpoint carries no tokenizer
    assert "--tokenizer" in capsys.readouterr().err
    assert gen.main(argv + ["--tokenizer", "shapes"]) == 0
    want = evaluate.Answerer(cfg, params, batch_size=1, tokenizer=shapes.tokenizer(), max_new_tokens=3).answer(
        [Image.open(picture)], [question])[0]
    assert capsys.readouterr().out == want + "\n"


def test_generate_cli_refuses_what_it_cannot_answer(tmp_path, capsys):
    lm = tmp_path / "lm"
    from evejax.models import llm as llm_lib
    from evejax.port import checkpoint
    from evejax.port.tables import abstract_params

    cfg = llm_lib.get_config("llama_tiny")
    checkpoint.save_checkpoint(lm, cfg, jax_zeros(abstract_params(cfg)))
    picture = _png(tmp_path / "a.png", (30, 30))
    assert gen.main([str(lm), "--image", str(picture), "--prompt", "hi"]) == 1
    assert "no EVE or HoVLE checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gen.main([str(lm), "--image", str(picture)])
    assert "--image and --prompt go together" in capsys.readouterr().err


def jax_zeros(tree):
    import jax

    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
