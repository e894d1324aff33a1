"""HoVLE weights: official `InternVLChatModel` (HolisticEmbedding + InternLM2) <-> evejax `HoVLE` params.

Official names (reference/hovle.md §4.3, §6.1; PyTorch layouts, Linear weight [out, in]):

    embedding_model.vision_embeddings.{class_embedding, position_embedding}   copied
    embedding_model.vision_embeddings.patch_embedding.{weight [D, 3, p, p], bias}
    embedding_model.llm_text_embeddings.weight [V_e, D]
    embedding_model.encoder.{i}.*      InternLM2 layers: fused wqkv grouped by KV head (port.tables)
    embedding_model.pixel_shuffle_proj.{0,2}.{weight, bias}  -> pixel_shuffle_proj/{fc1, fc2}
    language_model.*                   the InternLM2ForCausalLM table of port.tables

One table (`rows`) drives both directions. config.json is the official InternVLChatConfig:
`embedding_config` (model_type holistic_embedding), `llm_config` (InternLM2) and the top-level
fields (max_dynamic_patch is max_tiles). Weights are float32 safetensors shards with an index.

    to_flax(state_dict, cfg) / to_torch(params, cfg)      numpy
    hf_config(cfg) / config_from_hf(config.json dict)
    import_hovle(src, out_dir)  official directory, shard index or file -> evejax HoVLE checkpoint
    export_hovle(ckpt, out_dir) evejax HoVLE checkpoint -> config.json + safetensors (+ tokenizer)
    save_checkpoint / load_checkpoint / load_tokenizer_files
        CKPT/model.json (format "evejax.hovle"; with the official tokenizer files, base64, when
        the imported directory had them) + CKPT/params (Orbax)

The official directory's tokenizer files (TOKENIZER_FILES) are carried through import and
export byte for byte. They live in model.json, so a checkpoint stays the two entries that
`port.checkpoint.write_checkpoint` writes. Export's config.json names the official remote
code (auto_map); copy its .py files next to the weights to load them with trust_remote_code=True.
"""
from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from evejax.models import hovle as hovle_lib
from evejax.port import checkpoint as lm_checkpoint
from evejax.port import io, tables
from evejax.port.command_line import export_command, export_parser, import_command, import_parser
from evejax.port.eve import CONV_OIHW_TO_HWIO
from evejax.port.io import CheckpointError
from evejax.port.tables import LINEAR, Row

FORMAT = "evejax.hovle"
VERSION = 1
MODEL_JSON, PARAMS_DIR = lm_checkpoint.MODEL_JSON, lm_checkpoint.PARAMS_DIR
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenization_internlm2.py", "tokenization_internlm2_fast.py")
TOKENIZER_ENTRY = "tokenizer_files"
AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}


def rows(cfg: hovle_lib.HoVLEConfig) -> list[Row]:
    e, v = "embedding_model.", "embedding_model/vision_embeddings/"
    return ([Row(e + "vision_embeddings.class_embedding", v + "class_embedding"),
             Row(e + "vision_embeddings.position_embedding", v + "position_embedding"),
             Row(e + "vision_embeddings.patch_embedding.weight", v + "patch_embedding/kernel", CONV_OIHW_TO_HWIO),
             Row(e + "vision_embeddings.patch_embedding.bias", v + "patch_embedding/bias"),
             Row(e + "llm_text_embeddings.weight", "embedding_model/llm_text_embeddings/embedding")]
            + tables.prefixed(tables.internlm2_layer_rows(cfg.embedding.transformer.qkv_bias),
                              e + "encoder.{i}.", "embedding_model/encoder/layers")
            + [Row(e + f"pixel_shuffle_proj.{i}.{leaf}", f"embedding_model/pixel_shuffle_proj/{fc}/{flax}",
                   LINEAR if leaf == "weight" else tables.IDENTITY)
               for i, fc in ((0, "fc1"), (2, "fc2")) for leaf, flax in (("weight", "kernel"), ("bias", "bias"))]
            + tables.prefixed(tables.table(cfg.llm), "language_model.", "language_model"))


