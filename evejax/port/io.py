"""Weight-file I/O shared by every converter: safetensors, PyTorch pickles, HF layouts.

A state dict here is ``dict[str, np.ndarray]``: official PyTorch parameter names
mapped to arrays in the PyTorch layout (a Linear weight is ``[out, in]``).

Reading (``load_state_dict``) accepts

- a single ``.safetensors`` file (parsed here, so reading needs no extra package),
- a single ``.bin`` / ``.pt`` / ``.pth`` pickle, read only with
  ``torch.load(path, map_location="cpu", weights_only=True)``,
- a sharded index ``*.index.json``, or
- a directory holding, in this order of preference, ``model.safetensors``,
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json`` (the Hugging Face conventions).

bfloat16 and float8 tensors become float32 arrays unless ``keep_dtype=True``,
which keeps them as ``ml_dtypes`` arrays. Any damaged input raises
``CheckpointError`` naming the file and the problem; nothing is returned in part.

Writing (``save_state_dict``) produces ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``) through the
``safetensors.numpy`` API, so exporting needs safetensors but not torch.

torch and safetensors are the optional extra ``evejax[torch]``; they are imported
only inside the functions that need them.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from evejax import atomic

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"
# What an export writes (and replaces on the next one).
HF_OUTPUTS = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, "model-*-of-*.safetensors", CONFIG_NAME)

_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# safetensors dtype tags (format spec) -> numpy dtypes; explicit little-endian
# because the format is little-endian whatever the host.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Float types numpy has no native arithmetic for; converted to float32 on load
# unless the caller asks to keep them.
_ML_FLOATS = frozenset(
    np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
)
# The safetensors library refuses headers above 100 MB; a larger length field
# means the file is not safetensors at all.
_MAX_HEADER_BYTES = 100_000_000
_INSTALL_HINT = "pip install 'evejax[torch]'"


class CheckpointError(ValueError):
    """A weight file or state dict is missing, damaged or does not fit the model."""


def load_state_dict(path: str | os.PathLike, keep_dtype: bool = False) -> dict[str, np.ndarray]:
    """Reads every tensor of a checkpoint file, shard index or HF model directory."""
    path = Path(path)
    if path.is_dir():
        for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, BIN_NAME, BIN_INDEX_NAME):
            if (path / name).is_file():
                return load_state_dict(path / name, keep_dtype)
        raise CheckpointError(
            f"{path}: no weights found; expected one of {SAFETENSORS_NAME}, "
            f"{SAFETENSORS_INDEX_NAME}, {BIN_NAME}, {BIN_INDEX_NAME}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.name.endswith(".index.json"):
        return _load_sharded(path, keep_dtype)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, keep_dtype)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _load_torch_pickle(path, keep_dtype)
    raise CheckpointError(
        f"{path}: unknown checkpoint type; expected .safetensors, .bin, .pt, .pth or *.index.json"
    )


def _load_safetensors(path: Path, keep_dtype: bool) -> dict[str, np.ndarray]:
    header, data_start = _read_safetensors_header(path)
    state = {}
    with open(path, "rb") as f:
        # Reading in file order keeps the disk access sequential.
        for name, (dtype, shape, begin, end) in sorted(header.items(), key=lambda kv: kv[1][2:]):
            array = np.empty(shape, dtype)
            f.seek(data_start + begin)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
                raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
            state[name] = array if keep_dtype else _widen(array)
    return state


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple], int]:
    """Parses and validates the header: name -> (dtype, shape, begin, end), data start."""
    file_size = path.stat().st_size

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({what}); re-download or re-export it"
        )

    if file_size < 8:
        raise corrupt(f"only {file_size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise corrupt(f"header length field says {header_len} bytes, the file holds {file_size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)

    data_len = file_size - 8 - header_len
    entries = {}
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad or unsupported header entry for {name!r}: {info!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise corrupt(f"tensor {name!r} of shape {shape} does not fit offsets {begin}..{end}")
        entries[name] = (dtype, shape, begin, end)
    # Tensors must tile the data section exactly, as the format requires.
    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != cursor:
            raise corrupt(f"tensor {name!r} starts at byte {begin}, expected {cursor}")
        cursor = end
    if cursor != data_len:
        raise corrupt(f"header lists {cursor} bytes of tensor data, the file holds {data_len}")
    return entries, 8 + header_len


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype in _ML_FLOATS else array


def read_torch_pickle(path: str | os.PathLike) -> Any:
    """The object in a PyTorch pickle, read only with ``torch.load(weights_only=True)``: tensors
    and plain containers. A pickle that would run code or build other objects (e.g. a training
    checkpoint carrying its yacs config) is refused, naming what it holds; nothing in it runs."""
    torch = _import_torch("reading PyTorch .bin/.pt/.pth checkpoints")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch pickle ({e}); re-download it") from None
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors ({found.group(1) if found else 'other objects'}), and "
            "loading it would run code from the file. If you trust it, keep only the weights in a trusted "
            "environment, e.g. torch.save({k: v for k, v in torch.load(SRC, weights_only=False).items() "
            "if k in ('model', 'model_ema', 'state_dict')}, DST), and read DST"
        ) from None
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, ...
        raise CheckpointError(
            f"{path}: truncated, corrupt or not a PyTorch pickle ({type(e).__name__}: {e}); re-download it "
            "or convert it to safetensors"
        ) from None


def tensors_to_numpy(tensors: Mapping[str, Any], keep_dtype: bool = False) -> dict[str, np.ndarray]:
    """A name -> torch.Tensor dict as numpy arrays (bfloat16 and float8 as in ``load_state_dict``)."""
    torch = _import_torch("converting PyTorch tensors")
    return {name: _torch_to_numpy(t, torch, keep_dtype) for name, t in tensors.items()}


def _load_torch_pickle(path: Path, keep_dtype: bool) -> dict[str, np.ndarray]:
    obj = read_torch_pickle(path)
    tensors = _unwrap_tensor_dict(obj, _import_torch("reading PyTorch checkpoints"))
    if tensors is None:
        raise CheckpointError(
            f"{path}: expected a dict of tensor names to tensors, got {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else "")
        )
    return tensors_to_numpy(tensors, keep_dtype)


def _unwrap_tensor_dict(obj: Any, torch) -> dict | None:
    """The flat name -> tensor dict, also when a training script nested it one level deep."""
    def is_tensor_dict(d):
        return isinstance(d, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
        )

    if is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if is_tensor_dict(obj.get(key)):
                return obj[key]
    return None


def _torch_to_numpy(tensor, torch, keep_dtype: bool) -> np.ndarray:
    tensor = tensor.detach().contiguous()
    # numpy cannot hold these torch dtypes; reinterpret the raw bits as ml_dtypes.
    raw_views = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if tensor.dtype in raw_views:
        bits_dtype, np_dtype = raw_views[tensor.dtype]
        array = tensor.view(bits_dtype).numpy().view(np_dtype)
        return array if keep_dtype else array.astype(np.float32)
    return tensor.numpy()


def _load_sharded(index_path: Path, keep_dtype: bool) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None

    shards = list(dict.fromkeys(weight_map.values()))
    escaping = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
    if escaping:
        raise CheckpointError(f"{index_path}: shard names must be plain file names, got {escaping}")
    missing = [s for s in shards if not (index_path.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} shard(s) listed in the index are missing: "
            + ", ".join(str(index_path.parent / s) for s in missing)
        )

    state: dict[str, np.ndarray] = {}
    for shard in shards:
        shard_path = index_path.parent / shard
        part = load_state_dict(shard_path, keep_dtype)
        absent = sorted(n for n, s in weight_map.items() if s == shard and n not in part)
        if absent:
            raise CheckpointError(
                f"{shard_path}: missing tensors the index places in it: {', '.join(absent)}"
            )
        doubled = sorted(state.keys() & part.keys())
        if doubled:
            raise CheckpointError(f"{shard_path}: tensors also stored in another shard: {', '.join(doubled)}")
        state.update(part)
    return state


def save_state_dict(
    state: Mapping[str, Any],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Any = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes ``state`` as HF-style safetensors into ``out_dir``; returns the files written.

    ``dtype`` (e.g. ``"bfloat16"``) casts floating arrays; integer and bool arrays
    keep theirs. ``metadata`` (str -> str) goes into every file's header, next to
    ``format: pt``, which transformers' loader requires. Shards are filled in
    ``state`` order; a tensor larger than ``max_shard_bytes`` gets a shard alone.
    Files are written under temporary names and renamed at the end, the index
    last, after removing weight files of an earlier save to the same directory,
    so a crash leaves either the old checkpoint, the new one, or none that loads.
    """
    safetensors_numpy = _import_safetensors_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header_metadata = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in header_metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    target = None if dtype is None else np.dtype(dtype)

    def out_dtype(array) -> np.dtype:
        if target is not None and (array.dtype.kind == "f" or array.dtype in _ML_FLOATS):
            return target
        return array.dtype

    arrays = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state dict keys must be str, got {name!r}")
        arrays[name] = np.asarray(value)

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, array in arrays.items():
        nbytes = array.size * out_dtype(array).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    if len(shards) == 1:
        final_names = [SAFETENSORS_NAME]
    else:
        final_names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]

    token = uuid.uuid4().hex[:8]
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for names, final in zip(shards, final_names):
            tmp = out_dir / f".{final}.tmp-{token}"
            written.append((tmp, out_dir / final))
            tensors = {n: np.ascontiguousarray(arrays[n], dtype=out_dtype(arrays[n])) for n in names}
            safetensors_numpy.save_file(tensors, tmp, metadata=header_metadata)
            atomic.fsync(tmp)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(a.size * out_dtype(a).itemsize for a in arrays.values())},
                "weight_map": dict(sorted((n, final) for names, final in zip(shards, final_names) for n in names)),
            }
            tmp = out_dir / f".{SAFETENSORS_INDEX_NAME}.tmp-{token}"
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            atomic.fsync(tmp)
            written.append((tmp, out_dir / SAFETENSORS_INDEX_NAME))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise

    _remove_stale_weights(out_dir, keep={final.name for _, final in written})
    for tmp, final in written:
        os.replace(tmp, final)
    atomic.fsync(out_dir)
    return [final for _, final in written]


