"""Packing and batching of mapped examples into host batches, resumably, on grain.

`BatchIterDataset(parent, make_batcher)` reads the pipeline's mapped
elements: a good example (dict) or a bad-record marker {"bad": kind}.
Markers are counted by kind and dropped; examples go to a `Batcher` until an
example fits nowhere in the batch, which is then emitted and that example
starts the next one. The iterator's state is the parent's state from before
the first example not yet emitted, plus the counters, so a restored iterator
re-reads that example and yields exactly the batches an uninterrupted one
would (JSON-serialisable, for the checkpoint). `stats()` gives the counters.
After `bad_limit` markers in a row (a whole pass over the host's records, or
fewer) it raises sources.NoGoodRecordsError naming the source and the skips
by kind, rather than skip forever.

`SequencePacker` (conversation examples -> text rows of length T)
  example in:  index int, ids int32 [L] (IMAGE_TOKEN_INDEX where the image
               goes), loss_mask bool [L] (aligned with ids, as
               `text.encode_conversation` makes it), and when it has an image
               the `image_fields` (pixels [S, S, 3], pixel_mask [S, S],
               teacher_pixels [Tt, Tt, 3], teacher_mask [Tt, Tt]).
               An example takes L - 1 positions: inputs ids[:-1], targets ids[1:].
  batch out:   tokens     int32   [B, T]  pad_id on padding
               targets    int32   [B, T]  next token within the sample; pad_id on
                                          padding and where the next token is the
                                          image placeholder (never supervised)
               loss_mask  float32 [B, T]  1 where the target is an answer token
               segment_ids int32  [B, T]  1, 2, ... per sample in the row, 0 = padding
               positions  int32   [B, T]  0, 1, ... restarting in every sample
               has_image  bool    [B]
               image fields       [B, ...] the row's image, or the blank
                                  stand-in (all-zero masks) when it has none
               example_id int32   [B, T]  source index per position, -1 on
                                          padding (only with `with_ids`)
  Rows are filled first-fit: an example goes to the first row with room for
  its positions and, if it has an image, no image yet. **At most one image per
  row**, because EVE's batch carries one image per row (pixels [B, S, S, 3])
  and splices it at the row's single placeholder; text-only samples fill the
  rest of the row. Without packing every row holds one sample.

`Stacker` (fixed-shape examples, e.g. images and labels -> [B, ...])
  One example per row; rows of a final partial batch are `pad` values
  (label -1).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import grain
import numpy as np

from evejax.data.sources import BadRecord, NoGoodRecordsError
from evejax.data.text import IMAGE_TOKEN_INDEX


class Batcher(Protocol):
    def reset(self) -> None:
        """Starts an empty batch."""

    def add(self, example: dict) -> bool:
        """Places the example; False when it fits nowhere in this batch."""

    def full(self) -> bool:
        """No example could be added any more."""

    def empty(self) -> bool: ...

    def emit(self) -> dict[str, np.ndarray]:
        """The batch, padded to its fixed shapes."""


class SequencePacker:
    """Conversation examples -> packed text rows; see the module docstring."""

    def __init__(self, batch_size: int, seq_len: int, pack: bool, pad_id: int,
                 image_fields: Mapping[str, np.ndarray], with_ids: bool = False):
        self.batch_size, self.seq_len, self.pack, self.pad_id = batch_size, seq_len, pack, pad_id
        self.image_fields = dict(image_fields)  # name -> blank value for rows without an image
        self.with_ids = with_ids
        self.reset()

    def reset(self) -> None:
        self._rows: list[list[dict]] = [[] for _ in range(self.batch_size)]
        self._used = [0] * self.batch_size
        self._image = [False] * self.batch_size

    def _fits(self, r: int, length: int, has_image: bool) -> bool:
        if self._rows[r] and not self.pack:
            return False
        return self._used[r] + length <= self.seq_len and not (has_image and self._image[r])

    def add(self, example: dict) -> bool:
        length = len(example["ids"]) - 1
        if not 0 < length <= self.seq_len:
            raise ValueError(f"example {example['index']} takes {length} positions; rows hold "
                             f"1..{self.seq_len} (the map step must drop it as too_long)")
        has_image = "pixels" in example
        for r in range(self.batch_size):
            if self._fits(r, length, has_image):
                self._rows[r].append(example)
                self._used[r] += length
                self._image[r] |= has_image
                return True
        return False

    def full(self) -> bool:
        return all(self._used[r] == self.seq_len or (self._rows[r] and not self.pack)
                   for r in range(self.batch_size))

    def empty(self) -> bool:
        return not any(self._rows)

    def emit(self) -> dict[str, np.ndarray]:
        b, t = self.batch_size, self.seq_len
        out = {
            "tokens": np.full((b, t), self.pad_id, np.int32),
            "targets": np.full((b, t), self.pad_id, np.int32),
            "loss_mask": np.zeros((b, t), np.float32),
            "segment_ids": np.zeros((b, t), np.int32),
            "positions": np.zeros((b, t), np.int32),
            "has_image": np.asarray(self._image, bool),
        }
        for name, blank in self.image_fields.items():
            out[name] = np.broadcast_to(blank, (b,) + blank.shape).copy()
        if self.with_ids:
            out["example_id"] = np.full((b, t), -1, np.int32)
        for r, row in enumerate(self._rows):
            start = 0
            for k, ex in enumerate(row):
                ids, n = ex["ids"], len(ex["ids"]) - 1
                span = slice(start, start + n)
                out["tokens"][r, span] = ids[:-1]
                out["targets"][r, span] = np.where(ids[1:] == IMAGE_TOKEN_INDEX, self.pad_id, ids[1:])
                out["loss_mask"][r, span] = ex["loss_mask"][1:]
                out["segment_ids"][r, span] = k + 1
                out["positions"][r, span] = np.arange(n)
                if self.with_ids:
                    out["example_id"][r, span] = ex["index"]
                if "pixels" in ex:
                    for name in self.image_fields:
                        out[name][r] = ex[name]
                start += n
        return out


class Stacker:
    """Fixed-shape examples, one per row; `pad` gives each field's fill for empty rows."""

    def __init__(self, batch_size: int, pad: Mapping[str, np.ndarray]):
        self.batch_size, self.pad = batch_size, {k: np.asarray(v) for k, v in pad.items()}
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict] = []

    def add(self, example: dict) -> bool:
        if self.full():
            return False
        self._rows.append(example)
        return True

    def full(self) -> bool:
        return len(self._rows) == self.batch_size

    def empty(self) -> bool:
        return not self._rows

    def emit(self) -> dict[str, np.ndarray]:
        out = {}
        for name, fill in self.pad.items():
            rows = [np.asarray(ex[name], fill.dtype) for ex in self._rows]
            rows += [fill] * (self.batch_size - len(rows))
            out[name] = np.stack(rows)
        return out


