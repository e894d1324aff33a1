"""An evejax LM checkpoint directory: what `evejax import` writes and `evejax export` reads.

    CKPT_DIR/model.json   the LMConfig: family, vocab_size, token ids, transformer fields
    CKPT_DIR/params/      the CausalLM parameter tree, saved with Orbax

`load_checkpoint(dir) -> (cfg, params)` is all a reader needs; params come back
as jax arrays, on one device unless `shardings` (a tree like the params) says
otherwise, so a checkpoint can be restored straight onto a mesh. A damaged one
is a one-line CheckpointError naming it.

`load_workdir(workdir) -> (model name, cfg, params, step)` reads the newest
checkpoint of a training workdir instead (through evejax.train.checkpoint), for
the commands that take either.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import jax

from evejax import atomic
from evejax.models.llm import LMConfig
from evejax.nn.transformer import TransformerConfig
from evejax.port.io import CheckpointError

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
FORMAT = "evejax.lm"
VERSION = 1


def unwrap_format(data: Mapping[str, Any], fmt: str, version: int, what: str, source: str) -> dict[str, Any]:
    """The fields of a model.json written for `fmt` / `version`, without those two keys; anything
    else is refused naming `source` and what was expected."""
    data = dict(data)
    if data.pop("format", None) != fmt or data.pop("version", None) != version:
        raise CheckpointError(f"{source}: not an evejax {what} config (expected format {fmt!r} version {version})")
    return data


def config_to_json(cfg: LMConfig) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(cfg)}


def config_from_json(data: Mapping[str, Any], source: str = MODEL_JSON) -> LMConfig:
    data = unwrap_format(data, FORMAT, VERSION, "LM", source)
    t = dict(data.pop("transformer", {}))
    try:
        return LMConfig(transformer=TransformerConfig(**t), **data)
    except TypeError as e:
        raise CheckpointError(f"{source}: fields do not match this evejax version ({e})") from None


def write_checkpoint(directory: str | os.PathLike, config_json: Mapping[str, Any], params: Any,
                     overwrite: bool = False) -> Path:
    """Writes params/ (Orbax) and model.json into `directory`; returns it. Every family's
    `save_checkpoint` is this with its own config JSON.

    Both are written beside `directory` and swapped in when complete
    (`evejax.atomic.replaced_dir`): with `overwrite` the old checkpoint stays
    until the new one is whole, whatever interrupts the write.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise CheckpointError(f"{directory / PARAMS_DIR} already exists; choose another directory or overwrite it")
    try:
        with atomic.replaced_dir(directory, owned=(MODEL_JSON, PARAMS_DIR)) as tmp:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(tmp / PARAMS_DIR, jax.tree.map(jax.numpy.asarray, params))
            checkpointer.wait_until_finished()
            (tmp / MODEL_JSON).write_text(json.dumps(dict(config_json), indent=2) + "\n")
    except FileExistsError as e:
        raise CheckpointError(str(e)) from None
    return directory


def read_model_json(directory: str | os.PathLike, what: str, hint: str) -> tuple[dict, str]:
    """(model.json contents, its path) of a checkpoint directory; `what` and `hint` name the
    kind of checkpoint and how to make one, for the error."""
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MODEL_JSON}; not an evejax {what} ({hint})"
                              + atomic.leftover_note(directory))
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
    (a ShapeDtypeStruct tree); on one device unless `shardings` (a tree like it) places them.
    A damaged, incomplete or mismatched params/ is one CheckpointError naming it."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    _ignore_reads_after_a_failed_restore()
    try:
        return ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
    except Exception as e:  # TensorStore reports damage as bare Exception, ValueError, OSError, ...
        raise CheckpointError(f"{directory / PARAMS_DIR}: parameters cannot be restored for the model in "
                              f"{MODEL_JSON}: damaged, incomplete or written for another model ({root_cause(e)}); "
                              "write it again (e.g. `evejax import ... --overwrite`)") from None


