"""EVE weights: official `EVELlamaForCausalLM` checkpoints <-> evejax `EVE` params.

Official names (reference/eve.md §5; PyTorch layouts, Linear weight [out, in]):

    model.embed_tokens / model.layers.{i}.* / model.norm / lm_head     the LLaMA (port.tables)
    model.vision_tower.patch_embedding.weight [C, 3, p, p]            -> vision_tokenizer/patch_embedding
    model.vision_tower.{class,split}_embedding [C]
    model.vision_tower.{local,global}_attention.{q,kv}.0.*  LayerNorm -> .../{q,kv}/norm
    model.vision_tower.{local,global}_attention.{q,kv}.1.weight       -> .../{q,kv}/linear
    model.vision_tower.{local,global}_attention.proj.*
    model.mm_projector.{0,2}.*                                        -> mm_projector/{fc1,fc2}
    model.vision_tower_compressor.norm_layer.{j}.{0,1}.*              -> vision_compressor/{norm_*,tap_proj}[j]
    model.vision_tower_compressor.{input,output}_layer.*              (PAL, training only)
    model.vision_clip.backbone.vision_model.*                         -> clip (HF CLIPVisionModel names)

The official module also registers the teacher as `vision_tower_compressor.clip_layer`,
so a release may hold the CLIP weights twice (`...clip_layer.backbone.vision_model.*`).
Import accepts that copy when it equals the other one (either copy alone also
works); export writes the teacher once, under `model.vision_clip`, or under both
names with `both_teacher_copies` (`--both-teacher-copies`) so a strict
`load_state_dict` into the official module passes.

    to_flax(state_dict, cfg)  -> (params, notes)      numpy trees / dicts
    to_torch(params, cfg)     -> state_dict
    hf_config(cfg, names) / config_from_hf(config.json dict)
    import_eve(src, out_dir)  official directory, shard index or file -> evejax EVE checkpoint
    export_eve(ckpt, out_dir) evejax EVE checkpoint -> config.json + sharded safetensors
                              (+ OUT/teacher_clip when no official name builds the teacher)
    save_checkpoint / load_checkpoint / load_names
        CKPT/model.json (format "evejax.eve"; with the official processor and teacher
        names it was imported with) + CKPT/params (Orbax)

`inference=True` (import or export) drops the PAL and the CLIP teacher, as the
paper removes them at inference; the config then says requires_cliploss=false
and still carries the teacher view sizes that set the preprocessing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from evejax import atomic
from evejax.models import eve as eve_lib
from evejax.models import vit
from evejax.port import checkpoint as lm_checkpoint
from evejax.port import clip as clip_port
from evejax.port import io, tables
from evejax.port.command_line import export_parser, import_parser, run_command, weight_files
from evejax.port.io import CheckpointError
from evejax.port.tables import LINEAR, Row, Transform

CLIP_PREFIX = "model.vision_clip.backbone."
DUPLICATE_CLIP_PREFIX = "model.vision_tower_compressor.clip_layer.backbone."
PAL_PREFIX = "model.vision_tower_compressor."
MODEL_JSON, PARAMS_DIR = lm_checkpoint.MODEL_JSON, lm_checkpoint.PARAMS_DIR
FORMAT = "evejax.eve"
VERSION = 1
# config.json names of the PEL processor folder and of the CLIP teacher; model.json keeps
# the imported ones under NAMES_ENTRY so export writes them back.
NAME_KEYS = ("mm_vision_tower", "mm_vision_tower_clip")
NAMES_ENTRY = "official_names"

# Official teacher name <-> evejax CLIP size.
OFFICIAL_TEACHERS = {"openai/clip-vit-large-patch14-336": "L/14-336"}

CONV_OIHW_TO_HWIO = Transform(
    "conv_oihw_to_hwio",
    to_flax=lambda t, shapes: [t.transpose(2, 3, 1, 0)],
    to_torch=lambda arrays: arrays[0].transpose(3, 2, 0, 1),
    torch_shape=lambda shapes: (shapes[0][3], shapes[0][2], shapes[0][0], shapes[0][1]),
)


def _cross_attention_rows(name: str) -> list[Row]:
    torch_p, flax_p = f"model.vision_tower.{name}.", f"vision_tokenizer/{name}/"
    rows = []
    for part in ("q", "kv"):
        rows += [Row(f"{torch_p}{part}.0.weight", f"{flax_p}{part}/norm/scale"),
                 Row(f"{torch_p}{part}.0.bias", f"{flax_p}{part}/norm/bias"),
                 Row(f"{torch_p}{part}.1.weight", f"{flax_p}{part}/linear/kernel", LINEAR)]
    return rows + [Row(f"{torch_p}proj.weight", f"{flax_p}proj/kernel", LINEAR),
                   Row(f"{torch_p}proj.bias", f"{flax_p}proj/bias")]


def pel_rows() -> list[Row]:
    """VisionTokenizer + mm_projector."""
    return ([Row("model.vision_tower.patch_embedding.weight", "vision_tokenizer/patch_embedding/kernel",
                 CONV_OIHW_TO_HWIO),
             Row("model.vision_tower.class_embedding", "vision_tokenizer/class_embedding"),
             Row("model.vision_tower.split_embedding", "vision_tokenizer/split_embedding")]
            + _cross_attention_rows("local_attention") + _cross_attention_rows("global_attention")
            + [Row("model.mm_projector.0.weight", "mm_projector/fc1/kernel", LINEAR),
               Row("model.mm_projector.0.bias", "mm_projector/fc1/bias"),
               Row("model.mm_projector.2.weight", "mm_projector/fc2/kernel", LINEAR),
               Row("model.mm_projector.2.bias", "mm_projector/fc2/bias")])


def pal_rows() -> list[Row]:
    """VisionCompressor; the per-tap rows stack on the leading tap axis like layers."""
    p, f = PAL_PREFIX, "vision_compressor/"
    return [Row(p + "norm_layer.{i}.0.weight", f + "norm_scale"),
            Row(p + "norm_layer.{i}.0.bias", f + "norm_bias"),
            Row(p + "norm_layer.{i}.1.weight", f + "tap_proj", LINEAR),
            Row(p + "input_layer.weight", f + "input_layer/kernel", LINEAR),
            Row(p + "input_layer.bias", f + "input_layer/bias"),
            Row(p + "output_layer.weight", f + "output_layer/kernel", LINEAR),
            Row(p + "output_layer.bias", f + "output_layer/bias")]


def rows(cfg: eve_lib.EVEConfig) -> list[Row]:
    """Every row except the CLIP teacher's (`evejax.port.clip` maps those)."""
    return (tables.prefixed(tables.table(cfg.llm), "", "llm") + pel_rows()
            + (pal_rows() if cfg.with_pal else []))


