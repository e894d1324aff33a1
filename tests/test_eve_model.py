"""EVE in JAX vs the PyTorch reference (official names), float32, random weights, tiny sizes.

Parity is max |jax - torch| / max |torch| <= 1e-5 on: the PEL tokens (before and
after the projector) of images with two aspect ratios and padding, the PAL loss
against a HF CLIP teacher, the CE loss, and the full logits with the image in
the middle of a prompt, in both port directions. Also: token counts of the
static-shape path at full size, and parameter counts of EVE-7B from shapes only.
"""
import math

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from evejax.data import image as im  # noqa: E402
from evejax.data.text import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from evejax.models import eve, vit  # noqa: E402
from evejax.models.registry import build  # noqa: E402
from evejax.port import clip as clip_port  # noqa: E402
from evejax.port import eve as eve_port  # noqa: E402
from evejax.port.torch_ref import eve as ref  # noqa: E402

TOL = 1e-5
CFG = eve.get_config("tiny")
ANYRES = CFG.anyres()
# (width, height): 1:1 fills the canvas; 3:4 portrait and 2:1 landscape are padded,
# their valid bands starting one and two teacher patches off the origin.
SIZES = ((50, 50), (60, 80), (80, 40))


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))


def reference_model(cfg=CFG, with_pal=True, seed=0):
    """EVEReference + HF CLIP teacher of `cfg`, random weights far from their init."""
    t = cfg.llm.transformer
    llama = transformers.LlamaConfig(
        vocab_size=cfg.llm.vocab_size, hidden_size=t.embed_dim, intermediate_size=t.mlp_dim,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.norm_eps, rope_theta=t.rope_base,
        tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    kw = {}
    if with_pal:
        kw = dict(clip_hidden_size=cfg.clip.transformer.embed_dim, layer_interval=cfg.pal_interval,
                  pal_heads=cfg.pal_heads, patch_ratio=cfg.patch_ratio, teacher_patch_size=cfg.clip.patch_size)
    model = ref.EVEReference(llama, mm_hidden_size=cfg.vision_width, patch_size=cfg.patch_size, pool=cfg.pool,
                             num_heads=cfg.vision_heads, with_pal=with_pal, **kw).eval()
    teacher = None
    if with_pal:
        teacher = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            **clip_port.hf_config(cfg.clip), attn_implementation="eager")).eval()
    with torch.no_grad():
        for m in (model, teacher):
            for p in (m.parameters() if m is not None else ()):
                p.copy_(torch.randn_like(p) * 0.2)
    return model, teacher


def official_state_dict(model, teacher, duplicate=True):
    """The release layout: EVE names + the teacher under vision_clip (and its clip_layer copy)."""
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if teacher is not None:
        for k, v in teacher.state_dict().items():
            state[eve_port.CLIP_PREFIX + "vision_model." + k] = v.numpy()
            if duplicate:
                state[eve_port.DUPLICATE_CLIP_PREFIX + "vision_model." + k] = v.numpy().copy()
    return state


def load_reference(state, cfg=CFG, with_pal=True):
    """EVEReference (+ teacher) holding an official state dict, loaded strictly."""
    model, teacher = reference_model(cfg, with_pal, seed=1)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    model.load_state_dict(ref.strip_teacher_keys(tensors, keep_pal=with_pal), strict=True)
    if teacher is not None:
        scope = eve_port.CLIP_PREFIX + "vision_model."
        teacher.load_state_dict({k[len(scope):]: v for k, v in tensors.items() if k.startswith(scope)},
                                strict=True)
    return model, teacher


def random_jax_params(cfg=CFG, seed=0):
    leaves, treedef = jax.tree.flatten(eve_port.abstract_params(cfg))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(rng.standard_normal(x.shape) * 0.2).astype(x.dtype) for x in leaves])


def images(sizes=SIZES, anyres=ANYRES, seed=0):
    rng = np.random.default_rng(seed)
    return [im.preprocess_anyres(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), anyres)
            for w, h in sizes]


# ---- PEL ------------------------------------------------------------------------------

