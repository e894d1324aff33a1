import io

import numpy as np
import pytest
from PIL import Image

from evejax.data import image as im

TINY = im.AnyResConfig(image_size=32, patch_size=4, pool=2, teacher_image_size=16,
                       teacher_patch_size=4)
HD = im.AnyResConfig(image_size=1344)


def _random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_token_counts_square():
    # 672 / 14 = 48 conv cells, pooled by 2 -> 24 x 24 -> 1 + 24 * 25.
    assert im.num_image_tokens(672, 672) == 601
    # HD: 1344 / 14 = 96 -> 48 x 48 -> 1 + 48 * 49.
    assert im.num_image_tokens(1344, 1344, HD) == 2353
    # Any square image is scaled to the long edge.
    assert im.num_image_tokens(100, 100) == 601


def test_token_counts_landscape_and_portrait():
    # W=500, H=300 (landscape). At the teacher scale (336, patch 14) the short
    # edge needs ceil(336 * 300 / 500 / 14) = ceil(14.4) = 15 patches, i.e.
    # 15 * 14 = 210 px; the EVE view is twice that: 672 x 420 px = 48 x 30 conv
    # cells = 24 x 15 pooled cells, so h = 15 rows, w = 24 -> 1 + 15 * 25 = 376.
    assert im.grid_hw(300, 500) == (15, 24)
    assert im.num_image_tokens(300, 500) == 376
    # W=300, H=500 (portrait): h = 24 rows of w = 15 -> 1 + 24 * 16 = 385.
    assert im.grid_hw(500, 300) == (24, 15)
    assert im.num_image_tokens(500, 300) == 385
    # HD: ratio 4, short edge 15 * 56 = 840 px = 30 pooled cells -> 1 + 30 * 49.
    assert im.num_image_tokens(300, 500, HD) == 1471
    assert im.num_image_tokens(500, 300, HD) == 1 + 48 * 31


def test_layout_padding_offsets():
    lay = im.anyres_layout(500, 300)
    # 24 - 15 = 9 free teacher patches: 4 before (9 // 2), 5 after; x2 for the EVE view.
    assert (lay.width, lay.height, lay.offset, lay.valid, lay.landscape) == (672, 420, 112, 420, True)
    teacher = im.anyres_layout(500, 300, teacher=True)
    assert (teacher.width, teacher.height, teacher.offset, teacher.valid) == (336, 210, 56, 210)
    assert im.anyres_layout(300, 500).landscape is False


@pytest.mark.parametrize("width,height", [(500, 300), (300, 500), (672, 672), (1000, 37), (7, 900)])
def test_mask_and_padding(width, height):
    out = im.preprocess_anyres(_random_image(width, height))
    assert out.pixels.shape == (672, 672, 3) and out.pixels.dtype == np.float32
    assert out.mask.shape == (672, 672)
    assert out.teacher_pixels.shape == (336, 336, 3) and out.teacher_mask.shape == (336, 336)
    lay = im.anyres_layout(width, height)
    rows, cols = np.nonzero(out.mask)
    band = (rows if lay.landscape else cols)
    assert band.min() == lay.offset and band.max() == lay.offset + lay.valid - 1
    assert out.mask.sum() == 672 * lay.valid
    assert set(np.unique(out.mask)) <= {0.0, 1.0}
    # The valid band is a whole number of 28-px cells, so the token count matches.
    h, w = out.grid
    assert out.mask.sum() == (h * 28) * (w * 28)
    assert out.num_tokens == im.num_image_tokens(height, width)
    # Padding carries the official background colour int(255 * mean).
    pad = out.pixels[out.mask == 0]
    if len(pad):
        expected = (np.array([122, 116, 104]) / 255 - np.array(im.CLIP_MEAN)) / np.array(im.CLIP_STD)
        np.testing.assert_allclose(pad, np.broadcast_to(expected, pad.shape), atol=1e-6)
    # The teacher's valid patches equal the EVE grid (ratio 2, pool 2).
    t_cells = out.teacher_mask.reshape(24, 14, 24, 14).mean((1, 3))
    assert set(np.unique(t_cells)) <= {0.0, 1.0} and t_cells.sum() == h * w


