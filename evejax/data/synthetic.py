"""Generated text with learnable structure, for the tiny LLM and smoke tests.

Example `i` is drawn from a generator seeded by (seed, i), so any example can
be produced on its own: the source is a grain `MapDataset` with random
access, and a resumed iterator (grain's `get_state` / `set_state`) yields
exactly the batches an uninterrupted one would have.

Each sequence is BOS followed by one of two patterns over the ids
[RESERVED, vocab_size), chosen per example:

  counting  a, a+k, a+2k, ... (mod the id range), stride k in 1..3;
            predictable from its third token on
  copying   a random block of 4..seq_len/4 ids repeated to the end;
            predictable after the first block (induction)

Host batch (`make_data`): tokens int32 [b, T], targets int32 [b, T] (tokens
shifted by one), loss_mask float32 [b, T] (1 where the target is
predictable), b = global_batch / process_count, T = seq_len.
"""
from __future__ import annotations

import grain
import numpy as np

BOS = 1
RESERVED = 4            # 0 pad, 1 bos, 2 eos, 3 spare
NUM_EXAMPLES = 2 ** 40  # endless in practice; random access needs a length


class SyntheticText:
    """A random-access source: `source[i]` -> one example (unbatched arrays)."""

    def __init__(self, seq_len: int, vocab_size: int, seed: int = 0):
        if vocab_size <= RESERVED + 8:
            raise ValueError(f"config.data.vocab_size={vocab_size} is too small for synthetic text")
        if seq_len < 8:
            raise ValueError(f"config.data.seq_len={seq_len} is too short for synthetic text (>= 8)")
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def __len__(self) -> int:
        return NUM_EXAMPLES

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(index)))
        t, span = self.seq_len, self.vocab_size - RESERVED
        if rng.integers(2) == 0:
            start, stride = rng.integers(span), rng.integers(1, 4)
            body = (start + stride * np.arange(t)) % span
            predictable = np.arange(t) >= 2
        else:
            block = rng.integers(4, max(t // 4, 4) + 1)
            body = np.resize(rng.integers(span, size=block), t)
            predictable = np.arange(t) >= block
        seq = np.concatenate([[BOS], body + RESERVED]).astype(np.int32)
        return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": predictable.astype(np.float32)}


def make_data(config, process_index: int, process_count: int):
    """This process's endless iterator of host batches, with get_state / set_state."""
    d = config.data
    if d.global_batch % process_count:
        raise ValueError(f"config.data.global_batch={d.global_batch} does not split over "
                         f"{process_count} processes")
    source = SyntheticText(d.seq_len, d.vocab_size, d.seed)
    dataset = grain.MapDataset.source(source)[process_index::process_count]
    dataset = dataset.batch(d.global_batch // process_count, drop_remainder=True)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
