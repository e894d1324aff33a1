"""`evejax eval` on HoVLE: a tiny HoVLE checkpoint and training workdir answer held-out shapes
questions as HoVLE trains on them (internlm2-chat with the shapes tokenizer's chat ids, the
InternVL tiles of the model's config), and the answers equal greedy_generate_hovle's on each
question's prompt cut from the training encoding of that one-round conversation."""
import json

import ml_collections
import numpy as np
import pytest
from test_checkpoint_io import _init, _workdir

from evejax.data import image as image_lib
from evejax.data import pipeline, shapes
from evejax.data import text as text_lib
from evejax.eval import evaluate as ev
from evejax.eval import generate as gen
from evejax.models import hovle
from evejax.port import hovle as hovle_port

TOKENIZER = shapes.tokenizer()
SPECIAL = pipeline.special_ids("shapes", TOKENIZER)
# Tiny HoVLE (56 px tiles, up to 3 tiles + thumbnail) over the shapes tokenizer's 67 words and
# the 5 chat and image ids after them, so answers decode to words.
MODEL = dict(name="hovle", size="tiny", overrides=dict(
    dtype="float32", remat="none", vocab_size=72, embedding_vocab_size=72,
    img_context_token_id=SPECIAL[text_lib.IMG_CONTEXT]))
QUESTIONS = 10


@pytest.fixture(scope="module")
def hovle_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hovle_eval")
    cfg, params = _init(MODEL, 3)
    hovle_port.save_checkpoint(root / "ckpt", cfg, params)
    _workdir(root / "run", {"model": MODEL}, params, 2)
    return root, cfg, params


def training_prompt(cfg, question: str, num_tiles: int) -> list[int]:
    """The ids training sees before the answer of a one-round conversation about one image."""
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "yes"}]
    encoded = text_lib.encode_internlm2_chat(turns, TOKENIZER, [num_tiles], cfg.image_tokens_per_tile, SPECIAL)
    return encoded.input_ids[:int(np.argmax(encoded.loss_mask))].tolist()


def test_eval_answers_equal_greedy_generate_hovle(hovle_checkpoint, tmp_path):
    root, cfg, params = hovle_checkpoint
    questions = ev.heldout_questions(QUESTIONS)
    tiling = image_lib.TilingConfig(**{k: v for k, v in pipeline.model_geometry(ml_collections.ConfigDict(MODEL))
                                       .items() if k in ("tile_size", "max_tiles")})
    stops = (SPECIAL[text_lib.IM_END], TOKENIZER.eos_id)
    tiled = [image_lib.tile_image(q.image, tiling) for q in questions]
    prompts = [training_prompt(cfg, q.question, t.num_tiles) for q, t in zip(questions, tiled)]
    # One call, padded further left than the answerer pads.
    tokens, mask = gen.left_pad(prompts, TOKENIZER.pad_id, max(map(len, prompts)) + 3)
    new = gen.greedy_generate_hovle(hovle.HoVLE(cfg), params, tokens, mask, np.stack([t.pixels for t in tiled]),
                                    ev.MAX_NEW_TOKENS, stops, tile_mask=np.stack([t.tile_mask for t in tiled]))
    want = [ev.decode_answer(gen._until(row, stops), TOKENIZER) for row in np.asarray(new).tolist()]
    assert len({t.num_tiles for t in tiled}) > 1  # prompts with several tile counts
    assert len(set(want)) > 1 and not all(map(ev.is_out_of_vocabulary, want)), want

    for source in (root / "ckpt", root / "run"):  # a checkpoint and a training workdir
        out = tmp_path / f"{source.name}.json"
        argv = [str(source), "--num-questions", str(QUESTIONS), "--batch-size", "4", "--json", str(out)]
        assert ev.main(argv) == 0
        figures = json.loads(out.read_text())
        assert figures["predictions"] == want, source
        assert figures["accuracy"] == ev.score(questions, want).accuracy
    assert ev.load_model(root / "ckpt")[0] == "hovle"


def test_eval_refuses_a_stage1_workdir(tmp_path, capsys):
    model = dict(MODEL, teacher="tiny", teacher_overrides=dict(image_size=56, patch_size=14, llm_dim=64))
    _, params = _init(model, 0)
    _workdir(tmp_path / "stage1", {"model": model}, params, 1)
    assert ev.main([str(tmp_path / "stage1")]) == 1
    assert "HoVLEDistillConfig, which answers no questions" in capsys.readouterr().err