def test_normalisation_values():
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    out = im.preprocess_anyres(white)
    expected = (1 - np.array(im.CLIP_MEAN)) / np.array(im.CLIP_STD)
    np.testing.assert_allclose(out.pixels[300, 300], expected, rtol=1e-6)
    chw = out.chw4()
    assert chw.shape == (4, 672, 672)
    np.testing.assert_array_equal(chw[3], out.mask)
    np.testing.assert_array_equal(chw[:3].transpose(1, 2, 0), out.pixels)


def test_tiny_config():
    assert im.num_image_tokens(32, 32, TINY) == 1 + 4 * 5
    out = im.preprocess_anyres(_random_image(50, 20), TINY)
    # ceil(16 * 20 / 50 / 4) = 2 teacher patches -> 2 pooled rows of 4.
    assert out.grid == (2, 4)
    assert out.pixels.shape == (32, 32, 3) and out.teacher_pixels.shape == (16, 16, 3)
    assert out.mask.sum() == 32 * 16 and out.teacher_mask.sum() == 16 * 8
    # Extreme aspect ratios keep at least one patch.
    assert im.grid_hw(1, 1000, TINY) == (1, 4)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of teacher_image_size"):
        im.AnyResConfig(image_size=500)
    with pytest.raises(ValueError, match="whole pooled patches"):
        im.AnyResConfig(image_size=32, patch_size=4, pool=4, teacher_image_size=16,
                        teacher_patch_size=4)


def test_blank_image():
    out = im.blank_anyres(TINY)
    assert out.mask.sum() == 0 and out.teacher_mask.sum() == 0 and out.num_tokens == 0


def _jpeg_bytes(width=64, height=48):
    buf = io.BytesIO()
    _random_image(width, height).save(buf, format="JPEG")
    return buf.getvalue()


def test_load_image_ok(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(_jpeg_bytes())
    for source in (path, str(path), _jpeg_bytes()):
        img = im.load_image(source)
        assert img.mode == "RGB" and img.size == (64, 48)


def test_truncated_jpeg_raises_bad_image(tmp_path):
    data = _jpeg_bytes(256, 256)
    with pytest.raises(im.BadImageError, match="cannot decode"):
        im.load_image(data[: len(data) // 2])
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(im.BadImageError):
        im.load_image(path)
    with pytest.raises(im.BadImageError, match="does not exist"):
        im.load_image(tmp_path / "missing.jpg")


def test_imagenet_transforms():
    img = _random_image(300, 200)
    rng = np.random.default_rng(0)
    outs = [im.imagenet_train_transform(img, rng, size=64) for _ in range(4)]
    assert all(o.shape == (64, 64, 3) and o.dtype == np.float32 for o in outs)
    assert not np.allclose(outs[0], outs[1])
    # Same seed, same crops.
    again = im.imagenet_train_transform(img, np.random.default_rng(0), size=64)
    np.testing.assert_array_equal(again, outs[0])
    for _ in range(50):
        left, top, w, h = im.random_resized_crop_box(300, 200, rng)
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
    ev = im.imagenet_eval_transform(img, size=64)
    assert ev.shape == (64, 64, 3)
    # A flat image stays flat through resize + centre crop.
    flat = im.imagenet_eval_transform(Image.new("RGB", (90, 300), (10, 200, 30)), size=32)
    expected = (np.array([10, 200, 30]) / 255 - np.array(im.IMAGENET_MEAN)) / np.array(im.IMAGENET_STD)
    np.testing.assert_allclose(flat, np.broadcast_to(expected, flat.shape), atol=1e-5)
