"""Generated shapes set: determinism, disjoint splits, texts that match the pixels."""
import re

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from evejax.data import pipeline
from evejax.data import shapes as sh
from evejax.data import text as tx

COLOUR_OF = {rgb: name for name, rgb in sh.COLOURS.items()}


def _seen(image):
    """Shapes as read back from the pixels: [(kind, colour, x0, y0, width, height, n_pixels)]."""
    px = np.asarray(image)
    labels, n = ndimage.label(np.any(px != sh.BACKGROUND, axis=-1))
    out = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        region = labels[rows, cols] == k + 1
        colours = {tuple(c) for c in px[rows, cols][region]}
        assert len(colours) == 1, "a shape has exactly one colour (no anti-aliasing)"
        # A square's top row is full, a triangle's bottom row is full, a circle's neither.
        kind = "square" if region[0].all() else "triangle" if region[-1].all() else "circle"
        out.append((kind, COLOUR_OF[colours.pop()], cols.start, rows.start, cols.stop - cols.start,
                    rows.stop - rows.start, int(region.sum())))
    return out


def _answer(question, seen, width, height):
    """Answers a generated question from the pixel-derived shapes alone."""
    def half(start, extent, size, low, high):
        return low if 2 * (start + extent) <= size else high if 2 * start >= size else None

    def find(name):
        """The one shape `name` ("circle" or "red one") denotes."""
        word = name.removesuffix(" one")
        (hit,) = [s for s in seen if word in (s[0], s[1]) and (name.endswith(" one")) == (word in sh.COLOURS)]
        return hit

    numbers = dict(enumerate(sh.NUMBERS))
    if question == "how many shapes are there?":
        return numbers[len(seen)]
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return find(m[1])[1]
    if m := re.fullmatch(r"what shape is the (\w+ one)\?", question):
        return find(m[1])[0]
    if m := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if any(s[0] == m[1] for s in seen) else "no"
    if m := re.fullmatch(r"is there a (\w+) shape\?", question):
        return "yes" if any(s[1] == m[1] for s in seen) else "no"
    if m := re.fullmatch(r"is the (\w+|\w+ one) on the left or on the right\?", question):
        s = find(m[1])
        return half(s[2], s[4], width, "left", "right")
    if m := re.fullmatch(r"is the (\w+|\w+ one) at the top or at the bottom\?", question):
        s = find(m[1])
        return half(s[3], s[5], height, "top", "bottom")
    raise AssertionError(f"unknown question {question!r}")


def test_answers_captions_and_labels_match_the_pixels():
    questions = set()
    for split in sh.SPLITS:
        source = sh.ShapesSource("qa", split, num_examples=40)
        for i in range(40):
            record, scene = source[i], sh.scene(i, split)
            seen = _seen(record["image"])
            # The drawing is exact: the scene rebuilt from pixels is the generated scene.
            rebuilt = sh.Scene(record["image"].width, record["image"].height,
                               tuple(sh.Shape(k, c, x, y, w) for k, c, x, y, w, h, _ in seen))
            assert sorted(rebuilt.shapes, key=repr) == sorted(scene.shapes, key=repr)
            assert sh.caption(rebuilt) == sh.caption(scene)
            turns = record["conversations"]
            assert turns[0]["value"].startswith("<image>\n") and 1 <= len(turns) // 2 <= 3
            for q, a in zip(turns[0::2], turns[1::2]):
                question = q["value"].replace("<image>\n", "")
                questions.add(question.split()[0] + question.split()[-1])
                assert _answer(question, seen, scene.width, scene.height) == a["value"], (split, i, question)
            largest = max(seen, key=lambda s: s[-1])
            assert sh.CLASS_NAMES[record["label"]] == f"{largest[1]} {largest[0]}"
    assert len(questions) >= 6, "every question type is generated"


def test_all_rounds_ask_every_question_the_scene_answers():
    every = sh.ShapesSource("qa", num_examples=40, qa_rounds="all")
    for i in range(40):
        record, scene = every[i], sh.scene(i)
        seen = _seen(record["image"])
        turns = record["conversations"]
        asked = [q["value"].replace("<image>\n", "") for q in turns[0::2]]
        # Presence alone asks about 3 kinds and 4 colours.
        assert turns[0]["value"].startswith("<image>\n") and len(set(asked)) == len(asked) == sh.MAX_ROUNDS
        for q, a in zip(asked, turns[1::2]):
            assert _answer(q, seen, scene.width, scene.height) == a["value"], (i, q)
        # Every held-out style question (1 to 3 rounds) is one of the scene's questions.
        assert {q for q, _ in sh.qa(scene, i)} <= {q for q, _ in sh._every_question(scene)}
    with pytest.raises(ValueError, match="qa_rounds"):
        sh.ShapesSource("qa", qa_rounds="some")


def test_deterministic_by_seed_and_sizes_in_range():
    a, b = sh.ShapesSource("caption", seed=3), sh.ShapesSource("caption", seed=3)
    for i in (0, 7, 123):
        ra, rb = a[i], b[i]
        assert ra["conversations"] == rb["conversations"] and ra["label"] == rb["label"]
        assert np.array_equal(np.asarray(ra["image"]), np.asarray(rb["image"]))
        assert 16 <= ra["image"].width <= 64 and 16 <= ra["image"].height <= 64
        assert max(ra["image"].size) == 64 and ra["image"].width % sh.CELL == ra["image"].height % sh.CELL == 0
    other = sh.ShapesSource("caption", seed=4)
    assert [a[i]["conversations"] for i in range(5)] != [other[i]["conversations"] for i in range(5)]
    aspects = {round(a[i]["image"].width / a[i]["image"].height, 1) for i in range(20)}
    assert len(aspects) > 5, "any aspect ratio"


def test_train_and_heldout_scenes_are_disjoint():
    train = [sh.scene(i, "train") for i in range(400)]
    heldout = [sh.scene(i, "heldout") for i in range(200)]
    assert all(s.split() == "train" for s in train) and all(s.split() == "heldout" for s in heldout)
    assert not {s.key() for s in train} & {s.key() for s in heldout}
    # Scenes are drawn independently from a finite grid of layouts: a few repeat (198 of 200 distinct).
    assert len({s.key() for s in heldout}) >= 195
    with pytest.raises(ValueError, match="split"):
        sh.scene(0, "test")


def test_vocabulary_covers_every_text():
    tok = sh.tokenizer()
    assert tok.vocab_size == len(sh.VOCABULARY) + 4
    for i in range(100):
        record = sh.ShapesSource("qa")[i]
        ids = tx.encode_conversation(record["conversations"], tok, "vicuna_v1").input_ids
        caption = tx.encode_conversation(sh.caption_conversation(sh.scene(i)), tok, "plain").input_ids
        assert tok.unk_id not in ids and tok.unk_id not in caption
        assert tok.decode(tok.encode(sh.caption(sh.scene(i)))) == sh.caption(sh.scene(i))


def test_shapes_class_pipeline_gives_teacher_views_and_labels():
    config = ml_collections.ConfigDict({"data": dict(name="shapes_class", global_batch=8, num_examples=8,
                                                     num_epochs=1, shuffle=False)})
    it = pipeline.make_data(config, 0, 1)
    batch = next(it)
    assert batch["pixels"].shape == (8, 32, 32, 3) and batch["pixel_mask"].shape == (8, 32, 32)
    source = sh.ShapesSource("class", num_examples=8)
    assert batch["label"].tolist() == [source[i]["label"] for i in range(8)]
    assert batch["label"].dtype == np.int32 and (batch["pixel_mask"].sum(axis=(1, 2)) > 0).all()
