"""Greedy generation for CausalLM and HoVLE: with KV caches (fast) and by full recomputation (oracle).

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

HoVLE (`greedy_generate_hovle`): tokens [B, N] left-padded with the image
placeholders, pixels [B, P, S, S, 3]. The prompt fills two caches, the embedding
layers' and the LLM's; every new token then goes through both (`HoVLE.decode_step`),
at its own position in each stream: in "post" the embedding layers' stream is the
HD one, longer by (s^2 - 1) n per tile. Official HoVLE decodes "post" at batch 1
and fails at its second new token (reference/hovle.md §6.8); this runs any batch.
`eos_id` may be several ids (HoVLE stops at `<|im_end|>` or EOS).

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


def _stops(eos_id) -> tuple:
    """eos_id: None, one id or several (any of them stops a row) -> a tuple of ids."""
    if eos_id is None:
        return ()
    return tuple(int(i) for i in eos_id) if isinstance(eos_id, (tuple, list)) else (int(eos_id),)


def _finish(token, done, stops):
    """A finished row repeats the first stop id; a row finishes at any stop id."""
    if not stops:
        return token, done
    token = jnp.where(done, stops[0], token)
    return token, done | jnp.isin(token, jnp.asarray(stops, jnp.int32))


def _argmax_last(logits):
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)


def _empty_cache(model, *init_args, **init_kwargs):
    """Zero KV caches, as long as the inputs the model is initialised with (nothing compiled twice)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args, **init_kwargs)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply_cached(model, params, cache, *args, **kwargs):
    """-> (logits, cache) of a call that reads and writes the `cache` collection."""
    logits, variables = model.apply({"params": params, "cache": cache}, *args, mutable=["cache"], **kwargs)
    return logits, variables["cache"]