def _remove_stale_weights(out_dir: Path, keep: set[str]) -> None:
    """Deletes safetensors weights of an earlier save that the new one does not overwrite.

    The old index goes first so an old shard set stops looking complete before
    any of its shards disappear.
    """
    index = out_dir / SAFETENSORS_INDEX_NAME
    if index.name not in keep:
        index.unlink(missing_ok=True)
    for entry in out_dir.iterdir():
        stale_layout = entry.name == SAFETENSORS_NAME or _SHARD_PATTERN.fullmatch(entry.name)
        if stale_layout and entry.name not in keep:
            entry.unlink()


def check_state_dict(
    expected: Mapping[str, Sequence[int]], got: Mapping[str, Any], source: str | None = None
) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor.

    ``expected`` maps names to shapes, ``got`` names to anything with ``.shape``;
    ``source`` (a path or model name) is named in the message.
    """
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    mismatched = sorted(
        n for n in expected.keys() & got.keys() if tuple(expected[n]) != tuple(got[n].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"  missing: {n} (expected shape {tuple(expected[n])})" for n in missing]
    lines += [f"  unexpected: {n} (shape {tuple(got[n].shape)})" for n in unexpected]
    lines += [
        f"  shape mismatch: {n} expected {tuple(expected[n])}, got {tuple(got[n].shape)}"
        for n in mismatched
    ]
    where = f" in {source}" if source else ""
    raise CheckpointError(
        f"state dict{where} does not fit the model: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} shape mismatches "
        "(is the checkpoint for this model size and config?)\n" + "\n".join(lines)
    )


def save_hf_checkpoint(state: Mapping[str, Any], config: Mapping[str, Any], out_dir: str | os.PathLike, *,
                       family: str, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """An official-layout checkpoint: the safetensors of ``state`` in ``dtype`` ("float32" or
    "bfloat16"), tagged as exported by evejax for ``family``, then ``config.json``; returns
    the weight files written. Every family's export ends here.

    Weights and config are written beside ``out_dir`` and swapped in together when complete
    (``evejax.atomic.replaced_dir``): an earlier export there stays whole until then, and
    files that are not weights or config (e.g. remote-code ``.py`` files) are kept.
    """
    out_dir = Path(out_dir).absolute()
    with atomic.replaced_dir(out_dir, owned=HF_OUTPUTS, keep_others=True) as tmp:
        files = save_state_dict(state, tmp, max_shard_bytes=max_shard_bytes,
                                dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype,
                                metadata={"exported_by": "evejax", "family": family})
        save_config_json(config, tmp)
    return [out_dir / f.name for f in files]


def save_config_json(config: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Writes ``out_dir/config.json`` (sorted keys, as transformers writes it); returns its path."""
    return atomic.write_text(Path(out_dir) / CONFIG_NAME, json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def load_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads ``config.json`` from a model directory (or the given JSON file)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; a HF model directory needs one") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _import_torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise ImportError(f"{purpose} needs PyTorch: {_INSTALL_HINT}") from None
    return torch


def _import_safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(f"writing safetensors files needs the safetensors package: {_INSTALL_HINT}") from None
    return safetensors.numpy