def abstract_params(cfg: eve_lib.EVEConfig) -> dict:
    """EVE's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    from evejax.sharding import unbox

    args = eve_lib.init_inputs(cfg, abstract=True)
    return unbox(jax.eval_shape(lambda *a: eve_lib.EVE(cfg).init(jax.random.PRNGKey(0), *a), *args))["params"]


def official_shapes(cfg: eve_lib.EVEConfig) -> dict[str, tuple]:
    """Official name -> shape of every tensor `to_torch` writes for `cfg` (from shapes only)."""
    shapes = tables.expected_torch_shapes(rows(cfg), _without_clip(abstract_params(cfg)))
    if cfg.with_pal:
        shapes.update(clip_port.torch_shapes(cfg.clip, prefix=CLIP_PREFIX, vision_model=True))
    return shapes


def _without_clip(tree: Mapping) -> dict:
    return {k: v for k, v in tree.items() if k != "clip"}


def _clip_scoped(state: Mapping[str, Any], prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def to_flax(state: Mapping[str, Any], cfg: eve_lib.EVEConfig, source: str | None = None
            ) -> tuple[dict, list[str]]:
    """Official state dict -> (EVE params shaped like `abstract_params(cfg)`, notes for the user).

    With `cfg.clip=None` (inference) the PAL and teacher tensors are dropped.
    Otherwise the teacher comes from `model.vision_clip.*`, or from the
    `clip_layer` copy when only that one is there; when both are there they
    must be equal. Any other missing, unexpected or mis-shaped tensor raises
    one CheckpointError listing them all.
    """
    notes = []
    main = _clip_scoped(state, CLIP_PREFIX)
    duplicate = _clip_scoped(state, DUPLICATE_CLIP_PREFIX)
    rest = {k: v for k, v in state.items() if k not in main and k not in duplicate}
    if not cfg.with_pal:
        pal = [k for k in rest if k.startswith(PAL_PREFIX)]
        rest = {k: v for k, v in rest.items() if k not in pal}
        if pal or main or duplicate:
            notes.append(f"dropped the training-only PAL ({len(pal)} tensors) and CLIP teacher "
                         f"({len(main) + len(duplicate)} tensors)")
    abstract = abstract_params(cfg)
    params = tables.convert_to_flax(rows(cfg), rest, _without_clip(abstract), source)
    if cfg.with_pal:
        params["clip"] = _teacher_to_flax(main, duplicate, cfg, abstract["clip"], source, notes)
    return params, notes


def _teacher_to_flax(main, duplicate, cfg, abstract_clip, source, notes) -> dict:
    as_main = {CLIP_PREFIX + k[len(DUPLICATE_CLIP_PREFIX):]: v for k, v in duplicate.items()}
    if main and duplicate:
        differ = sorted(k for k in main.keys() | as_main.keys()
                        if k not in main or k not in as_main
                        or np.shape(main[k]) != np.shape(as_main[k])
                        or not np.array_equal(np.asarray(main[k]), np.asarray(as_main[k])))
        if differ:
            raise CheckpointError(
                f"{source or 'the state dict'}: the CLIP teacher is stored twice ({CLIP_PREFIX}* and "
                f"{DUPLICATE_CLIP_PREFIX}*) with different contents, first {differ[:5]}; official code "
                "shares one module, so the checkpoint is inconsistent")
        notes.append(f"the CLIP teacher copy under {DUPLICATE_CLIP_PREFIX}* equals {CLIP_PREFIX}*; "
                     "read it once")
    elif duplicate:
        notes.append(f"read the CLIP teacher from its {DUPLICATE_CLIP_PREFIX}* copy")
    teacher = main or as_main
    if not teacher:
        raise CheckpointError(f"{source or 'the state dict'}: no CLIP teacher ({CLIP_PREFIX}*); the training "
                              "model needs it; import with inference=True (--inference) to drop the PAL")
    params = clip_port.to_flax(teacher, cfg.clip, prefix=CLIP_PREFIX, vision_model=True)
    return jax.tree.map(lambda x, a: np.ascontiguousarray(x, dtype=a.dtype), params, abstract_clip)


def to_torch(params: Mapping, cfg: eve_lib.EVEConfig, both_teacher_copies: bool = False
             ) -> dict[str, np.ndarray]:
    """EVE params -> official state dict (numpy): the teacher once under model.vision_clip, and
    with `both_teacher_copies` again under the compressor's clip_layer, as the official module
    registers it, so a strict `load_state_dict` finds every name."""
    abstract = abstract_params(cfg)
    state = tables.convert_to_torch(rows(cfg), _without_clip(params), _without_clip(abstract))
    if cfg.with_pal:
        teacher = clip_port.to_torch(params["clip"], cfg.clip, prefix=CLIP_PREFIX, vision_model=True)
        state.update(teacher)
        if both_teacher_copies:
            state.update({DUPLICATE_CLIP_PREFIX + k[len(CLIP_PREFIX):]: v for k, v in teacher.items()})
    return state


def drop_training_parts(params: Mapping, cfg: eve_lib.EVEConfig) -> tuple[dict, eve_lib.EVEConfig]:
    """(params, cfg) of the inference model: no PAL, no teacher."""
    kept = {k: v for k, v in params.items() if k not in ("vision_compressor", "clip")}
    return kept, cfg.replace(with_pal=False)


# ---- config.json ----------------------------------------------------------------------

def hf_config(cfg: eve_lib.EVEConfig, dtype: str = "float32", names: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """config.json of the official EVELlamaForCausalLM (reference/eve.md §1.1) plus an
    "evejax" entry with the sizes official code reads from its processor folder.

    `names` ({"mm_vision_tower": ..., "mm_vision_tower_clip": ...}) are written as
    given; a name left out is made from the geometry (the processor folder name) or,
    for the teacher, is the official one of its size, else left out.
    """
    names = dict(names or {})
    config = tables.hf_config(cfg.llm, dtype)
    config.update(
        architectures=["EVELlamaForCausalLM"], model_type="eve",
        mm_hidden_size=cfg.vision_width, mm_projector_type="mlp2x_gelu",
        mm_vision_tower=names.get("mm_vision_tower")
        or f"openai/eve-patch{cfg.patch_size}-anypixel-{cfg.image_size}",
        mm_vision_select_layer=cfg.teacher_layer, mm_vision_select_feature="patch",
        requires_cliploss=cfg.with_pal, mm_use_im_start_end=False, mm_use_im_patch_token=False,
        image_aspect_ratio="square",
        evejax=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, pool=cfg.pool,
                    vision_heads=cfg.vision_heads, pal_interval=cfg.pal_interval, pal_heads=cfg.pal_heads,
                    teacher_image_size=cfg.teacher_image_size, teacher_patch_size=cfg.teacher_patch_size,
                    clip=clip_port.hf_config(cfg.clip) if cfg.with_pal else None))
    teacher = names.get("mm_vision_tower_clip") or (official_teacher_name(cfg.clip) if cfg.with_pal else None)
    if teacher:
        config["mm_vision_tower_clip"] = teacher
    return config


def official_teacher_name(clip: vit.ClipViTConfig) -> str | None:
    """The hub name of the official teacher with `clip`'s sizes, or None."""
    shape = clip_port.hf_config(clip)
    return next((name for name, size in OFFICIAL_TEACHERS.items()
                 if clip_port.hf_config(vit.get_clip_config(size)) == shape), None)