def official_shapes(cfg: hovle_lib.HoVLEConfig) -> dict[str, tuple]:
    """Official name -> shape of every tensor, in state-dict order (from shapes only)."""
    return tables.expected_torch_shapes(rows(cfg), hovle_lib.abstract_params(cfg))


def to_flax(state: Mapping[str, Any], cfg: hovle_lib.HoVLEConfig, source: str | None = None) -> dict:
    """Official state dict -> HoVLE params; every missing, unexpected or mis-shaped tensor is
    listed in one CheckpointError first."""
    return tables.convert_to_flax(rows(cfg), state, hovle_lib.abstract_params(cfg), source)


def to_torch(params: Mapping, cfg: hovle_lib.HoVLEConfig) -> dict[str, np.ndarray]:
    return tables.convert_to_torch(rows(cfg), params, hovle_lib.abstract_params(cfg))


# ---- config.json ----------------------------------------------------------------------

def hf_config(cfg: hovle_lib.HoVLEConfig, dtype: str = "float32") -> dict[str, Any]:
    """The official InternVLChatConfig dict for `cfg` (hovle.md §4.2, §6.6)."""
    from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig

    e = cfg.embedding.transformer
    layers = tables.hf_config(cfg.embedding, dtype)  # refuses stacks with no official form
    embedding = HolisticEmbeddingConfig(
        num_hidden_layers=e.num_layers, hidden_size=e.embed_dim, num_attention_heads=e.num_heads,
        num_key_value_heads=e.num_kv_heads, intermediate_size=e.mlp_dim, hidden_act=layers["hidden_act"],
        rms_norm_eps=e.norm_eps, attention_bias=e.qkv_bias, max_position_embeddings=e.max_position_embeddings,
        rope_theta=e.rope_base, rope_scaling=layers["rope_scaling"], patch_size=cfg.patch_size,
        image_size=cfg.image_size, llm_vocab_size=cfg.embedding.vocab_size, llm_hidden_size=e.embed_dim,
        downsample_ratio=cfg.downsample_ratio, img_context_token_id=cfg.img_context_token_id,
        pixel_shuffle_loc=cfg.pixel_shuffle_loc)
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "auto_map": AUTO_MAP,
            "embedding_config": {**embedding.to_hf_config_dict(), "attn_implementation": "eager"},
            "llm_config": tables.hf_config(cfg.llm, dtype), "downsample_ratio": cfg.downsample_ratio,
            "force_image_size": cfg.image_size, "normalize_encoder_output": cfg.normalize_encoder_output,
            "template": "internlm2-chat", "dynamic_image_size": True, "use_thumbnail": True,
            "min_dynamic_patch": 1, "max_dynamic_patch": cfg.max_tiles, "ps_version": "v2",
            "select_layer": -1, "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0,
            "torch_dtype": dtype}


