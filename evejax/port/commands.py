"""`evejax import` and `evejax export`: official PyTorch weights <-> evejax checkpoints.

    evejax import --family llama|internlm2 SRC OUT_DIR [--config config.json | --size NAME]
                  [--param-dtype float32|bfloat16] [--vocab-size N] [--overwrite]
        SRC: a HF model directory (config.json + model.safetensors, a shard index
        or pytorch_model.bin), a shard index, or one weight file. The config comes
        from --config, else SRC's config.json (or the one next to a weight file),
        else the evejax size --size (`llama_tiny`, `vicuna_7b`, ...).
        Writes OUT_DIR/model.json + OUT_DIR/params (Orbax).

    evejax export CKPT_DIR OUT_DIR [--dtype float32|bfloat16] [--max-shard-size 5GB]
        CKPT_DIR: a checkpoint of `evejax import`, or a training workdir (its newest
        checkpoint; an EVE workdir goes to EVE's converter, with its --inference).
        Writes OUT_DIR/config.json + model.safetensors (or model-0000k-of-0000n
        shards and model.safetensors.index.json) in the official layout:
        loadable by transformers.LlamaForCausalLM.from_pretrained (llama) or the
        official InternLM2 remote code (internlm2; copy its .py files next to them).

    evejax import --family eve SRC OUT_DIR [--inference] ...   and   evejax export EVE_CKPT OUT_DIR
        EVE (vision parts, PAL, CLIP teacher) has its own converter: see evejax.port.eve.

    evejax import --family clip SRC OUT_DIR ...   and   evejax export CLIP_CKPT OUT_DIR
        The HF CLIP vision tower (EVE's teacher) alone: see evejax.port.clip.

    evejax import --family dan SRC.pth OUT_DIR --size NAME [--ema]   and   evejax export DAN_CKPT OUT.pth
        De-focus Mamba's official classification .pth ('model' / 'model_ema'): see evejax.port.dan.

Every check happens before anything is written; errors a user can cause print
one message and exit with status 1.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from evejax.port import io
from evejax.port.command_line import parse_size, run_command
from evejax.port.io import CheckpointError

# Families with their own converter module (its import_main / export_main and its
# checkpoint FORMAT): `import --family F` goes to it, and so does `export` of a
# checkpoint in its format. The modules sit below this one and never import it.
FAMILY_CONVERTERS = {"eve": "evejax.port.eve", "clip": "evejax.port.clip", "hovle": "evejax.port.hovle",
                     "internvit": "evejax.port.internvit", "dan": "evejax.port.dan"}


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evejax import", description="official PyTorch weights -> evejax checkpoint")
    p.add_argument("--family", required=True, choices=("llama", "internlm2"))
    p.add_argument("src", help="HF model directory, shard index (*.index.json) or weight file")
    p.add_argument("out_dir", help="evejax checkpoint directory to create")
    p.add_argument("--config", help="HF config.json to use instead of the one found with SRC")
    p.add_argument("--size", help="evejax LM size to use when SRC has no config.json")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the parameters are stored in")
    p.add_argument("--vocab-size", type=int,
                   help="grow the vocabulary to this many rows, new rows of the embedding and the LM head "
                        "set to the mean of the others (e.g. 92553 for HoVLE's and InternVL2's InternLM2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT_DIR")
    return p


def _source_config(args):
    from evejax.models import llm
    from evejax.port.tables import config_from_hf

    src = Path(args.src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    candidates = [Path(args.config)] if args.config else [(src if src.is_dir() else src.parent) / io.CONFIG_NAME]
    for path in candidates:
        if path.is_file() or args.config:
            return config_from_hf(io.load_config_json(path), args.family)
    if args.size:
        try:
            cfg = llm.get_config(args.size)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if cfg.family != args.family:
            raise CheckpointError(f"--size {args.size} is a {cfg.family} model, not {args.family}")
        return cfg
    raise CheckpointError(f"{src}: no config.json found; pass --config PATH or --size NAME")


def import_main(argv) -> int:
    status = _family_hook("import", argv)
    if status is not None:
        return status
    args = _import_parser().parse_args(argv)
    return run_command("import", lambda: _import(args))


def _import(args) -> None:
    from evejax.port.checkpoint import PARAMS_DIR, save_checkpoint
    from evejax.port.tables import grow_vocab, to_flax

    cfg = _source_config(args).replace(param_dtype=args.param_dtype)
    if (Path(args.out_dir) / PARAMS_DIR).exists() and not args.overwrite:
        raise CheckpointError(f"{args.out_dir} already holds a checkpoint; pass --overwrite to replace it")
    state = io.load_state_dict(args.src)
    params = to_flax(state, cfg, source=args.src)
    del state
    if args.vocab_size:
        params, cfg = grow_vocab(params, cfg, args.vocab_size)
    save_checkpoint(args.out_dir, cfg, params, overwrite=args.overwrite)
    print(f"evejax import: {args.family} checkpoint with {cfg.transformer.num_layers} layers -> {args.out_dir}")


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evejax export", description="evejax checkpoint -> official PyTorch layout",
        epilog=f"A checkpoint or workdir of the families {', '.join(sorted(FAMILY_CONVERTERS))} goes to its "
               "family's converter, which has options of its own (EVE: --inference, --both-teacher-copies): "
               "`evejax export SRC OUT --help` lists them.")
    p.add_argument("src", help="evejax checkpoint directory (written by `evejax import`) or training "
                   "workdir (its newest checkpoint)")
    p.add_argument("out_dir", help="directory for config.json and safetensors files")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the written tensors")
    p.add_argument("--max-shard-size", default="5GB", type=parse_size,
                   help="largest safetensors file, e.g. 5GB, 500MB; bigger models are sharded")
    return p


def export_main(argv) -> int:
    status = _family_hook("export", argv)
    if status is not None:
        return status
    args = _export_parser().parse_args(argv)
    return run_command("export", lambda: _export(args))


def _export(args) -> None:
    import jax
    import numpy as np

    from evejax.port import checkpoint, tables

    if checkpoint.is_workdir(args.src):
        name, cfg, params, step = checkpoint.load_workdir(args.src)
        print(f"evejax export: {args.src}: the {name} model of its newest checkpoint (step {step})")
    else:
        name, (cfg, params) = "llm", checkpoint.load_checkpoint(args.src)
    if name != "llm":
        raise CheckpointError(f"{args.src} trained a {name!r} model; export writes the llm models here "
                              f"and the families {sorted(FAMILY_CONVERTERS)} through their converters")
    # hf_config refuses configs with no official form before anything is written.
    family, to_torch, config = cfg.family, tables.to_torch, tables.hf_config(cfg, args.dtype)
    state = to_torch(jax.tree.map(np.asarray, params), cfg)
    del params
    files = io.save_hf_checkpoint(state, config, args.out_dir, family=family, dtype=args.dtype,
                                  max_shard_bytes=args.max_shard_size)
    shards = [f for f in files if f.suffix == ".safetensors"]
    print(f"evejax export: {len(state)} tensors in {len(shards)} safetensors file(s) -> {args.out_dir}")
    if family == "internlm2":
        print("evejax export: config.json points at the official remote code; copy "
              "configuration_internlm2.py and modeling_internlm2.py into the directory to load it "
              "with trust_remote_code=True")


# ---- other families ----------------------------------------------------------------------

def _family_hook(command: str, argv) -> int | None:
    """Hands `import --family eve|clip` and `export` of an EVE or CLIP checkpoint (or of a
    workdir training that family) to the family's converter (FAMILY_CONVERTERS); returns its exit status, or None for an LM command."""
    from evejax.port.checkpoint import has_format, is_workdir, workdir_model

    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--family")
    probe.add_argument("paths", nargs="*")
    args, _ = probe.parse_known_args(argv)
    for family, module_name in FAMILY_CONVERTERS.items():
        if command == "import" and args.family == family:
            return importlib.import_module(module_name).import_main(argv)
        if command == "export" and args.paths:
            module = importlib.import_module(module_name)
            src = args.paths[0]
            if has_format(src, module.FORMAT) or (is_workdir(src) and workdir_model(src) == family):
                return module.export_main(argv)
    return None
