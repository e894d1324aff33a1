"""HoVLE data: InternVL dynamic tiling, the internlm2-chat template, image-token expansion."""
import numpy as np
import pytest
import torch
from PIL import Image

from evejax.data import image as im
from evejax.data import shapes
from evejax.data import text as tx

# hovle.md §6.9: grids the official dynamic_preprocess chose when run, (W, H) -> (i, j) at
# max_num 6 and 12 (i across, j down); the thumbnail is added when i * j > 1.
OFFICIAL_GRIDS = {
    (448, 448): ((1, 1), (1, 1)), (1000, 200): ((5, 1), (5, 1)), (200, 1000): ((1, 5), (1, 5)),
    (800, 600): ((3, 2), (4, 3)), (600, 800): ((2, 3), (3, 4)), (4000, 500): ((6, 1), (8, 1)),
    (500, 4000): ((1, 6), (1, 8)), (30, 30): ((1, 1), (1, 1)), (1, 1000): ((1, 6), (1, 12)),
    (1000, 1): ((6, 1), (12, 1)), (1344, 896): ((3, 2), (3, 2)), (2000, 2000): ((2, 2), (3, 3)),
    (600, 600): ((1, 1), (1, 1)), (640, 640): ((2, 2), (2, 2)), (1344, 1344): ((2, 2), (3, 3)),
    (1792, 896): ((2, 1), (4, 2)), (500, 400): ((1, 1), (4, 3)), (800, 640): ((2, 2), (4, 3)),
    (1000, 800): ((3, 2), (4, 3)), (1100, 200): ((5, 1), (5, 1)), (5500, 1000): ((6, 1), (6, 1)),
}


def official_grid(width, height, max_num, min_num=1, image_size=448):
    """The selection procedure as hovle.md §6.9 states it: candidates (i, j) with
    min_num <= i*j <= max_num scanned in order of i*j from a best of (1, 1) at infinite
    distance; a strictly smaller |W/H - i/j| replaces the best, an equal one replaces it
    iff W*H > 0.5 * image_size^2 * i * j."""
    candidates = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1)
                         if min_num <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in candidates:
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def _random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_grid_and_tile_count_match_the_official_runs(max_tiles):
    cfg = im.TilingConfig(max_tiles=max_tiles)
    for (w, h), grids in OFFICIAL_GRIDS.items():
        grid = grids[max_tiles == 12]
        assert im.closest_grid(w, h, cfg) == grid, (w, h)
        assert official_grid(w, h, max_tiles) == grid, (w, h)  # the transcription is faithful
        n = grid[0] * grid[1]
        assert im.num_tiles(w, h, cfg) == n + (n > 1), (w, h)


def test_grid_matches_the_official_procedure_on_many_aspect_ratios():
    # 1:8, 8:1, tiny, exact midpoints (1.25, 5.5), same-ratio grids at the area threshold.
    sizes = [(100, 800), (800, 100), (8, 64), (64, 8), (3, 2), (1, 1), (5, 4), (500, 400), (501, 400),
             (11, 2), (2200, 400), (897, 448), (896, 448), (14, 1000), (1000, 14), (333, 777)]
    sizes += [(int(w), int(h)) for w, h in np.random.default_rng(0).integers(1, 5000, (300, 2))]
    for max_tiles in (1, 2, 6, 12, 24):
        for min_tiles in (1, 2):
            if min_tiles > max_tiles:
                continue
            cfg = im.TilingConfig(max_tiles=max_tiles, min_tiles=min_tiles)
            for w, h in sizes:
                assert im.closest_grid(w, h, cfg) == official_grid(w, h, max_tiles, min_tiles), \
                    (w, h, min_tiles, max_tiles)


@pytest.mark.parametrize("size,grid", [((800, 100), (6, 1)), ((100, 800), (1, 6)), ((30, 30), (1, 1)),
                                        ((800, 600), (3, 2))])
def test_tiles_shapes_mask_and_slots(size, grid):
    cfg = im.TilingConfig(max_tiles=6)
    out = im.tile_image(_random_image(*size), cfg)
    n = grid[0] * grid[1] + (grid != (1, 1))
    assert out.grid == grid and out.num_tiles == n
    assert out.pixels.shape == (7, 448, 448, 3) and out.pixels.dtype == np.float32
    assert out.tile_mask.dtype == bool and out.tile_mask.tolist() == [True] * n + [False] * (7 - n)
    assert not out.pixels[n:].any() and np.abs(out.pixels[:n]).max() > 1


