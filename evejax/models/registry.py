"""Builds a model family from `config.model`: the module, a loss, batch shapes and FLOPs.

Every trainer, planner and benchmark goes through `build`, so a family plugs in
by adding one entry to `FAMILIES`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp


@dataclasses.dataclass
class ModelSpec:
    module: Any                      # flax module
    init_args: tuple                 # example inputs for module.init (small shapes are fine)
    init_kwargs: dict
    loss_fn: Callable                # (params, batch, rng) -> (loss, metrics)
    batch_specs: Callable            # (batch, seq_len) -> dict of jax.ShapeDtypeStruct
    flops_per_step: Callable         # (batch, seq_len) -> MaxText-style model FLOPs
    config: Any                      # the family's dataclass config
    training_only: tuple[str, ...] = ()  # top-level param subtrees only training reads (a teacher):
    #                                     a workdir's model without them is `config`'s (port.checkpoint.load_workdir)


def _build_llm(model_cfg) -> ModelSpec:
    from evejax.models import llm
    from evejax.models import losses

    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = llm.get_config(model_cfg.size, **overrides)
    module = llm.CausalLM(cfg)
    return ModelSpec(
        module=module, init_args=(jnp.zeros((1, 8), jnp.int32),), init_kwargs={},
        loss_fn=losses.lm_loss_fn(module), batch_specs=losses.batch_specs,
        flops_per_step=lambda b, t: llm.training_flops_per_step(cfg, b, t), config=cfg)


def _build_eve(model_cfg) -> ModelSpec:
    """EVE (models/eve.py). model_cfg: size ("tiny", "7b", "7b_hd"), overrides (EVEConfig or
    TransformerConfig fields; with_pal=False builds the inference model), pal_weight (1.0,
    official). Batches: see `eve_batch_specs`; seq_len is the text length before splicing."""
    from evejax.models import eve

    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = eve.get_config(model_cfg.size, **overrides)
    module = eve.EVE(cfg)
    return ModelSpec(
        module=module, init_args=eve.init_inputs(cfg), init_kwargs={},
        loss_fn=_eve_loss_fn(module, float(model_cfg.get("pal_weight", 1.0))),
        batch_specs=lambda b, t: eve_batch_specs(cfg, b, t),
        flops_per_step=lambda b, t: sum(eve.training_flops(cfg, b, t).values()), config=cfg)


def eve_batch_specs(cfg, batch: int, seq_len: int) -> dict:
    """The conversation batch of `evejax.data.pipeline` that EVE reads: tokens, targets,
    segment_ids [B, N] int32 (tokens hold IMAGE_TOKEN_INDEX where the image goes), loss_mask
    [B, N] float32 (aligned with targets), pixels [B, S, S, 3] and pixel_mask [B, S, S]
    float32 (preprocess_anyres) and, for the training model, teacher_pixels [B, Tt, Tt, 3],
    teacher_mask [B, Tt, Tt]. N = seq_len text positions; the LLM runs on N - 1 + M."""
    import jax

    spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct((batch,) + shape, dt)  # noqa: E731
    s = cfg.image_size
    specs = {"tokens": spec((seq_len,), jnp.int32), "targets": spec((seq_len,), jnp.int32),
             "segment_ids": spec((seq_len,), jnp.int32), "loss_mask": spec((seq_len,)),
             "pixels": spec((s, s, 3)), "pixel_mask": spec((s, s))}
    if cfg.with_pal:
        t = cfg.clip.image_size
        specs.update(teacher_pixels=spec((t, t, 3)), teacher_mask=spec((t, t)))
    return specs


def _eve_loss_fn(module, pal_weight: float):
    """(params, batch, rng) -> (ce + pal_weight * pal, {"ce", "pal", "weight"}).

    CE: each spliced position predicts the target of its `target_source`
    (image tokens other than the last, and padding, predict nothing); the mean
    over the batch's supervised tokens, as official. pal is 0 for the
    inference model.
    """
    from evejax.models import eve
    from evejax.models import losses

    def loss_fn(params, batch, rng):
        out = module.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["pixels"],
                           batch["pixel_mask"], batch.get("teacher_pixels"), batch.get("teacher_mask"),
                           deterministic=False, rngs={"dropout": rng})
        targets = eve.gather_text(batch["targets"], out.target_source)
        supervised = eve.gather_text(batch["loss_mask"].astype(jnp.float32), out.target_source)
        # A placeholder is never a target (the packer pads it); a negative id would index garbage.
        supervised = supervised * ((out.segment_ids > 0) & (targets >= 0))
        ce, weight = losses.cross_entropy(out.logits, targets, supervised)
        pal = jnp.zeros((), jnp.float32) if out.pal_loss is None else out.pal_loss
        return ce + pal_weight * pal, {"ce": ce, "pal": pal, "weight": weight}

    return loss_fn


def _build_clip_classifier(model_cfg) -> ModelSpec:
    """A ClipViT + linear head on image labels (models/vit.py `ClipClassifier`), e.g. a small
    teacher whose `clip` params become EVE's. model_cfg: size (vit.CLIP_SIZES), overrides
    (ClipViTConfig or TransformerConfig fields), num_classes. Batches: pixels [B, S, S, 3]
    float32, label [B] int32 (-1 marks a padding row); seq_len is not used."""
    import jax

    from evejax.models import vit
    from evejax.models import losses

    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = vit.get_clip_config(model_cfg.size, **overrides)
    module = vit.ClipClassifier(cfg, int(model_cfg.num_classes))
    s = cfg.image_size

    def loss_fn(params, batch, rng):
        logits = module.apply({"params": params}, batch["pixels"], deterministic=False, rngs={"dropout": rng})
        labels = batch["label"]
        valid = labels >= 0
        ce, weight = losses.cross_entropy(logits[:, None], jnp.maximum(labels, 0)[:, None], valid[:, None])
        right = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid)
        return ce, {"ce": ce, "accuracy": right / jnp.maximum(weight, 1.0), "weight": weight}

    def batch_specs(batch, seq_len):
        return {"pixels": jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}

    def flops_per_step(batch, seq_len):
        # Forward + backward, 6 FLOPs per multiply-add; attention scores and values as matmuls.
        t, tokens = cfg.transformer, 1 + cfg.num_patches
        d = t.embed_dim
        layer = tokens * (4 * d * d + 2 * d * t.mlp_dim) + 2 * tokens * tokens * d
        macs = cfg.num_patches * 3 * cfg.patch_size ** 2 * d + t.num_layers * layer + d * module.num_classes
        return 6.0 * batch * macs

    return ModelSpec(module=module, init_args=(jnp.zeros((1, s, s, 3), jnp.float32),), init_kwargs={},
                     loss_fn=loss_fn, batch_specs=batch_specs, flops_per_step=flops_per_step, config=cfg)


def _build_dan(model_cfg) -> ModelSpec:
    """De-focus Attention Networks classifiers (models/dan.py). model_cfg: size (dan.SIZES:
    "mamba_s|b|l|tiny", "vit_s|b|tiny": the size picks the backbone), overrides (DANConfig,
    MambaConfig or TransformerConfig fields, e.g. num_classes, image_size, drop_path).
    Batches: pixels [B, H, W, 3] float32 (normalised); label [B] int32 (-1 marks a padding row) or
    label_probs [B, C] float32 soft targets (mixup/cutmix/smoothing; used instead of label when
    present; an all-zero row is padding); optional drop_path_rate [] float32, this step's maximum
    drop-path rate (absent: the config's). seq_len is not used.
    Loss: the official mix (ce + aux_ce) / 2; metrics ce, aux_ce, accuracy (top-1 of the class
    token against argmax of the target), weight (real rows)."""
    import jax

    from evejax.models import dan

    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = dan.get_config(model_cfg.size, **overrides)
    module = dan.DANClassifier(cfg)

    def loss_fn(params, batch, rng):
        out = module.apply({"params": params}, batch["pixels"], deterministic=False,
                           drop_path_rate=batch.get("drop_path_rate"), rngs={"dropout": rng})
        if "label_probs" in batch:
            targets = batch["label_probs"].astype(jnp.float32)
            valid, truth = jnp.sum(targets, axis=-1) > 0, jnp.argmax(targets, axis=-1)
        else:
            truth = batch["label"]
            valid = truth >= 0
            targets = jax.nn.one_hot(jnp.maximum(truth, 0), cfg.num_classes, dtype=jnp.float32)
        loss, ce, aux_ce, weight = dan.classification_loss(out, targets, valid)
        right = jnp.sum((jnp.argmax(out.logits, axis=-1) == truth) & valid)
        return loss, {"ce": ce, "aux_ce": aux_ce, "accuracy": right / jnp.maximum(weight, 1.0), "weight": weight}

    def batch_specs(batch, seq_len):
        # The trainer feeds only these keys: label_probs carries the data's mixup / cutmix /
        # smoothing (tfds_imagenet always makes it; one-hot without augmentation).
        return {"pixels": jax.ShapeDtypeStruct((batch, *cfg.image_size, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
                "label_probs": jax.ShapeDtypeStruct((batch, cfg.num_classes), jnp.float32)}

    return ModelSpec(module=module, init_args=dan.init_inputs(cfg), init_kwargs={}, loss_fn=loss_fn,
                     batch_specs=batch_specs, flops_per_step=lambda b, t: dan.training_flops(cfg, b), config=cfg)


def _build_hovle(model_cfg) -> ModelSpec:
    """HoVLE (models/hovle.py). model_cfg: size ("tiny", "demo", "2.6b", "2.6b_hd"), overrides
    (HoVLEConfig fields, embedding_<field> for the embedding layers, TransformerConfig fields).
    Batches: tokens, targets, segment_ids [B, N] int32 (tokens hold <IMG_CONTEXT>, n per tile),
    loss_mask [B, N] float32 (aligned with targets), pixels [B, P, S, S, 3] float32 and tile_mask
    [B, P] bool, P = tile_slots: the HoVLE conversation batch of evejax.data.pipeline.
    Loss: token CE over `hovle.supervised_mask` (the official loss mask), mean over the batch.
    With model_cfg.teacher set (as `_hovle_teacher`), model_cfg.teacher_data says what the teacher
    reads: "unpaired" (the default) builds the stage-1 distillation model (`_build_hovle_distill`);
    "conversation" keeps these batches and this CE and adds the metric distill_image, 1 - cos
    between the LLM's input at each image placeholder and the frozen teacher's token for it
    (`HoVLEDistill.anchored`), mean over the batch's placeholders; config.stage.losses weighs it.
    Its params hold the teacher under teacher/ (training only, dropped by load_workdir)."""
    import jax

    from evejax.models import hovle
    from evejax.models import losses

    teacher_data = model_cfg.get("teacher_data", "unpaired") if model_cfg.get("teacher") else None
    if teacher_data not in (None, "unpaired", "conversation"):
        raise ValueError(f"config.model.teacher_data={teacher_data!r} is not known; use 'unpaired' (stage 1) "
                         "or 'conversation' (a distill_image term next to the CE)")
    if teacher_data == "unpaired":
        return _build_hovle_distill(model_cfg)
    anchored = teacher_data == "conversation"
    if anchored:
        distill_cfg, module = _hovle_teacher(model_cfg)
        cfg, init_args = distill_cfg.hovle, hovle.distill_init_inputs(distill_cfg.hovle)
        flops = lambda b, t: sum(hovle.anchored_training_flops(distill_cfg, b, t).values())  # noqa: E731
    else:
        cfg = hovle.get_config(model_cfg.size, **dict(model_cfg.get("overrides", {}) or {}))
        module, init_args = hovle.HoVLE(cfg), hovle.init_inputs(cfg)
        flops = lambda b, t: sum(hovle.training_flops(cfg, b, t).values())  # noqa: E731

    def loss_fn(params, batch, rng):
        inputs = (batch["tokens"], batch["pixels"], batch["segment_ids"], batch["tile_mask"])
        kw = dict(deterministic=False, rngs={"dropout": rng})
        distill = {}
        if anchored:
            out = module.apply({"params": params}, *inputs, method=hovle.HoVLEDistill.anchored, **kw)
            logits = out.logits
            distill["distill_image"] = hovle.negative_cosine(out.llm_inputs, out.image_target, out.image_mask)
        else:
            logits = module.apply({"params": params}, *inputs, **kw)
        supervised = hovle.supervised_mask(cfg, batch["targets"], batch["loss_mask"], batch["segment_ids"])
        ce, weight = losses.cross_entropy(logits, jnp.maximum(batch["targets"], 0), supervised)
        return ce, {"ce": ce, "weight": weight, **distill}

    def batch_specs(batch, seq_len):
        s = cfg.image_size
        text = lambda dt: jax.ShapeDtypeStruct((batch, seq_len), dt)  # noqa: E731
        return {"tokens": text(jnp.int32), "targets": text(jnp.int32), "segment_ids": text(jnp.int32),
                "loss_mask": text(jnp.float32),
                "pixels": jax.ShapeDtypeStruct((batch, cfg.tile_slots, s, s, 3), jnp.float32),
                "tile_mask": jax.ShapeDtypeStruct((batch, cfg.tile_slots), jnp.bool_)}

    return ModelSpec(module=module, init_args=init_args, init_kwargs={}, loss_fn=loss_fn, batch_specs=batch_specs,
                     flops_per_step=flops, config=cfg,
                     training_only=("teacher",) if anchored else ())


def _hovle_teacher(model_cfg):
    """(HoVLEDistillConfig, HoVLEDistill) of HoVLE (size, overrides as "hovle") + a frozen teacher:
    model_cfg.teacher a size of vit.INTERNVL_SIZES ("internvl2_2b", "tiny") or of
    vit.CLIP_TEACHER_SIZES ("clip_l14_336", "clip_tiny", "clip_demo": CLIP + a learned projection)
    and teacher_overrides (the teacher config's or TransformerConfig fields; dtype, param_dtype,
    remat, attention_impl and scan_unroll of `overrides` apply to it too, unless given here)."""
    from evejax.models import hovle
    from evejax.models import vit

    overrides = dict(model_cfg.get("overrides", {}) or {})
    shared = {k: v for k, v in overrides.items() if k in ("dtype", "param_dtype", "remat", "attention_impl",
                                                          "splash_block_q", "splash_block_kv", "scan_unroll")}
    teacher_kw = {**shared, **dict(model_cfg.get("teacher_overrides", {}) or {})}
    if model_cfg.teacher in vit.CLIP_TEACHER_SIZES:
        teacher_cfg = vit.get_clip_teacher_config(model_cfg.teacher, **teacher_kw)
    elif model_cfg.teacher in vit.INTERNVL_SIZES:
        teacher_cfg = vit.get_internvl_config(model_cfg.teacher, **teacher_kw)
    else:
        raise ValueError(f"config.model.teacher={model_cfg.teacher!r} is not known; use an InternVL teacher "
                         f"{sorted(vit.INTERNVL_SIZES)} or a CLIP one {sorted(vit.CLIP_TEACHER_SIZES)}")
    cfg = hovle.HoVLEDistillConfig(hovle.get_config(model_cfg.size, **overrides), teacher_cfg).validate()
    return cfg, hovle.HoVLEDistill(cfg.hovle, teacher_cfg)


def _build_hovle_distill(model_cfg) -> ModelSpec:
    """HoVLE stage 1 (models/hovle.py `HoVLEDistill`, `_hovle_teacher`); the CLIP teacher's
    projection reports its own loss as the metric teacher_projection.
    Batches (the unpaired batch of evejax/data/unpaired.py): pixels [B, P, S, S, 3] float32,
    tile_mask [B, P] bool, text_tokens and text_segment_ids [B, T] int32, T = seq_len.
    Metrics distill_image, distill_text: negative cosine similarity per token + 1 (hovle.negative_cosine),
    mean over each stream's real tokens; config.stage.losses weighs them."""
    import jax

    from evejax.models import hovle

    cfg, module = _hovle_teacher(model_cfg)

    def loss_fn(params, batch, rng):
        out = module.apply({"params": params}, batch["pixels"], batch["tile_mask"], batch["text_tokens"],
                           batch["text_segment_ids"], deterministic=False, rngs={"dropout": rng})
        image = hovle.negative_cosine(out.image_student, out.image_target, out.image_mask)
        text = hovle.negative_cosine(out.text_student, out.text_target, out.text_mask)
        metrics = {"distill_image": image, "distill_text": text}
        if out.teacher_projection is not None:
            metrics["teacher_projection"] = out.teacher_projection
        return sum(metrics.values()), metrics

    def batch_specs(batch, seq_len):
        s, p = cfg.image_size, cfg.hovle.tile_slots
        return {"pixels": jax.ShapeDtypeStruct((batch, p, s, s, 3), jnp.float32),
                "tile_mask": jax.ShapeDtypeStruct((batch, p), jnp.bool_),
                "text_tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
                "text_segment_ids": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)}

    return ModelSpec(module=module, init_args=hovle.distill_init_inputs(cfg.hovle), init_kwargs={},
                     loss_fn=loss_fn, batch_specs=batch_specs,
                     flops_per_step=lambda b, t: sum(hovle.distill_training_flops(cfg, b, t).values()),
                     config=cfg)


FAMILIES: dict[str, Callable[[Any], ModelSpec]] = {"llm": _build_llm, "eve": _build_eve,
                                                    "clip_classifier": _build_clip_classifier,
                                                    "hovle": _build_hovle, "dan": _build_dan}


def build(model_cfg) -> ModelSpec:
    name = model_cfg.name
    if name not in FAMILIES:
        raise ValueError(f"config.model.name={name!r} is not known; use one of {sorted(FAMILIES)}")
    return FAMILIES[name](model_cfg)
