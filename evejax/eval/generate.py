"""Generation for CausalLM and HoVLE: with KV caches (fast) and by full recomputation (greedy oracle).

Inputs: prompt_tokens [B, T] int and prompt_mask [B, T] (1 = real token, 0 =
padding; prompts are LEFT-padded so every row's last prompt token is at T - 1),
or inputs_embeds [B, T, D] in place of the tokens (a VLM's spliced image and
text embeddings). Output: new tokens [B, max_new_tokens] int32. Positions count
real tokens only (cumsum(mask) - 1), as transformers derives them from the
attention mask, so a padded row decodes as if it were alone (dynamic NTK RoPE
past `max_position_embeddings` aside, below). After a row emits
`eos_id` it emits `eos_id` to the end.

Choosing a token: greedy (argmax) by default; `sampling=Sampling(temperature, top_p, top_k)`
draws from softmax(logits / temperature) over the top_k most likely ids and then the nucleus
(transformers' order), with `rng` (a jax.random key: step i draws with fold_in(rng, i)), so a
seed reproduces the tokens; temperature 0 is greedy. The knobs are traced: changing them
compiles nothing new.

Sharding (`mesh=`, a sharding.make_mesh mesh): the parameters are placed by the model's logical
axis names and sharding.LOGICAL_RULES, as training places them, the batch arrays [B, ...] over the
data axes (slice, data, fsdp: B must divide over them), and the loop runs under the rules, so the
model's activation constraints apply; the tokens are those of the unsharded run.

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

`evejax generate CKPT_DIR --prompt-ids 1,5,7 [--prompt-ids 4,2] --max-new 16` prints the new
token ids of each prompt (up to and including EOS); CKPT_DIR is an evejax LM checkpoint or a
training workdir (newest checkpoint; an EVE's LLM).
`evejax generate CKPT_DIR --image IMG --prompt TEXT [--tokenizer T] [--max-new 16]` prints an EVE's
or HoVLE's answer (`load_answerer`, chosen by the checkpoint's format through `ANSWERERS`): EVE as
`evejax eval` asks (any-res image, vicuna_v1; --tokenizer required: EVE checkpoints carry none),
HoVLE as official `chat()` (dynamic tiles, internlm2-chat, the tokenizer files the checkpoint
carries, answer up to `<|im_end|>`). Both are greedy unless --temperature (with --top-p, --top-k,
--seed) samples. `--mesh data=2,fsdp=-1` (either form, and `evejax eval`; `add_mesh_arg`) shards the
generation over a mesh of config.mesh's form, the rows padded to its data-parallel devices.
"""
from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a new token is drawn (module docstring). temperature 0: greedy; top_p 1.0 and top_k 0: no cut."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no cut), got {self.top_k}")

    def knobs(self):
        """The traced values: (temperature, top_p, top_k) as arrays."""
        return (jnp.float32(self.temperature), jnp.float32(self.top_p), jnp.int32(self.top_k))


def filter_logits(logits, top_p, top_k):
    """logits [B, V] with every id outside the top_k (0: all) and then outside the nucleus of what
    is left set to -inf. The nucleus: the most likely ids, in order, while the probability of the
    ids before them is below top_p (the smallest set reaching top_p; the most likely id always)."""
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)
    in_top_k = rank < jnp.where(top_k > 0, top_k, vocab)
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # top_p 1 keeps all: the mass before the least likely ids rounds to 1.0 in float32
    kept = jnp.sum(in_top_k & ((before < top_p) | (top_p >= 1)), axis=-1).clip(1)
    cut = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)
    return jnp.where(logits >= cut, logits, -jnp.inf)