@jax.jit
def _pel(params, pixels, mask):
    def run(module, pixels, mask):
        raw = module.vision_tokenizer(pixels, mask)
        return raw, module.mm_projector(raw.tokens)

    return eve.EVE(CFG).apply({"params": params}, pixels, mask, method=run)


def _reference_pel(model, imgs):
    with torch.no_grad():
        tokens, grids = model.model.vision_tower(torch.from_numpy(np.stack([x.chw4() for x in imgs])))
        projected = [model.model.mm_projector(t) for t in tokens]
    return [t.numpy() for t in tokens], [p.numpy() for p in projected], grids


def _check_pel(params, model, imgs):
    raw, projected = _pel(params, np.stack([x.pixels for x in imgs]), np.stack([x.mask for x in imgs]))
    tokens, projected_ref, grids = _reference_pel(model, imgs)
    errors = []
    for i, img in enumerate(imgs):
        n = img.num_tokens
        assert tuple(np.asarray(raw.grid[i])) == grids[i] == img.grid
        assert int(raw.valid[i].sum()) == n and bool(raw.valid[i, :n].all())
        errors += [rel_err(raw.tokens[i, :n], tokens[i]), rel_err(projected[i, :n], projected_ref[i])]
    assert max(errors) <= TOL, errors
    return max(errors)


def test_pel_parity_torch_to_jax():
    model, teacher = reference_model()
    params, _ = eve_port.to_flax(official_state_dict(model, teacher), CFG)
    imgs = images()
    assert [x.num_tokens for x in imgs] == [73, 57, 37]
    err = _check_pel(params, model, imgs)
    print(f"PEL torch->jax max rel err {err:.2e}")

    # Whatever the padding holds, the tokens stay those of the valid crop.
    noisy = [img.__class__(pixels=np.where(img.mask[..., None] > 0, img.pixels,
                                           np.random.default_rng(7).normal(size=img.pixels.shape) * 9),
                           mask=img.mask, grid=img.grid, teacher_pixels=None, teacher_mask=None) for img in imgs]
    clean, _ = _pel(params, np.stack([x.pixels for x in imgs]), np.stack([x.mask for x in imgs]))
    dirty, _ = _pel(params, np.stack([x.pixels for x in noisy]).astype(np.float32),
                    np.stack([x.mask for x in noisy]))
    valid = np.asarray(clean.valid)[..., None]
    np.testing.assert_array_equal(np.where(valid, clean.tokens, 0), np.where(valid, dirty.tokens, 0))


def test_pel_parity_jax_to_torch():
    params = random_jax_params()
    model, _ = load_reference(eve_port.to_torch(params, CFG))
    err = _check_pel(params, model, images(seed=3))
    print(f"PEL jax->torch max rel err {err:.2e}")


# ---- full model: logits, CE, PAL ------------------------------------------------------

TEXTS = ([1, 5, 6, 7, IMAGE_TOKEN_INDEX, 8, 9, 10, 11], [1, 5, IMAGE_TOKEN_INDEX, 12, 13],
         [1, IMAGE_TOKEN_INDEX, 14, 15, 16, 17], [1, 5, 6, 7])


def _batch(imgs):
    """Image rows (placeholder mid-prompt) and a text-only row with a blank image, right padded,
    as `evejax.data.pipeline` lays them out: token k predicts targets[k]; loss_mask on targets."""
    n = max(map(len, TEXTS))
    ids = np.zeros((len(TEXTS), n), np.int32)
    segment_ids = np.zeros((len(TEXTS), n), np.int32)
    supervised = np.zeros((len(TEXTS), n), bool)
    for i, t in enumerate(TEXTS):
        ids[i, :len(t)], segment_ids[i, :len(t)] = t, 1
        supervised[i, len(t) - 3:len(t)] = True
    supervised &= ids != IMAGE_TOKEN_INDEX
    targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    targets[targets == IMAGE_TOKEN_INDEX] = 0
    loss_mask = np.concatenate([supervised[:, 1:], np.zeros_like(supervised[:, :1])], axis=1)
    views = list(imgs[:3]) + [im.blank_anyres(ANYRES)]
    return {"tokens": ids, "targets": targets, "segment_ids": segment_ids,
            "loss_mask": loss_mask.astype(np.float32), "supervised": supervised,
            "pixels": np.stack([v.pixels for v in views]), "pixel_mask": np.stack([v.mask for v in views]),
            "teacher_pixels": np.stack([v.teacher_pixels for v in views]),
            "teacher_mask": np.stack([v.teacher_mask for v in views]), "views": views}


