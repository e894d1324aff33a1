"""An evejax LM checkpoint directory: what `evejax import` writes and `evejax export` reads.

    CKPT_DIR/model.json   the LMConfig: family, vocab_size, token ids, transformer fields
    CKPT_DIR/params/      the CausalLM parameter tree, saved with Orbax

`load_checkpoint(dir) -> (cfg, params)` is all a reader needs; params come back
as jax arrays, on one device unless `shardings` (a tree like the params) says
otherwise, so a checkpoint can be restored straight onto a mesh.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax

from evejax.models.llm import LMConfig
from evejax.nn.transformer import TransformerConfig
from evejax.port.io import CheckpointError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
FORMAT = "evejax.lm"
VERSION = 1


def config_to_json(cfg: LMConfig) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(cfg)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> LMConfig:
    data = dict(data)
    if data.pop("format", None) != FORMAT or data.pop("version", None) != VERSION:
        raise CheckpointError(f"{source}: not an evejax LM config (expected format {FORMAT!r} version {VERSION})")
    t = dict(data.pop("transformer", {}))
    if t.get("rope_scaling") is not None:
        # JSON turns the hashable (key, value) pairs into lists.
        t["rope_scaling"] = tuple(tuple(pair) for pair in t["rope_scaling"])
    try:
        return LMConfig(transformer=TransformerConfig(**t), **data)
    except TypeError as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def write_checkpoint(directory: str | os.PathLike, config_json: Mapping[str, Any], params: Any,
                     overwrite: bool = False) -> Path:
    """Writes params/ (Orbax) and then model.json into `directory`; returns it. Every family's
    `save_checkpoint` is this with its own config JSON."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    target = directory / PARAMS_DIR
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; choose another directory or overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, jax.tree.map(jax.numpy.asarray, params), force=overwrite)
    checkpointer.wait_until_finished()
    # model.json last: a directory with it is a complete checkpoint.
    (directory / MODEL_JSON).write_text(json.dumps(dict(config_json), indent=2) + "\n")
    return directory


def read_model_json(directory: str | os.PathLike, what: str, hint: str) -> tuple[dict, str]:
    """(model.json contents, its path) of a checkpoint directory; `what` and `hint` name the
    kind of checkpoint and how to make one, for the error."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MODEL_JSON}; not an evejax {what} ({hint})")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def has_format(directory: str | os.PathLike, fmt: str) -> bool:
    """Whether `directory`'s model.json names format `fmt` (the export dispatch between families)."""
    path = Path(directory) / MODEL_JSON
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == fmt
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def restore_params(directory: str | os.PathLike, abstract: Any, shardings: Any = None) -> Any:
    """params/ of a checkpoint directory, restored to the shapes and dtypes of `abstract`
    (a ShapeDtypeStruct tree); on one device unless `shardings` (a tree like it) places them."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory / PARAMS_DIR}: parameters do not restore for the model in "
                              f"{MODEL_JSON} ({type(e).__name__}: {e})") from None


def save_checkpoint(directory: str | os.PathLike, cfg: LMConfig, params: Any, overwrite: bool = False) -> Path:
    """Writes model.json and params/ into `directory`; returns the directory."""
    return write_checkpoint(directory, config_to_json(cfg), params, overwrite)


def load_config(directory: str | os.PathLike) -> LMConfig:
    return config_from_json(*read_model_json(directory, "checkpoint", "create one with `evejax import`"))


def load_checkpoint(directory: str | os.PathLike, shardings: Any = None) -> tuple[LMConfig, Any]:
    """(LMConfig, params) of an evejax checkpoint directory."""
    from evejax.port.tables import abstract_params

    cfg = load_config(directory)
    return cfg, restore_params(directory, abstract_params(cfg), shardings)