def _torch_normalize(tile: Image.Image) -> np.ndarray:
    """ToTensor + Normalize(IMAGENET) written in torch, back to HWC."""
    x = torch.from_numpy(np.array(tile)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((x - mean) / std).permute(1, 2, 0).numpy()


def test_tile_pixels_equal_pil_bicubic_crops_and_thumbnail():
    image = _random_image(800, 600, seed=3)
    out = im.tile_image(image, im.TilingConfig(max_tiles=6))
    assert out.grid == (3, 2)
    resized = image.resize((3 * 448, 2 * 448), Image.Resampling.BICUBIC)
    crops = [resized.crop((x * 448, y * 448, x * 448 + 448, y * 448 + 448)) for y in range(2) for x in range(3)]
    expected = [_torch_normalize(c) for c in crops] + [_torch_normalize(image.resize((448, 448)))]
    np.testing.assert_allclose(out.pixels[:7], np.stack(expected), rtol=0, atol=1e-6)


def test_more_tiles_than_slots_is_a_named_error():
    cfg = im.TilingConfig(max_tiles=12)
    with pytest.raises(im.TooManyTilesError, match="13 tiles exceed the 7 tile slots"):
        im.tile_image(_random_image(800, 600), cfg, max_slots=7)
    with pytest.raises(im.TooManyTilesError, match="max_tiles"):
        im.pad_tiles(np.zeros((3, 4, 4, 3), np.float32), 2)
    pixels, mask = im.pad_tiles(np.ones((2, 4, 4, 3), np.float32), 3)
    assert pixels.shape == (3, 4, 4, 3) and mask.tolist() == [True, True, False] and not pixels[2].any()
    assert im.TilingConfig(max_tiles=1).max_slots == 1 and im.TilingConfig(max_tiles=12).max_slots == 13
    with pytest.raises(ValueError, match="min_tiles"):
        im.TilingConfig(min_tiles=3, max_tiles=2)


def test_letterbox_keeps_the_aspect_with_the_pad_colour_around_it():
    """pad_unit > 0: a 1:4 shapes scene (16 x 64) fills one column of 16 px tokens of the 64 px tile,
    pixel for pixel, centred in whole tokens, on the normalised ImageNet mean (~0); stretching
    (official, the default) spreads it over the whole tile."""
    scene = next(s for s in (shapes.scene(i, "heldout") for i in range(100)) if (s.width, s.height) == (16, 64))
    picture = shapes.render(scene)
    pad = im.tile_image(picture, im.TilingConfig(tile_size=64, max_tiles=1, pad_unit=16)).pixels[0]
    mean = np.array(im.IMAGENET_MEAN, np.float32)
    std = np.array(im.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(pad[:, 16:32], (np.asarray(picture) / 255 - mean) / std, rtol=0, atol=1e-6)
    outside = np.concatenate([pad[:, :16], pad[:, 32:]], axis=1)
    assert np.abs(outside).max() < 0.02
    stretched = im.tile_image(picture, im.TilingConfig(tile_size=64, max_tiles=1)).pixels[0]
    assert np.abs(stretched[:, :16]).max() > 1 and np.abs(stretched[:, 48:]).max() > 1
    # Several tiles: the 3 x 1 grid canvas (3 tiles forced) and the thumbnail hold a 2:1 image letterboxed.
    out = im.tile_image(_random_image(200, 100), im.TilingConfig(tile_size=28, min_tiles=3, max_tiles=3, pad_unit=14))
    assert out.grid == (3, 1) and out.num_tiles == 4
    filled = np.abs(out.pixels[:3]).max(-1).max(1) > 0.02  # [tile, column]: does the image reach it?
    # 56 x 28 px at x = 14 of the 84 px canvas (whole 14 px units, the odd one after the image).
    assert not filled[0, :14].any() and filled[0, 14:].all() and filled[1].all()
    assert filled[2, :14].all() and not filled[2, 14:].any()
    rows = (np.abs(out.pixels[3]).max(-1) > 0.02).any(1)  # thumbnail: 28 x 14 px at the top
    assert rows[:14].all() and not rows[14:].any()
    with pytest.raises(ValueError, match="pad_unit"):
        im.TilingConfig(tile_size=64, pad_unit=24)


# ---- internlm2-chat ---------------------------------------------------------------------------

SYS = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
       "是一个有用无害的人工智能助手。")
CHAT = [
    {"from": "human", "value": "<image>\nWhat shape is shown?"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "Left of a blue circle."},
]
SPECIAL = {"<|im_end|>": 92542, "<|im_start|>": 92543, "<img>": 92544, "</img>": 92545, "<IMG_CONTEXT>": 92546}


def _chat_tokenizer():
    return tx.WordTokenizer.from_texts([SYS, "system user assistant\n"] + [t["value"] for t in CHAT])


def _runs(mask):
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def test_internlm2_chat_prompt_string():
    # 2 tiles + thumbnail at 4 tokens per tile = 12 <IMG_CONTEXT> (hovle.md §6.7's tiny case).
    expected = ("<|im_start|>system\n" + SYS + "<|im_end|>"
                "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat shape is shown?<|im_end|>"
                "<|im_start|>assistant\nA red square.<|im_end|>"
                "<|im_start|>user\nWhere is it?<|im_end|>"
                "<|im_start|>assistant\nLeft of a blue circle.<|im_end|>")
    assert tx.render_internlm2_chat(CHAT, [3], tokens_per_tile=4) == expected
    assert tx.INTERNLM2_SPECIAL_IDS == SPECIAL and tx.INTERNLM2_CHAT.system == SYS


def test_internlm2_chat_ids_and_official_loss_mask():
    tok = _chat_tokenizer()
    out = tx.encode_internlm2_chat(CHAT, tok, [3], tokens_per_tile=4)
    ids, mask = out.input_ids, out.loss_mask
    assert ids.dtype == np.int32 and ids.shape == mask.shape and ids[0] == tok.bos_id
    # BOS, <|im_start|>, "system\n" + SYS, <|im_end|>, <|im_start|>, "user", "\n", <img>
    start = 2 + len(tok.encode("system\n" + SYS)) + 4
    assert ids[1] == SPECIAL["<|im_start|>"] and ids[start - 4] == SPECIAL["<|im_end|>"]
    assert ids[start - 3] == SPECIAL["<|im_start|>"] and ids[start - 2:start].tolist() == tok.encode("user\n")
    assert ids[start] == SPECIAL["<img>"] and ids[start + 13] == SPECIAL["</img>"]
    assert (ids[start + 1:start + 13] == SPECIAL["<IMG_CONTEXT>"]).all()
    assert (ids == SPECIAL["<IMG_CONTEXT>"]).sum() == 12
    # Supervised: each answer and its <|im_end|>, nothing else.
    runs = _runs(mask)
    assert len(runs) == 2
    for (a, b), answer in zip(runs, ["A red square.", "Left of a blue circle."]):
        assert ids[a:b].tolist() == tok.encode(answer) + [SPECIAL["<|im_end|>"]]
        assert ids[a - 3:a].tolist() == [SPECIAL["<|im_start|>"]] + tok.encode("assistant\n")
    assert runs[1][1] == len(ids)
    assert (out.labels[~mask] == tx.IGNORE_INDEX).all()
    # Truncation cuts the expanded ids.
    cut = tx.encode_internlm2_chat(CHAT, tok, [3], tokens_per_tile=4, max_len=20)
    assert cut.input_ids.tolist() == ids[:20].tolist() and cut.loss_mask.tolist() == mask[:20].tolist()


def test_hd_stream_has_the_same_text_and_4x_image_tokens():
    tok = _chat_tokenizer()
    llm = tx.encode_internlm2_chat(CHAT, tok, [3], tokens_per_tile=256)
    hd = tx.encode_internlm2_chat(CHAT, tok, [3], tokens_per_tile=1024)
    ctx = SPECIAL["<IMG_CONTEXT>"]
    assert (llm.input_ids == ctx).sum() == 768 and (hd.input_ids == ctx).sum() == 3072
    assert llm.input_ids[llm.input_ids != ctx].tolist() == hd.input_ids[hd.input_ids != ctx].tolist()
    assert llm.loss_mask[llm.input_ids != ctx].tolist() == hd.loss_mask[hd.input_ids != ctx].tolist()


def test_image_without_placeholder_gets_one_in_front_as_official():
    turns = [{"from": "human", "value": "What shape is shown?"}, {"from": "gpt", "value": "A red square."}]
    text = tx.render_internlm2_chat(turns, [1], tokens_per_tile=2)
    assert "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat shape is shown?<|im_end|>" in text
    assert "<img>" not in tx.render_internlm2_chat(turns)  # text-only


def test_internlm2_chat_bad_input_is_a_named_error():
    tok = _chat_tokenizer()
    two = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "A red square."}]
    with pytest.raises(tx.ImageCountError, match="2 <image> placeholders for 1 images"):
        tx.encode_internlm2_chat(two, tok, [3])
    with pytest.raises(tx.ImageCountError, match="1 <image> placeholders for 0 images"):
        tx.encode_internlm2_chat(CHAT, tok)
    tx.encode_internlm2_chat(two, tok, [3, 1])  # one per image is fine
    with pytest.raises(ValueError, match=r"turn 1 contains \['<\|im_end\|>'\]"):
        tx.encode_internlm2_chat([CHAT[0], {"from": "gpt", "value": "done<|im_end|>"}], tok, [1])
    with pytest.raises(ValueError, match="starting with human and ending with gpt"):
        tx.encode_internlm2_chat(CHAT[1:], tok, [1])
    with pytest.raises(ValueError, match="must be positive"):
        tx.encode_internlm2_chat(CHAT, tok, [0])


