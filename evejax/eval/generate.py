"""Greedy generation for CausalLM: with the KV cache (fast) and by full recomputation (oracle).

Inputs: prompt_tokens [B, T] int and prompt_mask [B, T] (1 = real token, 0 =
padding; prompts are LEFT-padded so every row's last prompt token is at T - 1),
or inputs_embeds [B, T, D] in place of the tokens (a VLM's spliced image and
text embeddings). Output: new tokens [B, max_new_tokens] int32. Positions count
real tokens only (cumsum(mask) - 1), as transformers derives them from the
attention mask, so a padded row decodes as if it were alone (dynamic NTK RoPE
past `max_position_embeddings` aside, below). After a row emits
`eos_id` it emits `eos_id` to the end.

With dynamic NTK RoPE past `max_position_embeddings` the two paths differ, as
transformers' `generate` with and without its cache does: each step scales RoPE
by the length so far, max(positions) + 1 over the whole batch (so the longest
row sets it for all), and the cache keeps every key as its own step rotated it,
while the oracle re-rotates all keys by the full length. The official InternLM2
counts the cache length instead, padding included: the same number whenever
some row is unpadded, as `left_pad` makes it. Both keep grown frequencies across
calls (transformers until a call starts below `max_position_embeddings`, the
official InternLM2 for good); evejax is stateless, so it matches a freshly
loaded model, and transformers also after such a reset.

`evejax generate CKPT_DIR --prompt-ids 1,5,7 [--prompt-ids 4,2] --max-new 16`
prints the new token ids of each prompt (up to and including EOS); CKPT_DIR is an
evejax LM checkpoint or a training workdir (newest checkpoint; an EVE's LLM).
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _positions(mask):
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)


def greedy_generate(model, params, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id=None,
                    inputs_embeds=None):
    """New tokens [B, max_new_tokens] by greedy decoding with the KV cache; one compilation per shape."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
    return _greedy_cached(params, tokens, jnp.asarray(prompt_mask, jnp.int32), inputs_embeds,
                          model=model, max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id"))
def _greedy_cached(params, tokens, mask, inputs_embeds, *, model, max_new_tokens, eos_id):
    b, t = mask.shape
    # The attention layers size their caches from the input they are initialised with.
    cache_shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((b, t + max_new_tokens), jnp.int32),
                           decode=True)["cache"])
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    def step(cache, tokens, embeds, positions, segment_ids):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, inputs_embeds=embeds, positions=positions,
            segment_ids=segment_ids, decode=True, mutable=["cache"])
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), variables["cache"]

    def finish(token, done):
        if eos_id is None:
            return token, done
        token = jnp.where(done, eos_id, token)
        return token, done | (token == eos_id)

    positions = _positions(mask)
    token, cache = step(cache, tokens, inputs_embeds, positions, mask)
    token, done = finish(token, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), 0 if eos_id is None else eos_id, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, position, done, cache, out = carry
        position = position + 1
        token, cache = step(cache, token[:, None], None, position[:, None], jnp.ones((b, 1), jnp.int32))
        token, done = finish(token, done)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, token, position, done, cache, out

    carry = (jnp.array(1, jnp.int32), token, positions[:, -1], done, cache, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate_full_recompute(model, params, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id=None,
                            inputs_embeds=None):
    """The same tokens as `greedy_generate`, re-running the whole sequence for every new token."""
    mask = jnp.asarray(prompt_mask, jnp.int32)
    b = mask.shape[0]
    tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
    done = jnp.zeros((b,), bool)
    out = []
    for _ in range(max_new_tokens):
        token = _next_token(params, tokens, inputs_embeds, mask, model=model)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        out.append(token)
        if inputs_embeds is None:
            tokens = jnp.concatenate([tokens, token[:, None]], axis=1)
        else:
            new = _embed(params, token[:, None], model=model).astype(inputs_embeds.dtype)
            inputs_embeds = jnp.concatenate([inputs_embeds, new], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((b, 1), jnp.int32)], axis=1)
    return jnp.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("model",))
def _next_token(params, tokens, embeds, mask, *, model):
    logits = model.apply({"params": params}, tokens, inputs_embeds=embeds, positions=_positions(mask),
                         segment_ids=mask)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(params, tokens, *, model):
    return model.apply({"params": params}, tokens, method="embed")


def left_pad(prompts, pad_id: int):
    """Token lists -> (tokens [B, T], mask [B, T]) as numpy int32, padded on the left."""
    t = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, t - len(p):] = p
        mask[row, t - len(p):] = 1
    return tokens, mask


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r} must be comma-separated integers") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids needs at least one token id")
    return ids


def load_lm(path: str):
    """(LMConfig, params) of an evejax LM checkpoint directory or of a training workdir's newest
    checkpoint (an llm model, or the LLM of an eve model)."""
    from evejax.port import checkpoint
    from evejax.port.io import CheckpointError

    if not checkpoint.is_workdir(path):
        return checkpoint.load_checkpoint(path)
    name, cfg, params, _ = checkpoint.load_workdir(path)
    if name == "eve":
        return cfg.llm, params["llm"]
    if name != "llm":
        raise CheckpointError(f"{path} trained a {name!r} model; generate runs llm and eve models")
    return cfg, params


def main(argv) -> int:
    from evejax.models.llm import CausalLM
    from evejax.port.io import CheckpointError

    p = argparse.ArgumentParser(prog="evejax generate", description="greedy generation from token ids")
    p.add_argument("checkpoint", help="evejax checkpoint directory (model.json + params/) or training "
                   "workdir (its newest checkpoint; for an EVE the LLM alone)")
    p.add_argument("--prompt-ids", type=_token_ids, action="append", required=True,
                   help="comma-separated prompt token ids; repeat for a batch")
    p.add_argument("--max-new", type=int, default=16, help="number of tokens to generate")
    p.add_argument("--eos-id", type=int, help="stop token (default: the model's eos id)")
    p.add_argument("--no-eos", action="store_true", help="always generate --max-new tokens")
    args = p.parse_args(argv)
    if args.max_new < 1:
        p.error("--max-new must be >= 1")
    try:
        cfg, params = load_lm(args.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"evejax generate: error: {e}", file=sys.stderr)
        return 1
    vocab = cfg.vocab_size
    bad = sorted({i for ids in args.prompt_ids for i in ids if not 0 <= i < vocab})
    if bad:
        p.error(f"token ids {bad} are outside the vocabulary [0, {vocab})")
    eos = None if args.no_eos else (cfg.eos_id if args.eos_id is None else args.eos_id)
    tokens, mask = left_pad(args.prompt_ids, cfg.pad_id)
    out = np.asarray(greedy_generate(CausalLM(cfg), params, tokens, mask, args.max_new, eos))
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        print(",".join(map(str, row)))
    return 0