SPEC = build(ml_collections.ConfigDict({"name": "eve", "size": "tiny", "overrides": {}, "pal_weight": 1.0}))


@jax.jit
def _forward(params, batch):
    out = SPEC.module.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["pixels"],
                            batch["pixel_mask"], batch["teacher_pixels"], batch["teacher_mask"])
    loss, metrics = SPEC.loss_fn(params, batch, jax.random.key(0))
    return out, metrics


def _reference_forward(model, teacher, batch):
    with torch.no_grad():
        teacher_in = torch.from_numpy(batch["teacher_pixels"].transpose(0, 3, 1, 2).copy())
        clip_features = teacher(teacher_in, output_hidden_states=True).hidden_states[CFG.teacher_layer][:, 1:]
        ids = torch.from_numpy(batch["tokens"]).long()
        labels = torch.where(torch.from_numpy(batch["supervised"]), ids, IGNORE_INDEX)
        return model(ids, torch.from_numpy(batch["segment_ids"] > 0),
                     torch.from_numpy(np.stack([v.chw4() for v in batch["views"]])), labels, clip_features,
                     torch.from_numpy(batch["teacher_mask"]))


def _check_model(params, model, teacher, imgs):
    batch = _batch(imgs)
    want = _reference_forward(model, teacher, batch)
    got, metrics = _forward(params, {k: v for k, v in batch.items() if k not in ("views", "supervised")})
    mask = want.attention_mask.numpy()
    n_valid = mask.sum(1)
    seg = np.asarray(got.segment_ids)
    assert seg.shape[1] == CFG.llm_length(batch["tokens"].shape[1])
    assert (seg.sum(1) == n_valid).all() and all(seg[i, :n].all() for i, n in enumerate(n_valid))
    errors = {"logits": max(rel_err(got.logits[i, :n], want.logits[i, :n]) for i, n in enumerate(n_valid)),
              "pal": rel_err(got.pal_loss, want.pal_loss), "ce": rel_err(metrics["ce"], want.ce_loss),
              "pal_metric": rel_err(metrics["pal"], want.pal_loss)}
    assert max(errors.values()) <= TOL, errors
    # The image span sits where the placeholder was.
    source = np.asarray(got.source)
    assert (source[0, 4:4 + imgs[0].num_tokens] == -1).all() and source[0, 4 + imgs[0].num_tokens] == 5
    return errors


def test_model_parity_torch_to_jax():
    model, teacher = reference_model()
    params, notes = eve_port.to_flax(official_state_dict(model, teacher), CFG)
    assert any("equals" in n for n in notes)
    errors = _check_model(params, model, teacher, images(SIZES))
    print("EVE torch->jax", {k: f"{v:.2e}" for k, v in errors.items()})


def test_model_parity_jax_to_torch():
    params = random_jax_params(seed=5)
    model, teacher = load_reference(eve_port.to_torch(params, CFG))
    errors = _check_model(params, model, teacher, images(SIZES[::-1], seed=4))
    print("EVE jax->torch", {k: f"{v:.2e}" for k, v in errors.items()})


def test_packed_row_equals_unpacked():
    """A text-only sample packed before an image sample leaves the latter's logits unchanged."""
    cfg = CFG.replace(with_pal=False)
    params, _ = eve_port.to_flax(official_state_dict(*reference_model()), cfg)
    text_only, with_image = [1, 5, 6, 7], [1, 8, IMAGE_TOKEN_INDEX, 9, 10]
    tokens = np.zeros((2, 12), np.int32)
    segments = np.zeros((2, 12), np.int32)
    tokens[0, :9], segments[0, :9] = text_only + with_image, [1] * 4 + [2] * 5
    tokens[1, :5], segments[1, :5] = with_image, 1
    img = images(SIZES[1:2])[0]
    pixels, mask = np.stack([img.pixels] * 2), np.stack([img.mask] * 2)
    out = jax.jit(eve.EVE(cfg).apply)({"params": params}, tokens, segments, pixels, mask)
    n = len(with_image) - 1 + img.num_tokens
    assert rel_err(out.logits[0, 4:4 + n], out.logits[1, :n]) <= TOL
    np.testing.assert_array_equal(np.asarray(out.segment_ids[0, :4 + n]), [1] * 4 + [2] * n)
    # The last image token predicts the text after the placeholder (its target).
    assert int(out.target_source[1, 2 + img.num_tokens - 1]) == 2
    assert (np.asarray(out.target_source[1, 2:2 + img.num_tokens - 1]) == -1).all()