class _MergingTokenizer:
    """One id per character, except that a newline and the character after it are one id:
    tokenizing the pieces on their own then gives more ids than the whole prompt."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 1 << 20

    def encode(self, text):
        ids, k = [], 0
        while k < len(text):
            n = 2 if text[k] == "\n" and k + 1 < len(text) else 1
            ids.append(3 + sum(ord(c) << (8 * m) for m, c in enumerate(text[k:k + n])))
            k += n
        return ids


def test_tokenization_mismatch_is_an_error_not_a_wrong_mask():
    with pytest.raises(ValueError, match="tokenization mismatch"):
        tx.encode_internlm2_chat(CHAT, _MergingTokenizer(), [1], tokens_per_tile=1)


# ---- HoVLE batches from the conversation sources ------------------------------------------------

import io  # noqa: E402
import json  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from evejax.data import pipeline, shapes, sources  # noqa: E402

HOVLE_DATA = dict(template="internlm2-chat", tokenizer="shapes", tile_size=28, max_tiles=4, tokens_per_tile=4,
                  seq_len=160, global_batch=4, num_epochs=1, shuffle=False, with_ids=True)


def _jpeg(width, height, seed):
    buf = io.BytesIO()
    _random_image(width, height, seed).save(buf, "JPEG")
    return buf.getvalue()


def _qa(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_llava(root):
    (root / "img").mkdir()
    for name, size in [("wide", (80, 20)), ("square", (20, 20))]:
        (root / "img" / f"{name}.jpg").write_bytes(_jpeg(*size, seed=len(name)))
    records = [
        {"id": "wide", "image": "img/wide.jpg", "conversations": _qa("<image>\nwhat colour is the circle?", "red")},
        {"id": "unplaced", "image": "img/square.jpg", "conversations": _qa("is there a red square?", "yes")},
        {"id": "text", "conversations": _qa("how many shapes are there?", "two")},
        {"id": "twice", "image": "img/square.jpg", "conversations": _qa("<image> and <image>?", "two")},
        {"id": "no_image", "conversations": _qa("<image>\nwhat colour is the circle?", "red")},
    ]
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_hovle_batches_from_llava_jsonl(tmp_path):
    path = _write_llava(tmp_path)
    it = pipeline.make_data(SimpleNamespace(data=dict(HOVLE_DATA, name="llava", path=path,
                                                      image_root=str(tmp_path))), 0, 1)
    batch = next(it)
    b, t, n = 4, 160, 5
    assert {k: v.shape for k, v in batch.items()} == {
        "tokens": (b, t), "targets": (b, t), "loss_mask": (b, t), "segment_ids": (b, t), "positions": (b, t),
        "has_image": (b,), "pixels": (b, n, 28, 28, 3), "tile_mask": (b, n), "example_id": (b, t)}
    assert it.stats()["skipped_multiple_images"] == 1 and it.stats()["skipped_malformed"] == 1
    v = shapes.tokenizer().vocab_size
    im_end, im_start, img, img_end, ctx = range(v, v + 5)
    assert batch["has_image"].tolist() == [True, True, False, False]
    # wide (4:1 -> 4 x 1 grid + thumbnail), square (1 tile), text-only, padding row.
    assert batch["tile_mask"].sum(1).tolist() == [5, 1, 0, 0]
    for row, tiles, name in [(0, 5, "wide"), (1, 1, "square")]:
        tokens = batch["tokens"][row]
        assert (tokens == ctx).sum() == 4 * tiles and (tokens == img).sum() == 1 and (tokens == img_end).sum() == 1
        start = int(np.nonzero(tokens == img)[0][0])
        assert tokens[start - 3] == im_start and tokens[start + 4 * tiles + 1] == img_end
        expected = im.tile_image(Image.open(tmp_path / "img" / f"{name}.jpg"), pipeline.tiling_config(
            dict(pipeline.FIELDS, **HOVLE_DATA)))
        np.testing.assert_array_equal(batch["pixels"][row], expected.pixels)
    tok = shapes.tokenizer()
    for row, answer in [(0, "red"), (1, "yes"), (2, "two")]:
        sup = batch["loss_mask"][row] > 0
        assert batch["targets"][row][sup].tolist() == tok.encode(answer) + [im_end]
        k = int((batch["segment_ids"][row] > 0).sum())
        np.testing.assert_array_equal(batch["positions"][row, :k], np.arange(k))
        np.testing.assert_array_equal(batch["targets"][row, :k - 1], batch["tokens"][row, 1:k])
    assert not batch["pixels"][2].any() and not batch["tile_mask"][3].any()


def test_hovle_batches_from_shapes_and_config_errors():
    it = pipeline.make_data(SimpleNamespace(data=dict(HOVLE_DATA, name="shapes_qa", num_examples=8)), 0, 1)
    batch = next(it)
    ctx = shapes.tokenizer().vocab_size + 4
    assert batch["pixels"].shape == (4, 5, 28, 28, 3) and batch["has_image"].all()
    assert ((batch["tokens"] == ctx).sum(1) == 4 * batch["tile_mask"].sum(1)).all()
    with pytest.raises(ValueError, match=r"\['max_tiles'\] apply only to template='internlm2-chat'"):
        pipeline.options(dict(name="shapes_qa", global_batch=1, max_tiles=12))
    with pytest.raises(ValueError, match="tokens_per_tile must be positive"):
        pipeline.options(dict(HOVLE_DATA, name="shapes_qa", tokens_per_tile=0))


def test_hovle_batches_from_arrayrecord_equal_the_jsonl_ones(tmp_path):
    path = _write_llava(tmp_path)
    out = tmp_path / "ar"
    sources.convert_conversations(path, str(out), str(tmp_path), embed_images=True, shards=2, log=lambda _: None)
    direct = pipeline.make_data(SimpleNamespace(data=dict(HOVLE_DATA, name="llava", path=path,
                                                          image_root=str(tmp_path))), 0, 1)
    converted = pipeline.make_data(SimpleNamespace(data=dict(HOVLE_DATA, name="arrayrecord", path=str(out))), 0, 1)
    a, b = next(direct), next(converted)
    assert a.keys() == b.keys() and a["tile_mask"].sum() == 6
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_truncation_that_cuts_image_tokens_is_a_counted_skip(tmp_path):
    path = _write_llava(tmp_path)
    # The image in round 2: the cut keeps round 1's answer but not the whole image.
    late = {"id": "late", "image": "img/wide.jpg", "conversations": _qa("how many shapes are there?", "two")
            + _qa("<image>\nwhat colour is the circle?", "red")}
    with open(path, "a") as f:
        f.write(json.dumps(late) + "\n")
    data = dict(HOVLE_DATA, name="llava", path=path, image_root=str(tmp_path), seq_len=28, overlong="truncate")
    it = pipeline.make_data(SimpleNamespace(data=data), 0, 1)
    batch = next(it)
    # "wide" (46 ids, answer after the image) and "late" (image from id 26) are too long.
    assert it.stats()["skipped_too_long"] == 2
    assert batch["example_id"][:, 0].tolist() == [1, 2, -1, -1]
    tok, ids = shapes.tokenizer(), pipeline.special_ids("shapes", shapes.tokenizer())
    full = tx.encode_internlm2_chat(_qa("is there a red square?", "yes"), tok, [1], 4, ids)
    assert len(full.input_ids) == 30 and batch["tokens"][0].tolist() == full.input_ids[:28].tolist()
    assert batch["tile_mask"][0].tolist() == [True] + [False] * 4
    cut = tx.encode_internlm2_chat(late["conversations"], tok, [5], 4, ids, max_len=29)
    assert cut.loss_mask.any() and ids["<img>"] in cut.input_ids and ids["</img>"] not in cut.input_ids
