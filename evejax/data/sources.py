"""Random-access record sources for the grain pipelines, and the ArrayRecord format.

Every source maps an index to one raw record; decoding is left to the
pipeline's map step so that a bad record is counted there instead of failing
here.

  JsonConversations(path)  LLaVA-format file: a JSON list or JSON lines of
                           {"id", "image": relative path (optional),
                            "conversations": [{"from": "human", "value": "<image>\\n..."},
                                              {"from": "gpt", "value": "..."}, ...]}
                           source[i] -> bytes, the UTF-8 JSON text of record i
  arrayrecord_source(path) shards written by `convert_conversations`
                           source[i] -> bytes (see `encode_record`)
  tfds_source(...)         a prepared TFDS dataset (ArrayRecord format) through
                           `tfds.data_source`; source[i] -> feature dict with the
                           image left encoded (bytes), e.g. {"image", "label"}

Record bytes in the ArrayRecord shards (`encode_record` / `decode_record`):

  b"EVJX" | uint32 little-endian n | n bytes of UTF-8 JSON header | image bytes
  header = {"version": 1, "record": the original record, unchanged,
            "embedded": true if the image file's bytes follow}

so a converted set round-trips losslessly: the record's fields, and the
image's original encoded bytes when embedded (else the record keeps its
relative path and the reader resolves it against an image root).
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Iterable

import numpy as np

from evejax import atomic

MAGIC = b"EVJX"
FORMAT_VERSION = 1
SHARD_PATTERN = "data.array_record-{:05d}-of-{:05d}"
INFO_FILE = "info.json"
OUTPUTS = (INFO_FILE, "data.array_record-*")   # everything a conversion directory holds


class BadRecord(ValueError):
    """A record the pipeline skips; `kind` names the counter it adds to."""

    KINDS = ("undecodable_text", "malformed", "empty_conversation", "missing_image", "corrupt_image",
             "too_long", "multiple_images", "image_without_placeholder")

    def __init__(self, kind: str, message: str):
        if kind not in self.KINDS:
            raise ValueError(f"unknown bad-record kind {kind!r}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class NoGoodRecordsError(RuntimeError):
    """The pipeline read a whole pass over its records, or config.data.max_bad_run records,
    in a row without one good record: the data or config.data is wrong, and skipping on
    would never yield a batch."""


# ---- LLaVA JSON / JSONL ----------------------------------------------------------------

def _line_offsets(path: str, chunk: int = 1 << 24) -> np.ndarray:
    """[n, 2] int64 (start, end) byte offsets of the file's non-empty lines."""
    newlines = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while block := f.read(chunk):
            newlines.append(base + np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")))
            base += len(block)
    ends = np.concatenate(newlines + [np.asarray([size], np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    keep = ends - starts > 0
    return np.stack([starts[keep], ends[keep]], axis=1)


class JsonConversations:
    """A LLaVA JSON list or JSONL file as a random-access source of raw record bytes.

    JSONL is indexed by line offsets and read lazily, so a multi-GB file costs
    one scan and 16 bytes per record of memory; lines are decoded (UTF-8,
    JSON) only in the pipeline, where a bad line is counted and skipped. A
    JSON list must be parsed whole; its records are kept re-serialised in one
    bytes buffer (one object, so forked or spawned workers do not copy
    millions of Python objects). Files of tens of millions of records should
    be converted to ArrayRecord (`evejax data convert`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"conversation file {self.path} does not exist "
                                    "(expected a LLaVA JSON list or JSONL file)")
        with open(self.path, "rb") as f:
            head = f.read(4096).lstrip()
        self._blob = None
        if head.startswith(b"["):
            self._blob, self._spans = self._load_list()
        else:
            self._spans = _line_offsets(self.path)

    def _load_list(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                records = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path} is not a valid UTF-8 JSON list ({e}); fix the file or "
                             "write it as JSON lines, where bad lines are skipped and counted") from e
        parts = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
        ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
        starts = ends - np.asarray([len(p) for p in parts], np.int64)
        return b"".join(parts), np.stack([starts, ends], axis=1).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, index: int) -> bytes:
        start, end = (int(v) for v in self._spans[index])
        if self._blob is not None:
            return self._blob[start:end]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def __repr__(self) -> str:
        return f"JsonConversations({self.path!r}, {len(self)} records)"


def parse_record(raw: bytes) -> dict:
    """Raw JSON bytes -> record dict, or BadRecord("undecodable_text" | "malformed")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("undecodable_text", f"not UTF-8 ({e})") from e
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("malformed", f"not JSON ({e})") from e
    if not isinstance(record, dict):
        raise BadRecord("malformed", f"a record must be a JSON object, got {type(record).__name__}")
    return record


def image_path(relative, image_root: str | None) -> str:
    """Where a record's "image" lives: absolute paths and URLs as they are, else under image_root."""
    if not isinstance(relative, str) or not relative:
        raise BadRecord("malformed", f"record 'image' must be a path string, got {relative!r:.100}")
    if os.path.isabs(relative) or "://" in relative or not image_root:
        return relative
    return image_root.rstrip("/") + "/" + relative if "://" in image_root else os.path.join(image_root, relative)


def read_image_bytes(relative: str, image_root: str | None) -> bytes:
    """Bytes of a record's image file; BadRecord("missing_image") when it is absent.

    Paths with a scheme (gs://...) go through etils.epath, so the image root
    can be a bucket.
    """
    path = image_path(relative, image_root)
    try:
        if "://" in path:
            from etils import epath

            return epath.Path(path).read_bytes()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:  # absent, a directory, unreadable: the record has no usable image
        raise BadRecord("missing_image", f"image {path} cannot be read ({e})") from e


# ---- ArrayRecord -----------------------------------------------------------------------

def encode_record(record: dict, image_bytes: bytes | None) -> bytes:
    header = json.dumps({"version": FORMAT_VERSION, "record": record, "embedded": image_bytes is not None},
                        ensure_ascii=False).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + (image_bytes or b"")


def decode_record(raw: bytes) -> tuple[dict, bytes | None]:
    """(original record, embedded image bytes or None); BadRecord when unreadable."""
    if len(raw) < 8 or raw[:4] != MAGIC:
        raise BadRecord("malformed", "not an evejax ArrayRecord record (bad magic)")
    (n,) = struct.unpack("<I", raw[4:8])
    if len(raw) < 8 + n:
        raise BadRecord("malformed", f"header of {n} bytes is truncated")
    header = parse_record(raw[8:8 + n])
    if header.get("version") != FORMAT_VERSION or not isinstance(header.get("record"), dict):
        raise BadRecord("malformed", f"unknown header version {header.get('version')!r}")
    return header["record"], (raw[8 + n:] if header.get("embedded") else None)


def shard_paths(path: str) -> list[str]:
    """Shards of a converted set: a directory written by `convert_conversations`,
    a glob, or a comma-separated list of files."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "data.array_record-*")))
    elif "," in path:
        files = [p for p in path.split(",") if p]
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"no ArrayRecord shards at {path!r} (config.data.path: the --out "
                                "directory of `evejax data convert`, or a glob of shards)")
    return files


def arrayrecord_source(path: str):
    """grain's ArrayRecordDataSource over the shards at `path`, in shard order."""
    import grain

    return grain.sources.ArrayRecordDataSource(shard_paths(path))


def read_info(path: str) -> dict:
    """info.json of a converted set ({} when `path` is not a conversion directory)."""
    info = os.path.join(path, INFO_FILE)
    if not os.path.isfile(info):
        return {}
    with open(info, encoding="utf-8") as f:
        return json.load(f)


def _is_file(path: str) -> bool:
    if "://" in path:
        from etils import epath

        return epath.Path(path).is_file()
    return os.path.isfile(path)


def convert_conversations(src: str, out: str, image_root: str | None = None, embed_images: bool = False,
                          shards: int = 1, log: Callable[[str], None] = print) -> dict:
    """Writes the records of a LLaVA JSON/JSONL file as ArrayRecord shards in `out`.

    Records that cannot be read (bad UTF-8, not a JSON object) and, with
    `embed_images`, records whose image file is missing are skipped and
    counted; image bytes are stored as they are (not re-encoded, not
    decoded: a corrupt image is caught by the pipeline). Good records keep
    their source order and are split into `shards` contiguous runs. Returns
    the info written to out/info.json.

    Everything is written into a directory beside `out` that replaces `out`
    only when complete (`evejax.atomic.replaced_dir`), so `out` always holds
    exactly the shards its info.json describes: an earlier conversion until
    this one has finished, however it ends. An `out` holding other files is refused.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if shards < 1:
        raise ValueError(f"--shards must be positive, got {shards}")
    source = JsonConversations(src)
    skipped: dict[str, int] = {}
    good: list[int] = []
    for i in range(len(source)):
        try:
            record = parse_record(source[i])
            if embed_images and "image" in record:
                path = image_path(record["image"], image_root)
                if not _is_file(path):
                    raise BadRecord("missing_image", path)
            good.append(i)
        except BadRecord as e:
            skipped[e.kind] = skipped.get(e.kind, 0) + 1
    bounds = np.linspace(0, len(good), shards + 1).round().astype(int)
    info = {"format": "evejax-conversations", "version": FORMAT_VERSION, "source": os.path.abspath(src),
            "num_records": len(good), "shards": shards, "embedded": bool(embed_images),
            "image_root": os.path.abspath(image_root) if image_root and "://" not in image_root else image_root,
            "skipped": skipped}
    with atomic.replaced_dir(out, owned=OUTPUTS) as tmp:
        for k in range(shards):
            name = SHARD_PATTERN.format(k, shards)
            # group_size:1 keeps every record independently seekable (random access).
            writer = ArrayRecordWriter(str(tmp / name), "group_size:1")
            for i in good[bounds[k]:bounds[k + 1]]:
                record = parse_record(source[i])
                image = read_image_bytes(record["image"], image_root) if embed_images and "image" in record else None
                writer.write(encode_record(record, image))
            writer.close()
            log(f"wrote {os.path.join(out, name)} ({bounds[k + 1] - bounds[k]} records)")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def iter_arrayrecord(path: str) -> Iterable[tuple[dict, bytes | None]]:
    """(record, image bytes) of every record at `path`, in order (for inspection and tests)."""
    source = arrayrecord_source(path)
    for i in range(len(source)):
        yield decode_record(source[i])


# ---- TFDS ------------------------------------------------------------------------------

def tfds_source(name: str, split: str, data_dir: str | None, image_key: str = "image"):
    """`tfds.data_source` of a dataset prepared in ArrayRecord format, image left encoded.

    Needs no TensorFlow. `data_dir` may be local or a bucket (gs://...); the
    dataset must already be prepared there (`tfds build --file_format=array_record`).
    A split the prepared dataset does not have is a ValueError naming the ones it has.
    """
    import tensorflow_datasets as tfds

    try:
        available = sorted(tfds.builder(name, data_dir=data_dir).info.splits)
    except Exception as e:  # tfds raises several types for an unknown or unreadable dataset
        raise FileNotFoundError(f"TFDS dataset {name!r} is not readable in {data_dir!r} ({e}); prepare it "
                                "there in ArrayRecord format (config.data.tfds_dir, config.data.tfds_name)") from e
    # "train[:10%]+validation": the named splits, without slices.
    wanted = [part.split("[")[0].strip() for part in split.split("+")]
    missing = [w for w in wanted if w not in available]
    if missing and available:
        raise ValueError(f"TFDS dataset {name!r} in {data_dir!r} has no split {missing}; it has {available} "
                         "(config.data.split)")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types for a missing or TFRecord-format dataset
        raise FileNotFoundError(
            f"TFDS dataset {name!r} split {split!r} is not readable in {data_dir!r} ({e}); prepare it "
            "in ArrayRecord format there (config.data.tfds_dir, config.data.tfds_name)") from e


def tfds_num_classes(source, label_key: str = "label") -> int:
    """The number of classes of a tfds.data_source's ClassLabel feature `label_key`."""
    feature = source.dataset_info.features[label_key] if label_key in source.dataset_info.features else None
    if getattr(feature, "num_classes", None) is None:
        raise ValueError(f"TFDS feature {label_key!r} is not a ClassLabel with num_classes "
                         f"(features: {sorted(source.dataset_info.features)}); set config.data.label_key")
    return int(feature.num_classes)