def test_pal_parity_hd_pooling():
    """patch_ratio 2 (the HD path): a 16 x 16 pooled grid onto the 8 x 8 teacher grid."""
    cfg = CFG.replace(image_size=128)
    anyres = cfg.anyres()
    assert cfg.patch_ratio == 2
    model, teacher = reference_model(cfg)
    params, _ = eve_port.to_flax(official_state_dict(model, teacher, duplicate=False), cfg)
    imgs = images(((60, 80),), anyres)
    ids = np.asarray([[1, 5, IMAGE_TOKEN_INDEX, 6]], np.int32)
    out = jax.jit(eve.EVE(cfg).apply)({"params": params}, ids, ids != 0, imgs[0].pixels[None],
                                      imgs[0].mask[None], imgs[0].teacher_pixels[None], imgs[0].teacher_mask[None])
    with torch.no_grad():
        features = teacher(torch.from_numpy(imgs[0].teacher_pixels[None].transpose(0, 3, 1, 2).copy()),
                           output_hidden_states=True).hidden_states[-2][:, 1:]
        want = model(torch.from_numpy(ids).long(), None, torch.from_numpy(imgs[0].chw4()[None]), None,
                     features, torch.from_numpy(imgs[0].teacher_mask[None]))
    n = int(want.attention_mask.sum())
    assert rel_err(out.logits[0, :n], want.logits[0]) <= TOL
    assert rel_err(out.pal_loss, want.pal_loss) <= TOL


# ---- full-size shapes: token counts and parameter counts ------------------------------

# The geometry is independent of the width, so a narrow PEL keeps this fast; patch 14 and
# pool 2 are those of both 7b sizes. Parameters do not depend on the canvas: init on one cell.
_NARROW_PEL = eve.VisionTokenizer(16, 14, 2, 8)
_narrow_tokens = jax.jit(_NARROW_PEL.apply)


@pytest.fixture(scope="module")
def narrow_params():
    return jax.jit(_NARROW_PEL.init)(jax.random.key(0), np.zeros((1, 28, 28, 3)), np.ones((1, 28, 28)))


@pytest.mark.parametrize("size,width,height,tokens", [
    ("7b", 672, 672, 601), ("7b", 500, 300, 376), ("7b_hd", 1344, 1344, 2353)])
