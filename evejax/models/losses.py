"""Losses of the model families (used by the registry). Each returns a scalar and the weight (number
of supervised items) it averaged over."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, targets, mask):
    """Mean token cross-entropy. logits [B, T, V] float32, targets/mask [B, T]."""
    mask = mask.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(weight, 1.0), weight


def lm_loss_fn(model):
    """loss_fn for a CausalLM on batches of next-token data.

    batch: tokens [B, T] int32, targets [B, T] int32 (tokens shifted by one),
    loss_mask [B, T], and optionally segment_ids / positions [B, T] (packing).
    """
    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params}, batch["tokens"], segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"), deterministic=False, rngs={"dropout": rng})
        loss, weight = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return loss, {"ce": loss, "weight": weight}

    return loss_fn


def dummy_lm_batch(batch: int, seq_len: int, vocab: int, seed: int = 0):
    """A random next-token batch of numpy arrays (benchmarks and compile plans)."""
    import numpy as np

    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": np.ones((batch, seq_len), np.float32)}


def batch_specs(batch: int, seq_len: int):
    """Abstract shapes of an LM batch, for ahead-of-time compilation."""
    s = lambda dt: jax.ShapeDtypeStruct((batch, seq_len), dt)
    return {"tokens": s(jnp.int32), "targets": s(jnp.int32), "loss_mask": s(jnp.float32)}