def root_cause(error: BaseException, limit: int = 300) -> str:
    """"Type: first line" of the innermost error of a chain: TensorStore's outer errors are
    pages of its spec, the inner one names the file and the byte range."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def _ignore_reads_after_a_failed_restore() -> None:
    """When a restore fails, the TensorStore reads still in flight call back into Orbax's
    closed event loop, and Python prints each RuntimeError("Event loop is closed") as a page of
    traceback after the one-line error. Those alone are dropped (for the whole process: they
    can come after the command has returned); every other unraisable error is reported."""
    previous = sys.unraisablehook
    if getattr(previous, "evejax_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.evejax_closed_loop = True
    sys.unraisablehook = hook


class _ExpectedOrbaxWarnings(logging.Filter):
    """Drops the warnings Orbax logs on every read-only load of a training workdir: the
    manager opened read-only, and per-item metadata that only exists per step."""

    EXPECTED = re.compile(r"Given directory is read only=|Metadata file does not exist: .*/\d+/"
                          r"(state|data|config|metrics)/_CHECKPOINT_METADATA$")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.EXPECTED.match(record.getMessage())


@contextlib.contextmanager
def expected_orbax_warnings_silenced():
    """Inside, Orbax's expected read-only warnings are not logged; any other warning is."""
    quiet = _ExpectedOrbaxWarnings()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a training workdir (`evejax train --workdir`)."""
    return "://" in str(path) or (Path(path) / "checkpoints").is_dir()


def workdir_model(workdir: str | os.PathLike) -> str:
    """The registry name of the model a training workdir trains, from its newest checkpoint's
    config (no parameters are read)."""
    from evejax.train import checkpoint as ckpt_lib

    with expected_orbax_warnings_silenced():
        store = ckpt_lib.Checkpoints(str(workdir), read_only=True)
        try:
            step = store.latest_step()
            if step is None:
                raise CheckpointError(f"{workdir}: a training workdir with no checkpoint yet")
            return store.config(step)["model"]["name"]
        except CheckpointError:
            raise
        except Exception as e:  # a damaged config: JSON and Orbax errors of many types
            raise CheckpointError(f"{workdir}: its newest checkpoint's config cannot be read "
                                  f"({root_cause(e)})") from None
        finally:
            store.close()


def load_workdir(workdir: str | os.PathLike, weights: str = "params",
                 model_name: str | None = None) -> tuple[str, Any, Any, int]:
    """(model name, e.g. "llm" or "eve"; its family's config; params as numpy arrays; step) of
    the newest checkpoint of a training workdir, read through evejax.train.checkpoint;
    `weights` "ema_params" takes its exponential moving average (FileNotFoundError if none);
    with `model_name` a workdir that trains another model is a CheckpointError.
    The params are the config's model: without the subtrees only training reads (the registry's
    ModelSpec.training_only, e.g. a teacher), so evaluation and export never see them."""
    import ml_collections

    from evejax.models import registry
    from evejax.train import checkpoint as ckpt_lib

    _ignore_reads_after_a_failed_restore()
    with expected_orbax_warnings_silenced():
        try:
            step, params = ckpt_lib.load_params(str(workdir), weights=weights)
            store = ckpt_lib.Checkpoints(str(workdir), read_only=True)
            try:
                model = store.config(step)["model"]
            finally:
                store.close()
        except FileNotFoundError:
            raise
        except Exception as e:  # a damaged step: TensorStore and JSON errors of many types
            raise CheckpointError(f"{workdir}: its newest checkpoint cannot be read ({root_cause(e)})") from None
    if model_name is not None and model["name"] != model_name:
        raise CheckpointError(f"{workdir} trains a {model['name']!r} model, not {model_name!r}")
    spec = registry.build(ml_collections.ConfigDict(model))
    return model["name"], spec.config, {k: v for k, v in params.items() if k not in spec.training_only}, step


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