def config_from_hf(config: Mapping[str, Any], **overrides) -> hovle_lib.HoVLEConfig:
    """HoVLEConfig from an official InternVLChatConfig dict (or one `hf_config` wrote); missing
    embedding fields take the official class defaults. `overrides` go to HoVLEConfig.replace."""
    from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig

    model_type = config.get("model_type")
    if model_type != "internvl_chat":
        raise CheckpointError(f"config.json has model_type {model_type!r}, not HoVLE's 'internvl_chat'"
                              + (f"; import it with --family {model_type}" if model_type else ""))
    raw = config.get("embedding_config")
    if not isinstance(raw, Mapping) or raw.get("model_type", "holistic_embedding") != "holistic_embedding":
        raise CheckpointError("config.json has no embedding_config of model_type 'holistic_embedding': an "
                              "InternVL model with a vision encoder, not HoVLE")
    e = HolisticEmbeddingConfig.from_hf_config_dict(raw)
    problems = [what for what, bad in (
        (f"embedding_config.pixel_shuffle_loc {e.pixel_shuffle_loc!r} is not known; HoVLE has "
         f"{hovle_lib.PIXEL_SHUFFLE_LOCS} ('pre' HoVLE, 'post' HoVLE-HD)",
         e.pixel_shuffle_loc not in hovle_lib.PIXEL_SHUFFLE_LOCS),
        ("embedding_config.use_pixel_shuffle_proj must be true (official code fails without it)",
         raw.get("use_pixel_shuffle_proj") is not True),
        ("embedding_config.special_token_maps must be empty (special_text_embeddings are not supported)",
         bool(e.special_token_maps)),
        ("embedding_config.use_ls must be false (official code asserts it)", bool(e.use_ls)),
        (f"downsample_ratio {config.get('downsample_ratio')} differs from embedding_config's "
         f"{e.downsample_ratio}", float(config.get("downsample_ratio", 0.5)) != float(e.downsample_ratio)),
        (f"force_image_size {config.get('force_image_size')} differs from embedding_config.image_size "
         f"{e.image_size}", config.get("force_image_size") not in (None, e.image_size)),
        (f"embedding_config.llm_hidden_size {e.llm_hidden_size} differs from its hidden_size {e.hidden_size}",
         e.llm_hidden_size != e.hidden_size),
    ) if bad]
    if problems:
        raise CheckpointError("config.json: " + "; ".join(problems))
    if not isinstance(config.get("llm_config"), Mapping):
        raise CheckpointError("config.json has no llm_config")
    llm = tables.config_from_hf(config["llm_config"], "internlm2")
    layers = {**dataclasses.asdict(e.layer_config()), "model_type": "internlm2"}
    embedding = tables.config_from_hf(layers, "internlm2")
    try:
        cfg = hovle_lib.HoVLEConfig(
            llm=llm, embedding=embedding, image_size=e.image_size, patch_size=e.patch_size,
            downsample_ratio=float(e.downsample_ratio), pixel_shuffle_loc=e.pixel_shuffle_loc,
            normalize_encoder_output=bool(config.get("normalize_encoder_output", False)),
            img_context_token_id=e.img_context_token_id, max_tiles=int(config.get("max_dynamic_patch", 6)))
        return (cfg.replace(**overrides) if overrides else cfg).validate()
    except ValueError as err:
        raise CheckpointError(f"config.json: {err}") from None


# ---- evejax HoVLE checkpoints ---------------------------------------------------------

def config_to_json(cfg: hovle_lib.HoVLEConfig) -> dict[str, Any]:
    own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("llm", "embedding")}
    return {"format": FORMAT, "version": VERSION, **own, "llm": lm_checkpoint.config_to_json(cfg.llm),
            "embedding": lm_checkpoint.config_to_json(cfg.embedding)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> hovle_lib.HoVLEConfig:
    data = lm_checkpoint.unwrap_format({k: v for k, v in data.items() if k != TOKENIZER_ENTRY}, FORMAT, VERSION,
                                        "HoVLE", source)
    llm = lm_checkpoint.config_from_json(data.pop("llm", {}), source)
    embedding = lm_checkpoint.config_from_json(data.pop("embedding", {}), source)
    try:
        return hovle_lib.HoVLEConfig(llm=llm, embedding=embedding, **data).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: hovle_lib.HoVLEConfig, params: Any,
                    overwrite: bool = False, tokenizer_files: Mapping[str, bytes] | None = None) -> Path:
    files = {name: base64.b64encode(data).decode("ascii") for name, data in (tokenizer_files or {}).items()}
    return lm_checkpoint.write_checkpoint(directory, {**config_to_json(cfg), TOKENIZER_ENTRY: files}, params,
                                          overwrite)