def teacher_from_name(name: str | None) -> vit.ClipViTConfig | None:
    """The CLIP config the official builder would load for `mm_vision_tower_clip`: an official
    hub name, or a CLIPVisionModel directory (config.json); None when neither."""
    if name in OFFICIAL_TEACHERS:
        return vit.get_clip_config(OFFICIAL_TEACHERS[name])
    if name and (Path(name) / io.CONFIG_NAME).is_file():
        return clip_port.from_hf_config(io.load_config_json(name))
    return None


def config_from_hf(config: Mapping[str, Any], with_pal: bool = True, **overrides) -> eve_lib.EVEConfig:
    """EVEConfig from an EVE config.json dict (official, or one `hf_config` wrote).

    Official configs carry no PEL geometry; it comes from the processor name
    (`openai/eve-patch14-anypixel-672`: patch 14, image 672) with the official
    pool 2 and 8 heads, and the teacher view sizes from the teacher
    `mm_vision_tower_clip` names (a known hub name or a CLIPVisionModel
    directory). `overrides` set TransformerConfig fields (dtype, ...).
    """
    if config.get("model_type") != "eve":
        raise CheckpointError(f"config.json has model_type {config.get('model_type')!r}, not 'eve'")
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type {config['mm_projector_type']!r} is not supported; "
                              "EVE-v1 uses mlp2x_gelu")
    llm_cfg = tables.config_from_hf({**config, "model_type": "llama"}, "llama")
    ours = config.get("evejax") or {}
    tower = str(config.get("mm_vision_tower", ""))
    found = re.search(r"patch(\d+)-anypixel-(\d+)", tower)
    patch, image = (int(found.group(1)), int(found.group(2))) if found else (None, None)
    name = config.get("mm_vision_tower_clip")
    teacher = clip_port.from_hf_config(ours["clip"]) if ours.get("clip") else teacher_from_name(name)
    view = (ours.get("teacher_image_size"), ours.get("teacher_patch_size"))
    if None in view and teacher is not None:
        view = (teacher.image_size, teacher.patch_size)
    if with_pal and teacher is None:
        raise CheckpointError(f"config.json: teacher {name!r} is not known (known: {sorted(OFFICIAL_TEACHERS)}, "
                              "or a CLIPVisionModel directory); import with --inference to drop it")
    if None in view:
        raise CheckpointError(f"config.json: cannot tell the teacher view sizes that set the preprocessing: "
                              f"teacher {name!r} is neither known nor a CLIPVisionModel directory; add "
                              '"evejax": {"teacher_image_size": T, "teacher_patch_size": P} to the config '
                              "(--config)")
    if ours.get("image_size", image) is None:
        raise CheckpointError(f"config.json: cannot tell the EVE image size from mm_vision_tower {tower!r}; "
                              "expected a name like openai/eve-patch14-anypixel-672")
    cfg = eve_lib.EVEConfig(
        llm=llm_cfg, clip=teacher if with_pal else None, image_size=int(ours.get("image_size", image)),
        patch_size=int(ours.get("patch_size", patch)), pool=int(ours.get("pool", 2)),
        vision_width=int(config.get("mm_hidden_size", 1024)), vision_heads=int(ours.get("vision_heads", 8)),
        pal_interval=int(ours.get("pal_interval", 4)), pal_heads=int(ours.get("pal_heads", 8)),
        teacher_layer=int(config.get("mm_vision_select_layer", -2)),
        teacher_image_size=int(view[0]), teacher_patch_size=int(view[1]))
    try:
        return (cfg.replace(**overrides) if overrides else cfg).validate()
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def official_names(config: Mapping[str, Any]) -> dict[str, str]:
    """The processor and teacher names an EVE config.json gives, to write back on export."""
    return {k: config[k] for k in NAME_KEYS if isinstance(config.get(k), str)}