def _greedy_loop(token, cache, positions, step, max_new_tokens, stops):
    """Tokens [B, max_new_tokens] from the first new token [B]: `step(cache, token, positions)` ->
    (next token, cache), `positions` (a tree of [B]) those of `token`, one more every step."""
    b = token.shape[0]
    token, done = _finish(token, jnp.zeros((b,), bool), stops)
    out = jnp.full((b, max_new_tokens), stops[0] if stops else 0, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, positions, done, cache, out = carry
        positions = jax.tree.map(lambda p: p + 1, positions)
        token, cache = step(cache, token, positions)
        token, done = _finish(token, done, stops)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, token, positions, done, cache, out

    carry = (jnp.array(1, jnp.int32), token, positions, done, cache, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


def _recompute_loop(next_token, append, state, mask, max_new_tokens, stops):
    """The oracle's loop: `next_token(state, mask)` [B] on the whole sequence, `append(state, token)`."""
    mask = jnp.asarray(mask, jnp.int32)
    done = jnp.zeros((mask.shape[0],), bool)
    out = []
    for _ in range(max_new_tokens):
        token, done = _finish(next_token(state, mask), done, stops)
        out.append(token)
        state = append(state, token)
        mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
    return jnp.stack(out, axis=1)


def _check_max_new(max_new_tokens):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def greedy_generate(model, params, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id=None,
                    inputs_embeds=None):
    """New tokens [B, max_new_tokens] by greedy decoding with the KV cache; one compilation per shape.
    eos_id: None, one id, or a tuple of ids any of which stops a row (it then repeats the first)."""
    _check_max_new(max_new_tokens)
    tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
    return _greedy_cached(params, tokens, jnp.asarray(prompt_mask, jnp.int32), inputs_embeds,
                          model=model, max_new_tokens=max_new_tokens, stops=_stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stops"))
def _greedy_cached(params, tokens, mask, inputs_embeds, *, model, max_new_tokens, stops):
    b, t = mask.shape
    cache = _empty_cache(model, jnp.zeros((b, t + max_new_tokens), jnp.int32), decode=True)
    positions = _positions(mask)
    logits, cache = _apply_cached(model, params, cache, tokens, inputs_embeds=inputs_embeds,
                                  positions=positions, segment_ids=mask, decode=True)

    def step(cache, token, position):
        logits, cache = _apply_cached(model, params, cache, token[:, None], positions=position[:, None],
                                      segment_ids=jnp.ones((b, 1), jnp.int32), decode=True)
        return _argmax_last(logits), cache

    return _greedy_loop(_argmax_last(logits), cache, positions[:, -1], step, max_new_tokens, stops)


def generate_full_recompute(model, params, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id=None,
                            inputs_embeds=None):
    """The same tokens as `greedy_generate`, re-running the whole sequence for every new token."""
    tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)

    def next_token(state, mask):
        return _next_token(params, *state, mask, model=model)

    def append(state, token):
        tokens, embeds = state
        if embeds is None:
            return jnp.concatenate([tokens, token[:, None]], axis=1), None
        new = _embed(params, token[:, None], model=model).astype(embeds.dtype)
        return None, jnp.concatenate([embeds, new], axis=1)

    return _recompute_loop(next_token, append, (tokens, inputs_embeds), prompt_mask, max_new_tokens,
                           _stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model",))
def _next_token(params, tokens, embeds, mask, *, model):
    logits = model.apply({"params": params}, tokens, inputs_embeds=embeds, positions=_positions(mask),
                         segment_ids=mask)
    return _argmax_last(logits)


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(params, tokens, *, model):
    return model.apply({"params": params}, tokens, method="embed")


# ---- HoVLE: two KV caches, the embedding layers' and the LLM's -------------------------------

def greedy_generate_hovle(model, params, prompt_tokens, prompt_mask, pixels, max_new_tokens: int,
                          eos_id=None, tile_mask=None):
    """New tokens [B, max_new_tokens] of a `HoVLE` model by greedy decoding with its two KV caches.

    prompt_tokens / prompt_mask [B, N] left-padded, with the image placeholders; pixels
    [B, P, S, S, 3] (real tiles first; tile_mask [B, P] names them, for the placeholder check).
    Each new token goes through the embedding layers and the LLM (`HoVLE.decode_step`).
    """
    from evejax.models import hovle

    _check_max_new(max_new_tokens)
    tokens, mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.int32)
    pixels = np.asarray(pixels, np.float32)
    hovle.check_placeholders(model.cfg, tokens, np.ones(pixels.shape[:2], bool) if tile_mask is None
                             else tile_mask, mask)
    return _hovle_greedy_cached(params, tokens, mask, pixels, model=model, max_new_tokens=max_new_tokens,
                                stops=_stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stops"))
def _hovle_greedy_cached(params, tokens, mask, pixels, *, model, max_new_tokens, stops):
    from evejax.models import hovle

    b, t = tokens.shape
    # Initialised at N + new tokens, the LLM's cache holds N + new and the embedding
    # layers' N + new ("pre") or N_hd + new ("post").
    cache = _empty_cache(model, jnp.zeros((b, t + max_new_tokens), jnp.int32), pixels, decode=True)
    logits, cache = _apply_cached(model, params, cache, tokens, pixels, mask, decode=True)

    def step(cache, token, positions):
        llm, encoder = positions
        logits, cache = _apply_cached(model, params, cache, token[:, None], llm[:, None], encoder[:, None],
                                      method="decode_step")
        return _argmax_last(logits), cache

    last = tuple(p - 1 for p in hovle.next_positions(model.cfg, tokens, mask))
    return _greedy_loop(_argmax_last(logits), cache, last, step, max_new_tokens, stops)


def generate_full_recompute_hovle(model, params, prompt_tokens, prompt_mask, pixels, max_new_tokens: int,
                                  eos_id=None):
    """The same tokens as `greedy_generate_hovle`, re-running the whole HoVLE forward (images
    included) for every new token."""
    pixels = jnp.asarray(pixels, jnp.float32)

    def next_token(tokens, mask):
        return _argmax_last(_hovle_logits(params, tokens, pixels, mask, model=model))

    def append(tokens, token):
        return jnp.concatenate([tokens, token[:, None]], axis=1)

    return _recompute_loop(next_token, append, jnp.asarray(prompt_tokens, jnp.int32), prompt_mask,
                           max_new_tokens, _stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model",))
def _hovle_logits(params, tokens, pixels, mask, *, model):
    return model.apply({"params": params}, tokens, pixels, mask)


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