def _read_model_json(directory: str | os.PathLike) -> tuple[dict, str]:
    return lm_checkpoint.read_model_json(directory, "HoVLE checkpoint",
                                         "create one with `evejax import --family hovle`")


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[hovle_lib.HoVLEConfig, Any]:
    """(HoVLEConfig, params) of an evejax HoVLE checkpoint; params on one device unless `shardings`."""
    cfg = config_from_json(*_read_model_json(directory))
    return cfg, lm_checkpoint.restore_params(directory, hovle_lib.abstract_params(cfg), shardings)


def load_tokenizer_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """The official tokenizer files a HoVLE checkpoint carries (name -> bytes); {} if none."""
    files = _read_model_json(directory)[0].get(TOKENIZER_ENTRY) or {}
    return {name: base64.b64decode(text) for name, text in files.items()}


def _write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# ---- files ----------------------------------------------------------------------------

def import_hovle(src: str | os.PathLike, out_dir: str | os.PathLike, *, config: str | os.PathLike | None = None,
                 param_dtype: str = "float32", overwrite: bool = False) -> list[str]:
    """Official HoVLE directory (config.json + safetensors shards or .bin; a shard index or one
    weight file) -> evejax HoVLE checkpoint in `out_dir`; returns notes. The config, the out_dir
    and every tensor are checked before anything is written."""
    src = Path(src)
    src_dir = src if src.is_dir() else src.parent
    cfg = config_from_hf(io.load_config_json(Path(config) if config else src_dir / io.CONFIG_NAME),
                         param_dtype=param_dtype)
    if (Path(out_dir) / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True (--overwrite) to replace it")
    state = io.load_state_dict(src)
    params = to_flax(state, cfg, source=str(src))
    del state
    tokenizer = {name: (src_dir / name).read_bytes() for name in TOKENIZER_FILES if (src_dir / name).is_file()}
    save_checkpoint(out_dir, cfg, params, overwrite=overwrite, tokenizer_files=tokenizer)
    return [f"wrote a HoVLE ({cfg.pixel_shuffle_loc}) checkpoint to {out_dir}"
            + (f" with {len(tokenizer)} tokenizer file(s)" if tokenizer else "")]


def export_hovle(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """evejax HoVLE checkpoint, or training workdir of a HoVLE stage (its newest checkpoint, without the
    training-only teacher) -> out_dir/config.json + safetensors (sharded with an index) and the
    tokenizer files a checkpoint carries (a workdir carries none); returns the files written."""
    if lm_checkpoint.is_workdir(src):
        _, cfg, params, _ = lm_checkpoint.load_workdir(src, model_name="hovle")
        tokenizer = {}
    else:
        (cfg, params), tokenizer = load_checkpoint(src), load_tokenizer_files(src)
    config = hf_config(cfg, dtype)  # refuses configs with no official form before writing
    state = to_torch(jax.tree.map(np.asarray, params), cfg)
    del params
    files = [_write_file(Path(out_dir) / name, data) for name, data in tokenizer.items()]
    return files + io.save_hf_checkpoint(state, config, out_dir, family="hovle", dtype=dtype,
                                         max_shard_bytes=max_shard_bytes)


def import_main(argv) -> int:
    """`evejax import --family hovle SRC OUT_DIR [--config C] [--param-dtype D] [--overwrite]`."""
    return import_command(argv, import_parser("hovle", "official HoVLE / HoVLE-HD weights -> evejax HoVLE checkpoint",
                                              "HoVLE model directory, shard index (*.index.json) or weight file"),
                          import_hovle)


def export_main(argv) -> int:
    """`evejax export HOVLE_CKPT OUT_DIR [--dtype D] [--max-shard-size 5GB]`."""
    return export_command(
        argv, export_parser("HoVLE", "evejax HoVLE checkpoint -> official InternVLChatModel layout",
                            "evejax HoVLE checkpoint directory, or training workdir of a HoVLE stage",
                            out_help="directory for config.json, safetensors and tokenizer files"),
        export_hovle, "HoVLE", "; copy the official configuration_*.py / modeling_*.py files next to them to load "
                               "with trust_remote_code=True")