# ---- evejax EVE checkpoints -----------------------------------------------------------

def config_to_json(cfg: eve_lib.EVEConfig) -> dict[str, Any]:
    own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("llm", "clip")}
    clip = None
    if cfg.with_pal:
        clip = {**{k: v for k, v in dataclasses.asdict(cfg.clip).items() if k != "transformer"},
                "transformer": dataclasses.asdict(cfg.clip.transformer)}
    return {"format": FORMAT, "version": VERSION, **own, "llm": lm_checkpoint.config_to_json(cfg.llm),
            "clip": clip}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> eve_lib.EVEConfig:
    data = lm_checkpoint.unwrap_format(data, FORMAT, VERSION, "EVE", source)
    llm_cfg = lm_checkpoint.config_from_json(data.pop("llm", {}), source)
    clip = data.pop("clip", None)
    data.pop(NAMES_ENTRY, None)
    try:
        if clip is not None:
            clip = vit.ClipViTConfig(**{**clip, "transformer": vit.TransformerConfig(**clip["transformer"])})
        return eve_lib.EVEConfig(llm=llm_cfg, clip=clip, **data).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: eve_lib.EVEConfig, params: Any,
                    overwrite: bool = False, names: Mapping[str, str] | None = None) -> Path:
    """Writes model.json (with the official `names` it was imported with, if any) and
    params/ (Orbax) into `directory`; returns it."""
    return lm_checkpoint.write_checkpoint(directory, {**config_to_json(cfg), NAMES_ENTRY: dict(names or {})},
                                          params, overwrite)