def test_token_counts_static_path(size, width, height, tokens, narrow_params):
    cfg = eve.get_config(size)
    assert (cfg.patch_size, cfg.pool) == (14, 2)
    img = im.preprocess_anyres(Image.new("RGB", (width, height), (200, 30, 90)), cfg.anyres(),
                               with_teacher=False)
    out = _narrow_tokens(narrow_params, img.pixels[None], img.mask[None])
    assert out.tokens.shape == (1, cfg.max_image_tokens, 16)
    assert int(out.valid.sum()) == tokens == im.num_image_tokens(height, width, cfg.anyres())
    assert tuple(np.asarray(out.grid[0])) == img.grid


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_eve_7b_parameter_counts_from_shapes():
    # reference/eve.md §5, derived from the official module tree.
    parts = {"llm": 6_738_415_616, "pel": 29_982_720, "pal": 43_067_392, "clip": 303_507_456}
    cfg = eve.get_config("7b")
    abstract = eve_port.abstract_params(cfg)
    got = {"llm": _count(abstract["llm"]),
           "pel": _count(abstract["vision_tokenizer"]) + _count(abstract["mm_projector"]),
           "pal": _count(abstract["vision_compressor"]), "clip": _count(abstract["clip"])}
    assert got == parts
    assert _count(abstract) == 7_114_973_184
    # The official names the export writes hold exactly these elements.
    shapes = eve_port.official_shapes(cfg)
    assert sum(math.prod(s) for s in shapes.values()) == 7_114_973_184
    assert shapes["model.vision_tower.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["model.vision_tower.local_attention.kv.1.weight"] == (2048, 1024)
    assert shapes["model.vision_tower_compressor.norm_layer.8.1.weight"] == (1024, 4096)
    assert shapes["model.mm_projector.2.weight"] == (4096, 4096)
    assert shapes[eve_port.CLIP_PREFIX + "vision_model.embeddings.position_embedding.weight"] == (577, 1024)

    inference = cfg.replace(with_pal=False)
    abstract = eve_port.abstract_params(inference)
    assert set(abstract) == {"llm", "vision_tokenizer", "mm_projector"}
    assert _count(abstract) == parts["llm"] + parts["pel"] == 6_768_398_336
    assert sum(math.prod(s) for s in eve_port.official_shapes(inference).values()) == 6_768_398_336


def test_hd_config_and_flops():
    hd = eve.get_config("7b_hd")
    assert (hd.grid, hd.patch_ratio, hd.max_image_tokens, hd.layer_taps) == (
        48, 2, 2353, (32, 28, 24, 20, 16, 12, 8, 4, 0))
    parts = eve.training_flops(eve.get_config("7b"), batch=1, text_len=2048)
    # The LLM dominates; the frozen teacher's forward is ~0.35 TFLOP per image.
    assert parts["llm"] > 100 * (parts["pel"] + parts["pal"] + parts["teacher"])
    assert 0.3e12 < parts["teacher"] < 0.4e12
    assert eve.training_flops(eve.get_config("7b", with_pal=False), 1, 2048)["teacher"] == 0


def test_sharded_training_loss_and_frozen_teacher():
    """The loss on a data x fsdp x tensor mesh equals the single-device one; the teacher
    gets exactly zero gradient (stop_gradient), everything else learns."""
    from evejax import sharding

    model, teacher = reference_model()
    params, _ = eve_port.to_flax(official_state_dict(model, teacher), CFG)
    batch = {k: v for k, v in _batch(images(SIZES)).items() if k not in ("views", "supervised")}
    _, metrics = _forward(params, batch)
    loss = metrics["ce"] + metrics["pal"]

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda: SPEC.module.init(jax.random.key(0), *SPEC.init_args))["params"]
    param_sh = sharding.tree_shardings(boxed, mesh)
    grad_fn = jax.value_and_grad(lambda p, b: SPEC.loss_fn(p, b, jax.random.key(0))[0])
    with sharding.rules_context(mesh):
        sharded = jax.jit(grad_fn, in_shardings=(param_sh, {k: sharding.batch_sharding(mesh, v.ndim)
                                                            for k, v in batch.items()}))
        sharded_loss, grads = sharded(jax.device_put(params, param_sh), sharding.global_batch(batch, mesh))
    assert abs(float(sharded_loss) - float(loss)) <= TOL * abs(float(loss))
    grads = jax.tree.map(np.asarray, grads)
    norms = {k: float(sum(np.sum(np.square(g)) for g in jax.tree.leaves(v))) for k, v in grads.items()}
    assert norms["clip"] == 0.0
    assert all(norms[k] > 0 for k in ("llm", "vision_tokenizer", "mm_projector", "vision_compressor"))


def test_inference_config_keeps_the_preprocessing():
    """Dropping the teacher keeps its view sizes, which set where preprocessing pads."""
    for size in ("tiny", "7b_hd"):
        training = eve.get_config(size)
        inference = training.replace(with_pal=False)
        assert inference.clip is None and inference.anyres() == training.anyres()
    with pytest.raises(ValueError, match="differs from the CLIP teacher"):
        eve.get_config("tiny", teacher_image_size=64)
    other_teacher = eve.get_config("tiny").replace(clip=vit.clip_vit(32, 8, 32, 2, 4, 64))
    assert other_teacher.validate().anyres().teacher_patch_size == 8
