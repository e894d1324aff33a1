"""grain pipelines: resume, host sharding, bad records, packing, workers."""
import io
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from evejax.data import image as image_lib
from evejax import sharding
from evejax.data import packing, pipeline
from evejax.data.sources import BadRecord
from evejax.data.text import IMAGE_TOKEN_INDEX

TINY_IMAGE = dict(image_size=32, patch_size=4, pool=2, teacher_image_size=16, teacher_patch_size=4)
QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a red square?",
             "is the blue triangle on the left or on the right?"]
ANSWERS = ["red", "two", "yes", "left", "a red circle at the top and a blue square on the right.",
           "a green triangle in the middle, a yellow square at the bottom left and a red circle on the right."]


def _conversation(i, with_image, rounds=1):
    turns = []
    for k in range(rounds):
        q = QUESTIONS[(i + k) % len(QUESTIONS)]
        turns += [{"from": "human", "value": ("<image>\n" if with_image and k == 0 else "") + q},
                  {"from": "gpt", "value": ANSWERS[(3 * i + k) % len(ANSWERS)]}]
    return turns


def _jpeg(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def write_llava(root, n_good=24, bad=True, images=True):
    """A JSONL set under root: n_good good records (every third text-only, the rest with a
    JPEG of varying aspect), then one bad record of each kind. Returns (path, good indices)."""
    (root / "img").mkdir(exist_ok=True)
    lines, good = [], []
    for i in range(n_good):
        with_image = images and i % 3 != 2
        record = {"id": f"r{i}", "conversations": _conversation(i, with_image, rounds=1 + i % 3)}
        if with_image:
            (root / "img" / f"{i}.jpg").write_bytes(_jpeg(12 + 4 * (i % 4), 20 - 3 * (i % 3), i))
            record["image"] = f"img/{i}.jpg"
        good.append(len(lines))
        lines.append(json.dumps(record).encode())
    if bad:
        (root / "img" / "corrupt.jpg").write_bytes(b"certainly not a jpeg")
        image_turns = _conversation(0, True)
        lines += [
            b'{"id": "utf8", "conversations": [{"from": "human", "value": "\xff\xfe"}]}',
            b'{"id": "json", "conversations": ',
            json.dumps({"id": "empty", "image": "img/0.jpg", "conversations": []}).encode(),
            json.dumps({"id": "missing", "image": "img/nope.jpg", "conversations": image_turns}).encode(),
            json.dumps({"id": "corrupt", "image": "img/corrupt.jpg", "conversations": image_turns}).encode(),
            json.dumps({"id": "long", "conversations": [
                {"from": "human", "value": "how many shapes are there?"},
                {"from": "gpt", "value": " ".join(["red"] * 200)}]}).encode(),
            json.dumps({"id": "twice", "image": "img/0.jpg", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the circle? <image>"},
                {"from": "gpt", "value": "red"}]}).encode(),
            json.dumps({"id": "unplaced", "image": "img/0.jpg", "conversations": _conversation(0, False)}).encode(),
        ]
    path = root / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), good


def llava_data(path, root, **kw):
    return dict(dict(name="llava", path=path, image_root=str(root), tokenizer="shapes", template="vicuna_v1",
                     seq_len=112, global_batch=4, seed=1, **TINY_IMAGE), **kw)


def make(data, process_index=0, process_count=1):
    return pipeline.make_data(SimpleNamespace(data=data), process_index, process_count)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_resumed_iterator_yields_the_same_batches(tmp_path):
    path, _ = write_llava(tmp_path)
    data = llava_data(path, tmp_path, pack=True, with_ids=True)
    it = make(data)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = take(it, 5)   # crosses epochs (~19 good records per epoch on this host)
    resumed = make(data)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)
    assert resumed.stats() == it.stats()


def test_every_epoch_is_reshuffled(tmp_path):
    path, good = write_llava(tmp_path, n_good=16, bad=False)
    it = make(llava_data(path, tmp_path, num_epochs=2, with_ids=True))
    order = [i for batch in it for i in batch["example_id"][:, 0].tolist()]
    assert it.stats()["skipped"] == 0
    first, second = order[:16], order[16:]
    assert sorted(first) == sorted(second) == good
    assert first != second and first != good