def _read_model_json(directory: str | os.PathLike) -> tuple[dict, str]:
    return lm_checkpoint.read_model_json(directory, "EVE checkpoint", "create one with `evejax import --family eve`")


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[eve_lib.EVEConfig, Any]:
    """(eve_lib.EVEConfig, params) of an evejax EVE checkpoint; params on one device unless
    `shardings`."""
    cfg = config_from_json(*_read_model_json(directory))
    return cfg, lm_checkpoint.restore_params(directory, abstract_params(cfg), shardings)


def load_names(directory: str | os.PathLike) -> dict[str, str]:
    """The official names (NAME_KEYS) an EVE checkpoint was imported with; {} if none."""
    return dict(_read_model_json(directory)[0].get(NAMES_ENTRY) or {})


# ---- files ----------------------------------------------------------------------------

def _has_pal(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(PAL_PREFIX) and not k.startswith(DUPLICATE_CLIP_PREFIX) for k in state)


def import_eve(src: str | os.PathLike, out_dir: str | os.PathLike, *, config: str | os.PathLike | None = None,
               inference: bool = False, param_dtype: str = "float32", overwrite: bool = False) -> list[str]:
    """Official EVE release (directory with config.json and .bin or safetensors weights, a
    shard index or one weight file) -> evejax EVE checkpoint in `out_dir`; returns notes.

    The training model (PAL + teacher) is built when the weights hold a PAL
    and `inference` is False. Everything is checked before anything is written.
    """
    src = Path(src)
    config_path = Path(config) if config else (src if src.is_dir() else src.parent) / io.CONFIG_NAME
    hf = io.load_config_json(config_path)
    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True (--overwrite) "
                              "to replace it")
    state = io.load_state_dict(src)
    with_pal = _has_pal(state) and not inference
    cfg = config_from_hf(hf, with_pal=with_pal, param_dtype=param_dtype)
    params, notes = to_flax(state, cfg, source=str(src))
    del state
    save_checkpoint(out_dir, cfg, params, overwrite=overwrite, names=official_names(hf))
    return notes + [f"wrote an EVE {'training' if with_pal else 'inference'} checkpoint to {out_dir}"]