def _choose(logits, knobs, rng, step):
    """Token [B] from last logits [B, V]: argmax without knobs or at temperature 0, else a draw."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if knobs is None:
        return greedy
    temperature, top_p, top_k = knobs
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    drawn = jax.random.categorical(jax.random.fold_in(rng, step), filter_logits(scaled, top_p, top_k), axis=-1)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def _knobs(sampling, rng):
    """(knobs, rng) for the jitted loops: None for greedy."""
    if sampling is None:
        return None, None
    return sampling.knobs(), jax.random.PRNGKey(0) if rng is None else rng


def _empty_cache(model, *init_args, **init_kwargs):
    """Zero KV caches, as long as the inputs the model is initialised with (nothing compiled twice)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *init_args, **init_kwargs)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _apply_cached(model, params, cache, *args, **kwargs):
    """-> (logits, cache) of a call that reads and writes the `cache` collection."""
    logits, variables = model.apply({"params": params, "cache": cache}, *args, mutable=["cache"], **kwargs)
    return logits, variables["cache"]


def _decode_loop(logits, cache, positions, step, max_new_tokens, stops, knobs, rng):
    """Tokens [B, max_new_tokens] from the prompt's last logits [B, V]: `step(cache, token, positions)`
    -> (next logits [B, V], cache), `positions` (a tree of [B]) those of the prompt's last token, one
    more every step; each token chosen by `_choose`."""
    b = logits.shape[0]
    token, done = _finish(_choose(logits, knobs, rng, 0), jnp.zeros((b,), bool), stops)
    out = jnp.full((b, max_new_tokens), stops[0] if stops else 0, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, positions, done, cache, out = carry
        positions = jax.tree.map(lambda p: p + 1, positions)
        logits, cache = step(cache, token, positions)
        token, done = _finish(_choose(logits, knobs, rng, i), done, stops)
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


PROMPT_BUCKET = 64  # prompt widths are rounded up to a multiple of this: one compilation per bucket


def bucket_length(length: int, bucket: int = PROMPT_BUCKET) -> int:
    return -(-length // bucket) * bucket


def _on_mesh(mesh, model, params, init_args, batch):
    """(params, batch) placed on `mesh` (module docstring); batch: arrays [B, ...] or None."""
    from evejax import sharding

    rows = next(a for a in batch if a is not None).shape[0]
    data = sharding.data_parallel_size(mesh)
    if rows % data:
        raise ValueError(f"a batch of {rows} rows does not divide over the mesh's {data} data-parallel devices "
                         f"(slice x data x fsdp); pad the batch to a multiple of {data}")
    boxed = jax.eval_shape(lambda *args: model.init(jax.random.PRNGKey(0), *args)["params"], *init_args)
    params = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
    return params, [None if a is None else jax.device_put(a, sharding.batch_sharding(mesh, np.ndim(a)))
                    for a in batch]


def _run(mesh, fn, *args, **kwargs):
    """fn(*args, **kwargs), under the mesh's logical axis rules when there is a mesh."""
    if mesh is None:
        return fn(*args, **kwargs)
    from evejax import sharding

    with sharding.rules_context(mesh):
        return fn(*args, **kwargs)


def _check_max_new(max_new_tokens):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def greedy_generate(model, params, prompt_tokens, prompt_mask, max_new_tokens: int, eos_id=None,
                    inputs_embeds=None, sampling: Sampling | None = None, rng=None, mesh=None):
    """New tokens [B, max_new_tokens] decoded with the KV cache, greedy unless `sampling`, sharded
    over `mesh` when given (module docstring); one compilation per shape. eos_id: None, one id, or
    a tuple of ids any of which stops a row (it then repeats the first)."""
    _check_max_new(max_new_tokens)
    tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
    mask = jnp.asarray(prompt_mask, jnp.int32)
    if mesh is not None:
        params, (tokens, mask, inputs_embeds) = _on_mesh(mesh, model, params, (mask,),
                                                         (tokens, mask, inputs_embeds))
    return _run(mesh, _greedy_cached, params, tokens, mask, inputs_embeds, *_knobs(sampling, rng), model=model,
                max_new_tokens=max_new_tokens, stops=_stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stops"))
def _greedy_cached(params, tokens, mask, inputs_embeds, knobs, rng, *, model, max_new_tokens, stops):
    b, t = mask.shape
    cache = _empty_cache(model, jnp.zeros((b, t + max_new_tokens), jnp.int32), decode=True)
    positions = _positions(mask)
    logits, cache = _apply_cached(model, params, cache, tokens, inputs_embeds=inputs_embeds,
                                  positions=positions, segment_ids=mask, decode=True)

    def step(cache, token, position):
        logits, cache = _apply_cached(model, params, cache, token[:, None], positions=position[:, None],
                                      segment_ids=jnp.ones((b, 1), jnp.int32), decode=True)
        return logits[:, -1], cache

    return _decode_loop(logits[:, -1], cache, positions[:, -1], step, max_new_tokens, stops, knobs, rng)


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
                          eos_id=None, tile_mask=None, sampling: Sampling | None = None, rng=None, mesh=None):
    """New tokens [B, max_new_tokens] of a `HoVLE` model decoded with its two KV caches, greedy
    unless `sampling`, sharded over `mesh` when given (module docstring).

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
    if mesh is not None:
        params, (tokens, mask, pixels) = _on_mesh(mesh, model, params, (tokens, pixels), (tokens, mask, pixels))
    return _run(mesh, _hovle_greedy_cached, params, tokens, mask, pixels, *_knobs(sampling, rng), model=model,
                max_new_tokens=max_new_tokens, stops=_stops(eos_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "stops"))
def _hovle_greedy_cached(params, tokens, mask, pixels, knobs, rng, *, model, max_new_tokens, stops):
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
        return logits[:, -1], cache

    last = tuple(p - 1 for p in hovle.next_positions(model.cfg, tokens, mask))
    return _decode_loop(logits[:, -1], cache, last, step, max_new_tokens, stops, knobs, rng)


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


def left_pad(prompts, pad_id: int, width: int | None = None):
    """Token lists -> (tokens [B, T], mask [B, T]) as numpy int32, padded on the left to T = `width`
    (default: the longest prompt)."""
    t = max(len(p) for p in prompts) if width is None else width
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, t - len(p):] = p
        mask[row, t - len(p):] = 1
    return tokens, mask


def add_sampling_args(p: argparse.ArgumentParser, seed_flag: str = "--seed") -> None:
    """--temperature, --top-p, --top-k and the draws' seed (`seed_flag`, read as args.sample_seed)."""
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus mass (default 1: all)")
    p.add_argument("--top-k", type=int, default=0, help="with --temperature: the k most likely ids (default 0: all)")
    p.add_argument(seed_flag, dest="sample_seed", type=int, default=0, help="with --temperature: the draws' seed")


def sampling_from_args(p: argparse.ArgumentParser, args) -> Sampling | None:
    """The Sampling of `add_sampling_args`' flags, None for greedy; bad values are a usage error."""
    if args.temperature == 0 and (args.top_p, args.top_k) == (1.0, 0):
        return None
    try:
        return Sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as e:
        p.error(str(e))


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


# ---- answers to (image, prompt): EVE and HoVLE ------------------------------------------------

def padded_batches(count: int, size: int, multiple: int = 1):
    """(rows, number of real rows) over range(count), at most `size` rows a batch; a batch is padded
    (its final row repeated) to `size` rows, or a shorter last one to the next power of two, so
    generation compiles once per row bucket, not once per call; then up to a multiple of `multiple`
    (a mesh's data-parallel devices, which the rows are split over)."""
    for start in range(0, count, size):
        rows = list(range(start, min(start + size, count)))
        padded = -(-min(size, 1 << (len(rows) - 1).bit_length()) // multiple) * multiple
        yield rows + [rows[-1]] * (padded - len(rows)), len(rows)


def row_multiple(mesh) -> int:
    """The number a batch's rows must be a multiple of on `mesh` (None: 1)."""
    from evejax import sharding

    return 1 if mesh is None else sharding.data_parallel_size(mesh)


def placed_params(mesh, model, params, init_args):
    """`params` placed on `mesh` by `model`'s logical axes (once, so later calls move nothing)."""
    return params if mesh is None else _on_mesh(mesh, model, params, init_args, init_args)[0]


def add_mesh_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="shard generation over a mesh, in config.mesh's form: axis=size,... over "
                   "slice, data, fsdp, tensor, -1 the rest of the devices (e.g. data=-1: every device answers "
                   "its own rows; fsdp=-1: the parameters split over all devices, for a model too big for "
                   "one). Each batch is padded to a multiple of slice x data x fsdp rows. Default: no mesh, "
                   "one device")


def mesh_from_arg(text: str | None):
    """The sharding.make_mesh mesh of a --mesh value (None: None); a mesh that does not fit the
    devices is a ValueError naming both, raised before anything compiles."""
    if text is None:
        return None
    from evejax import sharding

    return sharding.make_mesh(sharding.parse_mesh(text))


def tile_bucket(tiles: int, slots: int) -> int:
    """Tile slots a batch runs with: its most tiles rounded up to a power of two, at most `slots`."""
    return min(slots, 1 << (tiles - 1).bit_length())


class HoVLEAnswerer:
    """Greedy answers of a HoVLE to (image, question) pairs, as official `chat()` asks: the image
    tiled (InternVL dynamic tiling, the config's max_tiles), "<image>\\n" + question in the
    internlm2-chat prompt, decoding until `<|im_end|>` or EOS. `special_ids`: the tokenizer's
    ids of the chat and image tokens (text.INTERNLM2_SPECIAL_IDS by default). `batch_size`: questions
    per generation call (None: all in one call). Each call is padded to shape buckets, so a call
    in a bucket already seen compiles nothing: rows (`padded_batches`), prompt width (a multiple of
    PROMPT_BUCKET, left padding) and tile slots (`tile_bucket` of the batch's most tiles).
    `sampling` and `seed`: greedy_generate's (batch k draws with fold_in(PRNGKey(seed), k)). `mesh`:
    greedy_generate_hovle's, the rows padded further to a multiple of its data-parallel devices."""

    def __init__(self, cfg, params, tokenizer, special_ids=None, max_new_tokens: int = 64,
                 batch_size: int | None = None, sampling: Sampling | None = None, seed: int = 0, mesh=None):
        from evejax.data import text as text_lib
        from evejax.models import hovle

        self.special_ids = dict(text_lib.INTERNLM2_SPECIAL_IDS if special_ids is None else special_ids)
        context = self.special_ids[text_lib.IMG_CONTEXT]
        if context != cfg.img_context_token_id:
            raise ValueError(f"the tokenizer's {text_lib.IMG_CONTEXT} is id {context} but the model's "
                             f"img_context_token_id is {cfg.img_context_token_id}; use the checkpoint's tokenizer")
        self.cfg, self.params, self.tokenizer, self.max_new_tokens = cfg, params, tokenizer, max_new_tokens
        self.batch_size, self.sampling, self.seed, self.mesh = batch_size, sampling, seed, mesh
        self.model = hovle.HoVLE(cfg)
        self._placed = False
        self.stops = (self.special_ids[text_lib.IM_END], tokenizer.eos_id)

    def prompt_ids(self, question: str, num_tiles: int) -> list[int]:
        """BOS + "<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>...</img>\\n{question}
        <|im_end|><|im_start|>assistant\\n" (the training string of a one-round conversation, up to
        its answer)."""
        from evejax.data import text as text_lib

        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
        rendered = text_lib.render_internlm2_chat(turns, [num_tiles], self.cfg.image_tokens_per_tile)
        prompt = rendered[:-len(text_lib.IM_END)]  # the empty answer's separator
        return [self.tokenizer.bos_id] + text_lib.encode_with_specials(prompt, self.tokenizer, self.special_ids)

    @staticmethod
    def tiles(cfg, picture):
        """image.TiledImage of `picture` in the config's tile slots."""
        from evejax.data import image as image_lib

        return image_lib.tile_image(picture, cfg.tiling(), cfg.tile_slots)

    def answer(self, pictures, questions) -> list[str]:
        from evejax.eval.evaluate import decode_answer

        answers = []
        batches = padded_batches(len(questions), self.batch_size or len(questions), row_multiple(self.mesh))
        for k, (rows, n_real) in enumerate(batches):
            tiled = [self.tiles(self.cfg, pictures[r]) for r in rows]
            slots = tile_bucket(max(t.num_tiles for t in tiled), self.cfg.tile_slots)
            prompts = [self.prompt_ids(questions[r], t.num_tiles) for r, t in zip(rows, tiled)]
            tokens, mask = left_pad(prompts, self.tokenizer.pad_id, bucket_length(max(map(len, prompts))))
            pixels = np.stack([t.pixels[:slots] for t in tiled])
            if not self._placed:
                self.params, self._placed = placed_params(self.mesh, self.model, self.params, (tokens, pixels)), True
            new = np.asarray(greedy_generate_hovle(
                self.model, self.params, tokens, mask, pixels,
                self.max_new_tokens, self.stops, tile_mask=np.stack([t.tile_mask[:slots] for t in tiled]),
                sampling=self.sampling, rng=jax.random.fold_in(jax.random.PRNGKey(self.seed), k), mesh=self.mesh))
            answers += [decode_answer(_until(row, self.stops), self.tokenizer) for row in new[:n_real].tolist()]
        return answers


def _until(ids, stops):
    """ids up to (not including) the first stop id."""
    cut = [ids.index(s) for s in stops if s in ids]
    return ids[:min(cut)] if cut else ids


def hovle_tokenizer(directory):
    """(SentencePieceTokenizer, special ids) of the tokenizer files a HoVLE checkpoint carries:
    tokenizer.model, and added_tokens.json's ids over INTERNLM2_SPECIAL_IDS."""
    import json
    import tempfile
    from pathlib import Path

    from evejax.data import text as text_lib
    from evejax.port import hovle as hovle_port
    from evejax.port.io import CheckpointError

    files = hovle_port.load_tokenizer_files(directory)
    if "tokenizer.model" not in files:
        raise CheckpointError(f"{directory} carries no tokenizer.model (import the official directory with its "
                              "tokenizer files, or pass --tokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.model"
        path.write_bytes(files["tokenizer.model"])
        tokenizer = text_lib.SentencePieceTokenizer(path)
    added = json.loads(files.get("added_tokens.json", b"{}"))
    special = {k: int(added.get(k, v)) for k, v in text_lib.INTERNLM2_SPECIAL_IDS.items()}
    return tokenizer, special


HOVLE_BATCH = 8  # questions decoded together (buckets: rows, prompt width, tile slots)


def _hovle_answerer(path, cfg, params, tokenizer, max_new_tokens, **kw):
    from evejax.data import pipeline
    from evejax.port import checkpoint

    if tokenizer is None:
        if checkpoint.is_workdir(path):
            raise ValueError("a training workdir carries no tokenizer: pass --tokenizer (the LLM's tokenizer.model)")
        return HoVLEAnswerer(cfg, params, *hovle_tokenizer(path), max_new_tokens=max_new_tokens,
                             batch_size=HOVLE_BATCH, **kw)
    made = pipeline.make_tokenizer(tokenizer)  # the special ids its training data used
    return HoVLEAnswerer(cfg, params, made, pipeline.special_ids(tokenizer, made), max_new_tokens=max_new_tokens,
                         batch_size=HOVLE_BATCH, **kw)


EVE_BATCH = 16  # questions decoded together (left-padded, one compilation per prompt bucket)


def _eve_answerer(path, cfg, params, tokenizer, max_new_tokens, **kw):
    from evejax.data import pipeline
    from evejax.eval import evaluate

    if tokenizer is None:
        raise ValueError("an EVE checkpoint carries no tokenizer: pass --tokenizer (the LLM's tokenizer.model, "
                         "or 'shapes' for a model trained on the generated shapes data)")
    return evaluate.Answerer(cfg, params, batch_size=EVE_BATCH, tokenizer=pipeline.make_tokenizer(tokenizer),
                             max_new_tokens=max_new_tokens, **kw)


# evejax.eval.evaluate.FAMILIES name -> answerer builder
ANSWERERS = {"eve": _eve_answerer, "hovle": _hovle_answerer}


def load_answerer(path, tokenizer: str | None = None, max_new_tokens: int = 64, sampling: Sampling | None = None,
                  seed: int = 0, mesh=None):
    """The answerer (`.answer(pictures, questions) -> answers`) of an EVE or HoVLE checkpoint
    directory or training workdir. `tokenizer`: a tokenizer.model path or "shapes"; by default the
    one the checkpoint carries (HoVLE). `sampling`, `seed`, `mesh`: greedy_generate's (any number of
    questions: each batch is padded to the mesh's data-parallel devices)."""
    from evejax.eval import evaluate
    from evejax.port.io import CheckpointError

    try:
        name, cfg, params = evaluate.load_model(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; --image/--prompt answer with those, --prompt-ids generates with an LLM") from None
    return ANSWERERS[name](path, cfg, params, tokenizer, max_new_tokens, sampling=sampling, seed=seed, mesh=mesh)


def main(argv) -> int:
    from evejax.data.image import load_image
    from evejax.models.llm import CausalLM
    from evejax.port.io import CheckpointError

    p = argparse.ArgumentParser(prog="evejax generate",
                                description="generation from a checkpoint (greedy, or sampled with --temperature): "
                                "an LLM's new token ids for --prompt-ids, or an EVE's or HoVLE's answer for --image "
                                "and --prompt")
    p.add_argument("checkpoint", help="evejax checkpoint directory (model.json + params/) or training "
                   "workdir (its newest checkpoint; with --prompt-ids, for an EVE the LLM alone)")
    p.add_argument("--prompt-ids", type=_token_ids, action="append",
                   help="comma-separated prompt token ids; repeat for a batch")
    p.add_argument("--image", help="image file to ask about (EVE and HoVLE)")
    p.add_argument("--prompt", help="question about --image; prints the answer")
    p.add_argument("--tokenizer", help="with --prompt: tokenizer.model or 'shapes' (default: the checkpoint's, "
                   "HoVLE)")
    p.add_argument("--max-new", type=int, default=16, help="number of tokens to generate")
    p.add_argument("--eos-id", type=int, help="stop token (default: the model's eos id)")
    p.add_argument("--no-eos", action="store_true", help="always generate --max-new tokens")
    add_sampling_args(p)
    add_mesh_arg(p)
    args = p.parse_args(argv)
    sampling = sampling_from_args(p, args)
    if args.max_new < 1:
        p.error("--max-new must be >= 1")
    if (args.image is None) != (args.prompt is None):
        p.error("--image and --prompt go together")
    if (args.prompt is None) == (args.prompt_ids is None):
        p.error("give either --prompt-ids or --image with --prompt")
    try:
        mesh = mesh_from_arg(args.mesh)
    except ValueError as e:
        print(f"evejax generate: error: --mesh: {e}", file=sys.stderr)
        return 1
    if args.prompt is not None:
        try:
            answerer = load_answerer(args.checkpoint, args.tokenizer, args.max_new, sampling, args.sample_seed, mesh)
            picture = load_image(args.image)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError and BadImageError included
            print(f"evejax generate: error: {e}", file=sys.stderr)
            return 1
        print(answerer.answer([picture], [args.prompt])[0])
        return 0
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
    rows, n_real = next(padded_batches(len(args.prompt_ids), len(args.prompt_ids), row_multiple(mesh)))
    tokens, mask = left_pad([args.prompt_ids[r] for r in rows], cfg.pad_id)
    out = np.asarray(greedy_generate(CausalLM(cfg), params, tokens, mask, args.max_new, eos, sampling=sampling,
                                     rng=jax.random.PRNGKey(args.sample_seed), mesh=mesh))
    for row in out[:n_real].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        print(",".join(map(str, row)))
    return 0