def test_two_hosts_see_disjoint_examples_covering_the_epoch(tmp_path):
    path, good = write_llava(tmp_path)
    data = llava_data(path, tmp_path, num_epochs=1, with_ids=True)
    seen, stats = [], []
    for host in (0, 1):
        it = make(data, host, 2)
        ids = []
        for batch in it:
            assert batch["tokens"].shape == (2, 112)
            rows = batch["segment_ids"][:, 0] > 0
            ids += batch["example_id"][rows, 0].tolist()
        seen.append(ids)
        stats.append(it.stats())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == good
    assert sum(s["examples"] for s in stats) == len(good)
    assert sum(s["skipped"] for s in stats) == len(BadRecord.KINDS)
    with pytest.raises(ValueError, match="does not split"):
        make(dict(data, global_batch=3), 0, 2)


def test_each_bad_record_kind_is_skipped_and_counted(tmp_path):
    path, good = write_llava(tmp_path, n_good=2)
    it = make(llava_data(path, tmp_path, num_epochs=1, shuffle=False, global_batch=8))
    (batch,) = list(it)
    stats = it.stats()
    assert {k: stats[f"skipped_{k}"] for k in BadRecord.KINDS} == dict.fromkeys(BadRecord.KINDS, 1.0)
    assert stats["examples"] == 2 and stats["skipped"] == len(BadRecord.KINDS)
    assert (batch["segment_ids"][:2, 0] == 1).all() and not batch["segment_ids"][2:].any()
    # "truncate" keeps the long record, cut to the row (official behaviour).
    it = make(llava_data(path, tmp_path, num_epochs=1, shuffle=False, global_batch=8, overlong="truncate"))
    list(it)
    assert it.stats()["skipped_too_long"] == 0 and it.stats()["examples"] == 3


def test_images_the_text_does_not_place_once_are_counted_skips(tmp_path):
    """Official EVE would train "unplaced" as text without its image, merge "twice"'s two
    placeholders into one and train "late" with its <image> cut off; all three are skipped."""
    path, _ = write_llava(tmp_path, n_good=2, bad=False)
    turns = _conversation(1, False) + [{"from": "human", "value": "<image>\nwhat colour is the circle?"},
                                       {"from": "gpt", "value": "red"}]
    turns[1]["value"] = " ".join(["red"] * 150)
    with open(path, "a") as f:
        for record in [{"id": "unplaced", "image": "img/0.jpg", "conversations": _conversation(0, False)},
                       {"id": "twice", "image": "img/0.jpg", "conversations": [
                           {"from": "human", "value": "<image>\nwhat colour is the circle?\n<image>"},
                           {"from": "gpt", "value": "red"}]},
                       {"id": "late", "image": "img/0.jpg", "conversations": turns}]:
            f.write(json.dumps(record) + "\n")
    it = make(llava_data(path, tmp_path, num_epochs=1, shuffle=False, global_batch=8, overlong="truncate",
                         with_ids=True))
    (batch,) = list(it)
    stats = it.stats()
    assert (stats["skipped_image_without_placeholder"], stats["skipped_multiple_images"],
            stats["skipped_too_long"], stats["examples"]) == (1, 1, 1, 2)
    assert sorted(set(batch["example_id"].ravel()) - {-1}) == [0, 1]


def test_conversation_batch_layout(tmp_path):
    path, _ = write_llava(tmp_path, n_good=3, bad=False)
    it = make(llava_data(path, tmp_path, num_epochs=1, shuffle=False, global_batch=4))
    batch = next(it)
    b, t, s, ts = 4, 112, 32, 16
    shapes = {"tokens": (b, t), "targets": (b, t), "loss_mask": (b, t), "segment_ids": (b, t),
              "positions": (b, t), "has_image": (b,), "pixels": (b, s, s, 3), "pixel_mask": (b, s, s),
              "teacher_pixels": (b, ts, ts, 3), "teacher_mask": (b, ts, ts)}
    assert {k: v.shape for k, v in batch.items()} == shapes
    assert batch["has_image"].tolist() == [True, True, False, False]
    # Row 0 is sample 0: BOS, then text ids with one placeholder; targets are the next ids.
    n = int((batch["segment_ids"][0] > 0).sum())
    tokens, targets = batch["tokens"][0, :n], batch["targets"][0, :n]
    assert (tokens == IMAGE_TOKEN_INDEX).sum() == 1 and IMAGE_TOKEN_INDEX not in batch["targets"]
    np.testing.assert_array_equal(tokens[1:][tokens[1:] != IMAGE_TOKEN_INDEX], targets[:-1][tokens[1:] != IMAGE_TOKEN_INDEX])
    assert batch["loss_mask"][0, :n].any() and not batch["loss_mask"][0, n:].any()
    np.testing.assert_array_equal(batch["positions"][0, :n], np.arange(n))
    # The text-only row carries the blank image: zero masks.
    assert not batch["pixel_mask"][2].any() and not batch["teacher_mask"][2].any()
    view = image_lib.preprocess_anyres(Image.open(tmp_path / "img" / "0.jpg").convert("RGB"),
                                       pipeline.anyres_config(dict(pipeline.FIELDS, **TINY_IMAGE)))
    np.testing.assert_array_equal(batch["pixels"][0], view.pixels)
    np.testing.assert_array_equal(batch["teacher_mask"][0], view.teacher_mask)