# The exported teacher's directory when no official name builds it; its absolute path becomes
# mm_vision_tower_clip (the official builder takes an existing path as well as a hub name).
TEACHER_DIR = "teacher_clip"
_PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _official_builds(name: str | None, clip: vit.ClipViTConfig) -> bool:
    """Whether the official builder, given `name`, makes a CLIP of `clip`'s sizes."""
    built = teacher_from_name(name)
    return built is not None and clip_port.hf_config(built) == clip_port.hf_config(clip) and (
        name in OFFICIAL_TEACHERS or (Path(name) / _PREPROCESSOR_CONFIG).is_file())


def teacher_processor_config(clip: vit.ClipViTConfig) -> dict[str, Any]:
    """preprocessor_config.json of a CLIPImageProcessor for `clip` (CLIPVisionTower loads one
    from the teacher's name next to the model), with the hub CLIP checkpoints' settings."""
    from evejax.data.image import CLIP_MEAN, CLIP_STD

    side = clip.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}


def load_source(src: str | os.PathLike) -> tuple[eve_lib.EVEConfig, Any, dict[str, str]]:
    """(config, params, official names) of an evejax EVE checkpoint or of a training workdir
    that trains EVE (its newest checkpoint; a workdir keeps no official names)."""
    if lm_checkpoint.is_workdir(src):
        _, cfg, params, _ = lm_checkpoint.load_workdir(src, model_name="eve")
        return cfg, params, {}
    cfg, params = load_checkpoint(src)
    return cfg, params, load_names(src)


def export_eve(src: str | os.PathLike, out_dir: str | os.PathLike, *, inference: bool = False,
               dtype: str = "float32", max_shard_bytes: int = 5 * 10**9,
               both_teacher_copies: bool = False) -> list[Path]:
    """evejax EVE checkpoint or training workdir -> out_dir/config.json + safetensors
    (sharded, with an index); see `export_params`."""
    cfg, params, names = load_source(src)
    return export_params(cfg, params, out_dir, names=names, inference=inference, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, both_teacher_copies=both_teacher_copies)


