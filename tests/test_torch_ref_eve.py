import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from evejax.data import image as im  # noqa: E402
from evejax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from evejax.port.torch_ref import eve  # noqa: E402

C, D, LAYERS, CLIP = 32, 64, 8, 24
TINY = im.AnyResConfig(image_size=32, patch_size=4, pool=2, teacher_image_size=16,
                       teacher_patch_size=4)


def _llama_config(layers=LAYERS):
    return transformers.LlamaConfig(
        vocab_size=50, hidden_size=D, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")


def _model(**kw):
    torch.manual_seed(0)
    return eve.EVEReference(_llama_config(), mm_hidden_size=C, patch_size=4, pool=2,
                            clip_hidden_size=CLIP, teacher_patch_size=4, **kw).eval()


def _image(width, height, seed):
    rng = np.random.default_rng(seed)
    raw = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return im.preprocess_anyres(raw, TINY)


# Official names from reference/eve.md section 5, with {i} / {j} for indices;
# shapes are [out, in] at C (mm_hidden), D (LLM width), Cc (CLIP width).
def _official_vision_shapes(c, d, cc, patch, n_taps):
    shapes = {
        "model.vision_tower.patch_embedding.weight": (c, 3, patch, patch),
        "model.vision_tower.class_embedding": (c,),
        "model.vision_tower.split_embedding": (c,),
        "model.mm_projector.0.weight": (d, c), "model.mm_projector.0.bias": (d,),
        "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,),
        "model.vision_tower_compressor.input_layer.weight": (cc, d),
        "model.vision_tower_compressor.input_layer.bias": (cc,),
        "model.vision_tower_compressor.output_layer.weight": (cc, cc),
        "model.vision_tower_compressor.output_layer.bias": (cc,),
    }
    for attn in ("local_attention", "global_attention"):
        p = f"model.vision_tower.{attn}."
        shapes.update({p + "q.0.weight": (c,), p + "q.0.bias": (c,), p + "q.1.weight": (c, c),
                       p + "kv.0.weight": (c,), p + "kv.0.bias": (c,), p + "kv.1.weight": (2 * c, c),
                       p + "proj.weight": (c, c), p + "proj.bias": (c,)})
    for j in range(n_taps):
        p = f"model.vision_tower_compressor.norm_layer.{j}."
        shapes.update({p + "0.weight": (d,), p + "0.bias": (d,), p + "1.weight": (cc, d)})
    return shapes


LLM_KEY = re.compile(r"^(lm_head\.weight|model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\."
                     r"(self_attn\.[qkvo]_proj\.weight|mlp\.(gate|up|down)_proj\.weight|"
                     r"(input|post_attention)_layernorm\.weight)))$")


def test_state_dict_names_and_shapes_tiny():
    sd = _model().state_dict()
    vision = {k: tuple(v.shape) for k, v in sd.items() if not LLM_KEY.match(k)}
    assert vision == _official_vision_shapes(C, D, CLIP, 4, n_taps=3)
    assert sum(1 for k in sd if LLM_KEY.match(k)) == 3 + 9 * LAYERS
    assert sd["model.layers.7.mlp.down_proj.weight"].shape == (D, 128)


def test_full_size_shapes_and_parameter_counts():
    with torch.device("meta"):
        tokenizer = eve.VisionTokenizer(1024, 14, 2, 8)
        projector = eve.build_mm_projector(1024, 4096)
        pal = eve.VisionCompressor(4096, 1024, 32, 4, 8)
    assert pal.layer_taps == [32, 28, 24, 20, 16, 12, 8, 4, 0]
    shapes = {f"model.vision_tower.{k}": tuple(v.shape) for k, v in tokenizer.state_dict().items()}
    shapes.update({f"model.mm_projector.{k}": tuple(v.shape) for k, v in projector.state_dict().items()})
    shapes.update({f"model.vision_tower_compressor.{k}": tuple(v.shape)
                   for k, v in pal.state_dict().items()})
    assert shapes == _official_vision_shapes(1024, 4096, 1024, 14, n_taps=9)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # reference/eve.md: PEL (tokenizer + projector) 29,982,720; PAL 43,067,392.
    assert count(tokenizer) + count(projector) == 29_982_720
    assert count(pal) == 43_067_392


def test_official_checkpoint_keys_load_strictly():
    model = _model()
    official = dict(model.state_dict())
    official["model.vision_clip.backbone.vision_model.embeddings.class_embedding"] = torch.zeros(CLIP)
    official["model.vision_tower_compressor.clip_layer.backbone.vision_model.embeddings."
             "class_embedding"] = torch.zeros(CLIP)
    official["model.rotary_emb.inv_freq"] = torch.zeros(8)
    model.load_state_dict(eve.strip_teacher_keys(official), strict=True)
    inference = _model(with_pal=False)
    inference.load_state_dict(eve.strip_teacher_keys(official, keep_pal=False), strict=True)


@pytest.mark.parametrize("width,height", [(50, 20), (20, 50), (40, 40)])
def test_token_lengths_with_padding(width, height):
    model = _model()
    img = _image(width, height, seed=1)
    with torch.no_grad():
        tokens, grids = model.model.vision_tower(torch.from_numpy(img.chw4()[None]))
        projected = model.model.mm_projector(tokens[0])
    assert grids == [img.grid]
    assert tokens[0].shape == (im.num_image_tokens(height, width, TINY), C)
    assert projected.shape == (img.num_tokens, D)
    h, w = img.grid
    # Every row ends with the SPL embedding; position 0 is not it (it is CLS).
    rows = tokens[0][1:].reshape(h, w + 1, C)
    torch.testing.assert_close(rows[:, -1], model.model.vision_tower.split_embedding.expand(h, C))


def test_padding_does_not_change_tokens():
    torch.manual_seed(0)
    tokenizer = eve.VisionTokenizer(C, 4, 2, 8).eval()
    content = torch.randn(3, 16, 24)  # a 2 x 3 pooled grid of valid pixels
    first = torch.zeros(1, 4, 32, 32)
    first[0, :3, 8:24, 4:28], first[0, 3, 8:24, 4:28] = content, 1
    second = torch.randn(1, 4, 48, 40) * 5  # other size, other padding values, other offset
    second[0, 3] = 0
    second[0, :3, 24:40, 12:36], second[0, 3, 24:40, 12:36] = content, 1
    with torch.no_grad():
        (a,), grid_a = tokenizer(first)
        (b,), grid_b = tokenizer(second)
    assert grid_a == grid_b == [(2, 3)]
    assert a.shape == (1 + 2 * 4, C)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_misaligned_mask_is_rejected():
    tokenizer = eve.VisionTokenizer(C, 4, 2, 8)
    x = torch.zeros(1, 4, 32, 32)
    x[0, 3, 2:30, :] = 1
    with pytest.raises(ValueError, match="whole 4-pixel patches"):
        tokenizer(x)


def _batch(model):
    """Two images of different aspect ratio and a text-only sample, right padded."""
    imgs = [_image(50, 20, 1), _image(20, 50, 2), im.blank_anyres(TINY)]
    texts = [[5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9], [5, IMAGE_TOKEN_INDEX, 7], [5, 6, 7, 8]]
    n = max(map(len, texts))
    ids = torch.zeros(3, n, dtype=torch.long)
    mask = torch.zeros(3, n, dtype=torch.bool)
    labels = torch.full((3, n), IGNORE_INDEX)
    for i, t in enumerate(texts):
        ids[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), True
        labels[i, len(t) - 2:len(t)] = torch.tensor(t[-2:])
    pixels = torch.from_numpy(np.stack([x.chw4() for x in imgs]))
    clip_mask = torch.from_numpy(np.stack([x.teacher_mask for x in imgs]))
    clip_features = torch.randn(3, 16, CLIP, generator=torch.Generator().manual_seed(3))
    return imgs, texts, ids, mask, labels, pixels, clip_features, clip_mask


def test_reference_forward_splices_images():
    model = _model()
    imgs, texts, ids, mask, labels, pixels, clip_features, clip_mask = _batch(model)
    with torch.no_grad():
        out = model(ids, mask, pixels, labels, clip_features, clip_mask)
    lengths = [len(texts[0]) - 1 + imgs[0].num_tokens, len(texts[1]) - 1 + imgs[1].num_tokens,
               len(texts[2])]
    # Rows keep their right padding, as official: width = padded ids - 1 + image tokens.
    width = max(ids.shape[1] - 1 + imgs[0].num_tokens, ids.shape[1] - 1 + imgs[1].num_tokens)
    assert out.logits.shape == (3, width, 50)
    assert out.attention_mask.sum(1).tolist() == lengths
    assert len(out.hidden_states) == LAYERS + 1
    # HF convention: the last hidden state is the one after the final norm.
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[-1]))
    # The image span sits where the placeholder was; labels there are ignored.
    s, n0 = 2, imgs[0].num_tokens
    assert (out.labels[0, s:s + n0] == IGNORE_INDEX).all()
    assert out.labels[0, s + n0 + 1:s + n0 + 3].tolist() == [8, 9]
    assert torch.isfinite(out.ce_loss) and torch.isfinite(out.pal_loss)
    # A sample's logits do not depend on the other samples or on right padding.
    with torch.no_grad():
        alone = model(ids[1:2, :len(texts[1])], None, pixels[1:2])
    torch.testing.assert_close(out.logits[1, :lengths[1]], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_pal_loss_is_zero_for_its_own_prediction():
    model = _model()
    imgs, texts, ids, mask, labels, pixels, clip_features, clip_mask = _batch(model)
    pal = model.model.vision_tower_compressor
    assert pal.layer_taps == [8, 4, 0]
    with torch.no_grad():
        out = model(ids, mask, pixels)
        states = torch.stack(out.hidden_states, dim=2)
        perfect = clip_features.clone()
        for i, start in ((0, 2), (1, 1)):
            pred = pal.predict(pal.image_states(states[i], start, imgs[i].grid))
            valid = torch.from_numpy(imgs[i].teacher_mask.reshape(4, 4, 4, 4).mean((1, 3)) > 0)
            perfect[i][valid.flatten()] = pred
        loss = pal(out.hidden_states, [2, 1, None], [imgs[0].grid, imgs[1].grid, None],
                   perfect, clip_mask)
        noisy = pal(out.hidden_states, [2, 1, None], [imgs[0].grid, imgs[1].grid, None],
                    clip_features, clip_mask)
    assert abs(loss.item()) < 1e-6
    assert 0.5 < noisy.item() < 1.5


def test_pal_hd_pools_the_grid():
    torch.manual_seed(0)
    pal = eve.VisionCompressor(D, CLIP, LAYERS, 4, 8, patch_ratio=2, teacher_patch_size=4)
    states = torch.randn(1 + 4 * 9, LAYERS + 1, D)
    patches = pal.image_states(states, 0, (4, 8))
    assert patches.shape == (2 * 4, LAYERS + 1, D)
    grid = states[1:].reshape(4, 9, LAYERS + 1, D)[:, :8]
    torch.testing.assert_close(patches[0], grid[:2, :2].mean((0, 1)))


def test_teacher_registered_twice_under_official_names():
    """As official: one CLIPVisionTower is both model.vision_clip and the compressor's
    clip_layer, so a state_dict names the teacher twice, transformers-4 style."""
    teacher = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=CLIP, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=4, attn_implementation="eager"))
    model = _model(teacher=teacher)
    names = set(model.state_dict())
    hf = {f"backbone.vision_model.{k}" for k in teacher.state_dict()}
    assert {k[len("model.vision_clip."):] for k in names if k.startswith("model.vision_clip.")} == hf
    copy = "model.vision_tower_compressor.clip_layer."
    assert {k[len(copy):] for k in names if k.startswith(copy)} == hf
    imgs, texts, ids, mask, labels, pixels, _, clip_mask = _batch(model)
    teacher_pixels = torch.from_numpy(np.stack([x.teacher_pixels.transpose(2, 0, 1) for x in imgs]))
    with torch.no_grad():
        features = teacher(teacher_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        by_pixels = model(ids, mask, pixels, teacher_pixels=teacher_pixels, clip_mask=clip_mask).pal_loss
        by_features = model(ids, mask, pixels, clip_features=features, clip_mask=clip_mask).pal_loss
    assert torch.equal(by_pixels, by_features)