def test_packed_rows_give_the_same_per_sample_loss(tmp_path):
    from evejax.models import llm
    from evejax.models.losses import cross_entropy

    path, good = write_llava(tmp_path, n_good=12, bad=False, images=False)
    model = llm.CausalLM(llm.get_config("llama_tiny", remat="none"))
    # Random weights from the abstract tree: compiling `init` would cost more than the test.
    abstract = jax.eval_shape(lambda r: model.init(r, jnp.ones((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), sharding.unbox(abstract))
    ids = jnp.asarray(good)

    def per_sample(batch):
        logits = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"])
        mask = batch["loss_mask"][None] * (batch["example_id"][None] == ids[:, None, None])
        return jax.vmap(lambda m: cross_entropy(logits, batch["targets"], m))(mask)

    losses = {}
    for pack in (False, True):
        step = jax.jit(per_sample)
        batches = list(make(llava_data(path, tmp_path, num_epochs=1, pack=pack, seq_len=128,
                                       global_batch=4, with_ids=True)))
        if pack:
            assert max(b["segment_ids"].max() for b in batches) >= 2, "rows hold several samples"
            assert len(batches) < len(good) / 4
        total, weight = np.zeros(len(good)), np.zeros(len(good))
        for batch in batches:
            loss, w = step({k: jnp.asarray(v) for k, v in batch.items()})
            total += np.asarray(loss * w)
            weight += np.asarray(w)
        assert step._cache_size() == 1
        assert (weight > 0).all()
        losses[pack] = (total / weight, weight)
    np.testing.assert_array_equal(losses[False][1], losses[True][1])
    np.testing.assert_allclose(losses[True][0], losses[False][0], rtol=2e-5, atol=2e-5)


def test_one_image_per_packed_row():
    image = {"pixels": np.ones((4, 4, 3), np.float32)}
    packer = packing.SequencePacker(2, 10, True, 0, {"pixels": np.zeros((4, 4, 3), np.float32)})
    ex = lambda i, n, img: dict(index=i, ids=np.arange(n + 1, dtype=np.int32), loss_mask=np.ones(n + 1, bool),
                                **(image if img else {}))
    assert packer.add(ex(0, 3, True)) and packer.add(ex(1, 3, True))      # second image: row 1
    assert packer.add(ex(2, 3, False))                                     # text fills row 0
    assert not packer.add(ex(3, 3, True))                                  # no row without an image
    assert packer.add(ex(4, 4, False)) and not packer.full()
    batch = packer.emit()
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert batch["segment_ids"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    assert batch["has_image"].tolist() == [True, True]


def test_batches_do_not_depend_on_worker_processes():
    data = dict(name="shapes_caption", global_batch=4, num_examples=64, pack=True, seq_len=48, with_ids=True)
    expected = take(make(data), 4)
    it = make(dict(data, num_workers=1))
    try:
        assert_batches_equal(take(it, 2), expected[:2])
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = make(dict(data, num_workers=1))
    try:
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 2), expected[2:])
    finally:
        resumed.close()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(KeyError, match="colour_jitter"):
        make(dict(name="shapes_qa", global_batch=2, colour_jitter=True))
    with pytest.raises(ValueError, match="name='coco'"):
        make(dict(name="coco", global_batch=2))
    with pytest.raises(ValueError, match="tokenizer is required"):
        make(dict(name="llava", global_batch=2, path="x.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make(dict(name="llava", global_batch=2, path=str(tmp_path / "nope.jsonl"), tokenizer="shapes"))