def export_params(cfg: eve_lib.EVEConfig, params: Any, out_dir: str | os.PathLike, *,
                  names: Mapping[str, str] | None = None, inference: bool = False, dtype: str = "float32",
                  max_shard_bytes: int = 5 * 10**9, both_teacher_copies: bool = False) -> list[Path]:
    """EVE parameters -> out_dir/config.json + safetensors (sharded, with an index).

    The official `names` (those the checkpoint was imported with) are written back. A training
    export whose teacher no official name builds (not a known hub CLIP of its
    size, nor an existing CLIPVisionModel directory) also gets the teacher as
    out_dir/teacher_clip (config.json, model.safetensors, preprocessor_config.json),
    and mm_vision_tower_clip is that directory's absolute path. The official
    builder takes any path holding "eva" for an EVA-CLIP, so such an out_dir is
    refused before anything is written. `both_teacher_copies` also writes the
    teacher under the compressor's clip_layer (see `to_torch`).
    """
    names = dict(names or {})
    if inference and cfg.with_pal:
        params, cfg = drop_training_parts(params, cfg)
    teacher_dir = None
    if cfg.with_pal and not _official_builds(names.get("mm_vision_tower_clip"), cfg.clip):
        names["mm_vision_tower_clip"] = official_teacher_name(cfg.clip)
        if names["mm_vision_tower_clip"] is None:
            teacher_dir = (Path(out_dir) / TEACHER_DIR).absolute()
            if "eva" in str(teacher_dir).lower():
                raise CheckpointError(
                    f"{teacher_dir}: the teacher would be written here, but the official builder loads any "
                    "teacher path holding 'eva' as an EVA-CLIP, not a CLIPVisionModel; export to a directory "
                    "whose path has no 'eva' in it")
            names["mm_vision_tower_clip"] = str(teacher_dir)
    config = hf_config(cfg, dtype, names)
    params = jax.tree.map(np.asarray, params)
    state = to_torch(params, cfg, both_teacher_copies=both_teacher_copies)
    files = []
    if teacher_dir is not None:
        # The teacher first: the EVE config.json that names it is the last file written.
        files += io.save_hf_checkpoint(clip_port.to_torch(params["clip"], cfg.clip),
                                       {**clip_port.hf_config(cfg.clip), "torch_dtype": dtype}, teacher_dir,
                                       family="clip", dtype=dtype, max_shard_bytes=max_shard_bytes)
        files.append(_write_json(teacher_processor_config(cfg.clip), teacher_dir / _PREPROCESSOR_CONFIG))
    return files + io.save_hf_checkpoint(state, config, out_dir, family="eve", dtype=dtype,
                                         max_shard_bytes=max_shard_bytes)


def _write_json(data: Mapping[str, Any], path: Path) -> Path:
    return atomic.write_text(path, json.dumps(dict(data), indent=2, sort_keys=True) + "\n")


def _import_parser() -> argparse.ArgumentParser:
    p = import_parser("eve", "official EVE weights -> evejax EVE checkpoint",
                      "EVE model directory, shard index (*.index.json) or weight file")
    p.add_argument("--inference", action="store_true", help="drop the PAL and the CLIP teacher")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = export_parser("EVE", "evejax EVE checkpoint -> official EVELlamaForCausalLM layout",
                      "evejax EVE checkpoint directory, or a training workdir of an EVE model (its newest checkpoint)")
    p.add_argument("--inference", action="store_true", help="leave out the PAL and the CLIP teacher")
    p.add_argument("--both-teacher-copies", action="store_true",
                   help="also write the teacher under model.vision_tower_compressor.clip_layer, as the official "
                        "module registers it, so load_state_dict(strict=True) passes")
    return p


def import_main(argv) -> int:
    """`evejax import --family eve SRC OUT_DIR [--config C] [--inference] [--param-dtype D] [--overwrite]`."""
    args = _import_parser().parse_args(argv)

    def body():
        for note in import_eve(args.src, args.out_dir, config=args.config, inference=args.inference,
                               param_dtype=args.param_dtype, overwrite=args.overwrite):
            print(f"evejax import: {note}")

    return run_command("import", body)


def export_main(argv) -> int:
    """`evejax export EVE_CKPT OUT_DIR [--inference] [--both-teacher-copies] [--dtype D]
    [--max-shard-size 5GB]`."""
    args = _export_parser().parse_args(argv)

    def body():
        files = export_eve(args.src, args.out_dir, inference=args.inference, dtype=args.dtype,
                           max_shard_bytes=args.max_shard_size, both_teacher_copies=args.both_teacher_copies)
        out = Path(args.out_dir).absolute()
        print(f"evejax export: EVE {'inference model' if args.inference else 'model with PAL and teacher'} "
              f"in {weight_files(files, out)} safetensors file(s) -> {args.out_dir}")
        if any(f.parent.absolute() == out / TEACHER_DIR for f in files):
            print(f"evejax export: no official name builds the teacher; wrote it to {out / TEACHER_DIR}, "
                  "which mm_vision_tower_clip names (move it and that path must follow)")

    return run_command("export", body)