COUNTERS = ("examples", "batches", "tokens", "capacity") + tuple(f"skipped_{k}" for k in BadRecord.KINDS)


class BatchIterator(grain.DatasetIterator):
    """Host batches with counters; state = parent position + counters (see module docstring)."""

    def __init__(self, parent: grain.DatasetIterator, batcher: Batcher, bad_limit: int | None = None,
                 describe: Callable[[int, str], str] | None = None):
        super().__init__(parent)
        self._batcher = batcher
        self._pending: tuple[dict, Any] | None = None   # (example, parent state before it)
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._bad_limit, self._describe = bad_limit, describe
        self._bad_run: dict[str, int] = {}   # kind -> markers since the last good example

    def __next__(self) -> dict[str, np.ndarray]:
        b = self._batcher
        b.reset()
        while not b.full():
            if self._pending is None:
                before = self._parent.get_state()
                try:
                    element = next(self._parent)
                except StopIteration:
                    if b.empty():
                        raise
                    break
                if "bad" in element:
                    self._skip(element["bad"])
                    continue
                self._bad_run.clear()
                self._pending = (element, before)
            if not b.add(self._pending[0]):
                if b.empty():
                    raise ValueError(f"example {self._pending[0].get('index')} fits no empty batch")
                break
            self._counts["examples"] += 1
            self._pending = None
        batch = b.emit()
        self._counts["batches"] += 1
        if "segment_ids" in batch:
            self._counts["tokens"] += int(np.count_nonzero(batch["segment_ids"]))
            self._counts["capacity"] += batch["segment_ids"].size
        return batch

    def _skip(self, kind: str) -> None:
        self._counts[f"skipped_{kind}"] += 1
        self._bad_run[kind] = self._bad_run.get(kind, 0) + 1
        n = sum(self._bad_run.values())
        if self._bad_limit is not None and n >= self._bad_limit:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self._bad_run.items(), key=lambda kv: -kv[1]))
            raise NoGoodRecordsError(self._describe(n, kinds) if self._describe else
                                     f"{n} records in a row were bad; skipped by kind: {kinds}")

    def get_state(self) -> dict:
        parent = self._pending[1] if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "counts": dict(self._counts)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counts = dict.fromkeys(COUNTERS, 0) | {k: int(v) for k, v in state["counts"].items()}
        self._pending = None

    def stats(self) -> dict[str, float]:
        """This host's counters since the run began (carried over resumes):
        examples, batches, skipped (total) and skipped_<kind> per BadRecord
        kind, and fill = non-padding positions / row positions (packed data)."""
        c = self._counts
        out = {k: float(v) for k, v in c.items() if k not in ("tokens", "capacity")}
        out["skipped"] = float(sum(c[f"skipped_{k}"] for k in BadRecord.KINDS))
        if c["capacity"]:
            out["fill"] = c["tokens"] / c["capacity"]
        return out


class BatchIterDataset(grain.IterDataset):
    """`parent` elements -> host batches via a fresh `make_batcher()` per iterator;
    `bad_limit` and `describe(n, kinds)` (the error message) as for BatchIterator."""

    def __init__(self, parent: grain.IterDataset, make_batcher: Callable[[], Batcher],
                 bad_limit: int | None = None, describe: Callable[[int, str], str] | None = None):
        super().__init__(parent)
        self._make_batcher, self._bad_limit, self._describe = make_batcher, bad_limit, describe

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self._make_batcher(), self._bad_limit, self._describe)
