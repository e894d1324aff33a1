"""Porting as data: tables mapping official PyTorch names to Flax parameter paths.

A table is a list of `Row`s. A row names one PyTorch tensor (a pattern with
`{i}` for the layer index of a scanned stack), one or more Flax parameter
paths, and a `Transform` with its inverse. The same rows drive both
directions:

    to_flax(state_dict, cfg) -> params      (numpy, the tree `CausalLM.init` makes)
    to_torch(params, cfg)    -> state_dict  (numpy, PyTorch layouts)

Shapes (D model width, N query heads, K KV heads, H head dim, F MLP width,
V vocabulary, L layers, G = N / K):

    PyTorch Linear weight [out, in]  <-> Flax kernel [*in_dims, *out_dims]
        q/k/v_proj [N H | K H, D]    <-> query/key/value kernel [D, N | K, H]
        o_proj [D, N H]              <-> out kernel [N, H, D]
    InternLM2 wqkv [(N + 2K) H, D]   <-> query [D, N, H], key [D, K, H], value [D, K, H]
        (rows grouped per KV head k: its G query heads, then key k, then value k;
        its bias [(N + 2K) H] <-> [N, H], [K, H], [K, H] likewise)
    per-layer tensors (pattern with `{i}`) <-> one array with a leading [L] axis
    embeddings and norm scales are copied as they are.

The Flax side is never written by hand: target shapes come from
`jax.eval_shape` of the module's init, so a table plus a config gives the
complete list of expected PyTorch names and shapes, and every mismatch in a
state dict is reported at once before anything is converted.

Tables for bigger models reuse these: `prefixed(internlm2_layer_rows(),
"embedding_model.encoder.{i}.", "embedding/layers")` is HoVLE's embedding
stack; a model's table is LLM rows under a prefix plus its own rows.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evejax.models.llm import CausalLM, LMConfig
from evejax.nn.transformer import TransformerConfig
from evejax.port.io import CheckpointError, check_state_dict
from evejax.sharding import unbox

Shape = tuple[int, ...]
Path = tuple[str, ...]

# Buffers some PyTorch checkpoints carry that are recomputed from the config.
IGNORED_TORCH_NAMES = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, invertible map between one PyTorch tensor and one or more Flax arrays.

    `to_flax(tensor, flax_shapes) -> [arrays]`, `to_torch([arrays]) -> tensor`,
    `torch_shape(flax_shapes) -> shape`. Shapes here are per layer (no [L] axis).
    """
    name: str
    to_flax: Callable[[np.ndarray, Sequence[Shape]], list[np.ndarray]]
    to_torch: Callable[[Sequence[np.ndarray]], np.ndarray]
    torch_shape: Callable[[Sequence[Shape]], Shape]


IDENTITY = Transform(
    "identity",
    to_flax=lambda t, shapes: [t],
    to_torch=lambda arrays: arrays[0],
    torch_shape=lambda shapes: tuple(shapes[0]),
)

# A bias over heads: [N H] <-> [N, H].
FLAT_BIAS = Transform(
    "flat_bias",
    to_flax=lambda t, shapes: [t.reshape(shapes[0])],
    to_torch=lambda arrays: arrays[0].reshape(-1),
    torch_shape=lambda shapes: (math.prod(shapes[0]),),
)


def unit_axes(n: int) -> Transform:
    """PyTorch's `n` leading unit axes (nn.Parameter [1, ..., X]) <-> the array without them."""
    return Transform(f"unit_axes_{n}",
                     to_flax=lambda t, shapes: [t.reshape(shapes[0])],
                     to_torch=lambda arrays: arrays[0].reshape((1,) * n + arrays[0].shape),
                     torch_shape=lambda shapes: (1,) * n + tuple(shapes[0]))


def linear(num_in_dims: int = 1) -> Transform:
    """Linear weight [out, in] <-> kernel [*in_dims, *out_dims] with `num_in_dims` input dims.

    Flattened dims are row-major, so head-major `N H` rows or columns (the
    PyTorch convention) become separate [N, H] dims.
    """
    def split(shape):
        return math.prod(shape[:num_in_dims]), math.prod(shape[num_in_dims:])

    return Transform(
        f"linear_{num_in_dims}in",
        to_flax=lambda t, shapes: [t.T.reshape(shapes[0])],
        to_torch=lambda arrays: arrays[0].reshape(split(arrays[0].shape)).T,
        torch_shape=lambda shapes: split(shapes[0])[::-1],
    )


LINEAR = linear(1)
LINEAR_FROM_HEADS = linear(2)  # o_proj / wo: input is the [N, H] heads


# The fused weight has a D axis the bias lacks: Flax keeps it first ([D, heads, H]),
# PyTorch last; a bias runs through the same code with a unit D axis.
def _wqkv_to_flax(t, shapes):
    (n, h), k = shapes[0][-2:], shapes[1][-2]
    grouped = t.reshape(k, n // k + 2, h, -1)
    parts = [grouped[:, :-2].reshape(n, h, -1), grouped[:, -2], grouped[:, -1]]
    return [np.moveaxis(p, -1, 0).reshape(shape) for p, shape in zip(parts, shapes)]


def _wqkv_to_torch(arrays):
    q, k, v = (np.moveaxis(a.reshape(-1, *a.shape[-2:]), 0, -1) for a in arrays)  # [heads, H, D or 1]
    grouped = np.concatenate([q.reshape(k.shape[0], -1, *q.shape[1:]), k[:, None], v[:, None]], axis=1)
    flat = grouped.reshape(-1, grouped.shape[-1])
    return flat if arrays[0].ndim == 3 else flat[:, 0]


# InternLM2's fused projection (weight or bias), rows grouped per KV head (hovle.md §4.3).
GROUPED_WQKV = Transform(
    "grouped_wqkv",
    to_flax=_wqkv_to_flax,
    to_torch=_wqkv_to_torch,
    torch_shape=lambda shapes: ((shapes[0][-2] + 2 * shapes[1][-2]) * shapes[0][-1], *shapes[0][:-2]),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """`torch` name pattern -> `flax` paths ("a/b/c" strings) through `transform`.

    A pattern containing `{i}` is one tensor per layer; its Flax arrays carry
    the layers on a leading axis.
    """
    torch: str
    flax: str | tuple[str, ...]
    transform: Transform = IDENTITY

    def __post_init__(self):
        if isinstance(self.flax, str):
            object.__setattr__(self, "flax", (self.flax,))

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(tuple(p.split("/")) for p in self.flax)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.torch


def prefixed(rows: Sequence[Row], torch_prefix: str = "", flax_prefix: str = "") -> list[Row]:
    """The same rows under a PyTorch name prefix and a Flax path prefix."""
    join = (lambda p: f"{flax_prefix.strip('/')}/{p}") if flax_prefix else (lambda p: p)
    return [dataclasses.replace(r, torch=torch_prefix + r.torch, flax=tuple(join(p) for p in r.flax))
            for r in rows]


# ---- tables ---------------------------------------------------------------------------

def llama_layer_rows(t: TransformerConfig) -> list[Row]:
    """One HF LlamaDecoderLayer (names relative to `model.layers.{i}.`, in its state-dict order)."""
    rows = []
    for name, path, with_bias in (("q", "query", t.qkv_bias), ("k", "key", t.qkv_bias),
                                  ("v", "value", t.qkv_bias)):
        rows.append(Row(f"self_attn.{name}_proj.weight", f"attention/{path}/kernel", LINEAR))
        if with_bias:
            rows.append(Row(f"self_attn.{name}_proj.bias", f"attention/{path}/bias", FLAT_BIAS))
    rows.append(Row("self_attn.o_proj.weight", "attention/out/kernel", LINEAR_FROM_HEADS))
    if t.out_bias:
        rows.append(Row("self_attn.o_proj.bias", "attention/out/bias"))
    for name, path in (("gate", "wi_gate"), ("up", "wi_up"), ("down", "wo")):
        rows.append(Row(f"mlp.{name}_proj.weight", f"mlp/{path}/kernel", LINEAR))
        if t.mlp_bias:
            rows.append(Row(f"mlp.{name}_proj.bias", f"mlp/{path}/bias"))
    return rows + [Row("input_layernorm.weight", "attention_norm/scale"),
                   Row("post_attention_layernorm.weight", "mlp_norm/scale")]


def internlm2_layer_rows(bias: bool = False) -> list[Row]:
    """One official InternLM2DecoderLayer (names relative to `model.layers.{i}.`, in its state-dict order);
    `bias` is the config's: wqkv and wo biases."""
    qkv = lambda leaf: tuple(f"attention/{name}/{leaf}" for name in ("query", "key", "value"))  # noqa: E731
    return [
        Row("attention.wqkv.weight", qkv("kernel"), GROUPED_WQKV),
        *([Row("attention.wqkv.bias", qkv("bias"), GROUPED_WQKV)] if bias else []),
        Row("attention.wo.weight", "attention/out/kernel", LINEAR_FROM_HEADS),
        *([Row("attention.wo.bias", "attention/out/bias")] if bias else []),
        Row("feed_forward.w1.weight", "mlp/wi_gate/kernel", LINEAR),
        Row("feed_forward.w3.weight", "mlp/wi_up/kernel", LINEAR),
        Row("feed_forward.w2.weight", "mlp/wo/kernel", LINEAR),
        Row("attention_norm.weight", "attention_norm/scale"),
        Row("ffn_norm.weight", "mlp_norm/scale"),
    ]


def llama_rows(cfg: LMConfig) -> list[Row]:
    """HF LlamaForCausalLM (Vicuna) <-> CausalLM."""
    return ([Row("model.embed_tokens.weight", "embed_tokens/embedding")]
            + prefixed(llama_layer_rows(cfg.transformer), "model.layers.{i}.", "decoder/layers")
            + [Row("model.norm.weight", "final_norm/scale"),
               Row("lm_head.weight", "lm_head/kernel", LINEAR)])


def internlm2_rows(cfg: LMConfig) -> list[Row]:
    """Official InternLM2ForCausalLM <-> CausalLM."""
    return ([Row("model.tok_embeddings.weight", "embed_tokens/embedding")]
            + prefixed(internlm2_layer_rows(cfg.transformer.qkv_bias), "model.layers.{i}.", "decoder/layers")
            + [Row("model.norm.weight", "final_norm/scale"),
               Row("output.weight", "lm_head/kernel", LINEAR)])


TABLES: dict[str, Callable[[LMConfig], list[Row]]] = {"llama": llama_rows, "internlm2": internlm2_rows}


def table(cfg: LMConfig) -> list[Row]:
    if cfg.family not in TABLES:
        raise CheckpointError(f"no port table for family {cfg.family!r}; known: {sorted(TABLES)}")
    return TABLES[cfg.family](cfg)


# ---- the machinery, shared by every table ---------------------------------------------

def _get(tree: Mapping, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flat_paths(tree: Mapping) -> dict[Path, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(k.key for k in keypath): leaf for keypath, leaf in leaves}


def _check_coverage(rows: Sequence[Row], abstract: Mapping) -> None:
    """Every Flax parameter is produced by exactly one row, and every row's path exists.

    A failure is a bug in a table (or a config the table does not handle), not
    in the user's checkpoint.
    """
    have = set(_flat_paths(abstract))
    claimed = [p for r in rows for p in r.paths]
    unknown = sorted("/".join(p) for p in set(claimed) - have)
    unmapped = sorted("/".join(p) for p in have - set(claimed))
    doubled = sorted("/".join(p) for p in {p for p in claimed if claimed.count(p) > 1})
    if unknown or unmapped or doubled:
        raise ValueError(f"port table does not fit the model: paths not in the model {unknown}, "
                         f"parameters no row maps {unmapped}, paths mapped twice {doubled}")


def _layers(row: Row, abstract: Mapping) -> int:
    return _get(abstract, row.paths[0]).shape[0]


def _torch_names(row: Row, abstract: Mapping) -> list[str]:
    if row.per_layer:
        return [row.torch.format(i=i) for i in range(_layers(row, abstract))]
    return [row.torch]


def _layer_shapes(row: Row, abstract: Mapping) -> list[Shape]:
    shapes = [tuple(_get(abstract, p).shape) for p in row.paths]
    return [s[1:] for s in shapes] if row.per_layer else shapes


def expected_torch_shapes(rows: Sequence[Row], abstract: Mapping) -> dict[str, Shape]:
    """PyTorch name -> shape for every tensor the table expects, in checkpoint order.

    `abstract` is the (unboxed) Flax parameter tree of shapes. Runs of per-layer
    rows are listed layer by layer, as PyTorch modules order their state dicts.
    """
    out = {}
    stack = lambda r: r.torch.partition("{i}")[0] if r.per_layer else None
    for prefix, group in itertools.groupby(rows, key=stack):
        group = list(group)
        if prefix is None:
            for r in group:
                out[r.torch] = r.transform.torch_shape(_layer_shapes(r, abstract))
            continue
        for i in range(max(_layers(r, abstract) for r in group)):
            for r in group:
                if i < _layers(r, abstract):
                    out[r.torch.format(i=i)] = r.transform.torch_shape(_layer_shapes(r, abstract))
    return out


def convert_to_flax(rows: Sequence[Row], state: Mapping[str, Any], abstract: Mapping,
                    source: str | None = None) -> dict:
    """PyTorch state dict -> Flax params shaped and typed like `abstract`.

    Checks the whole state dict first and raises one CheckpointError listing
    every missing, unexpected and mis-shaped tensor.
    """
    _check_coverage(rows, abstract)
    state = {k: v for k, v in state.items() if not IGNORED_TORCH_NAMES.search(k)}
    check_state_dict(expected_torch_shapes(rows, abstract), state, source)
    params: dict = {}
    for r in rows:
        shapes = _layer_shapes(r, abstract)
        per_name = [r.transform.to_flax(np.asarray(state[n]), shapes) for n in _torch_names(r, abstract)]
        for j, path in enumerate(r.paths):
            arrays = [outs[j] for outs in per_name]
            value = np.stack(arrays) if r.per_layer else arrays[0]
            _set(params, path, np.ascontiguousarray(value, dtype=_get(abstract, path).dtype))
    return params


def convert_to_torch(rows: Sequence[Row], params: Mapping, abstract: Mapping) -> dict[str, np.ndarray]:
    """Flax params (boxed or not) -> PyTorch state dict (numpy), after checking them against `abstract`."""
    _check_coverage(rows, abstract)
    params = unbox(params)
    flat = {"/".join(p): v for p, v in _flat_paths(params).items()}
    check_state_dict({"/".join(p): v.shape for p, v in _flat_paths(abstract).items()}, flat,
                     "the evejax parameters")
    by_name = {}
    for r in rows:
        arrays = [np.asarray(_get(params, p)) for p in r.paths]
        for i, name in enumerate(_torch_names(r, abstract)):
            by_name[name] = (r, [a[i] for a in arrays] if r.per_layer else arrays)
    return {name: np.ascontiguousarray(by_name[name][0].transform.to_torch(by_name[name][1]))
            for name in expected_torch_shapes(rows, abstract)}


# ---- LM entry points ------------------------------------------------------------------

def abstract_params(cfg: LMConfig) -> dict:
    """CausalLM's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    init = lambda: CausalLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return unbox(jax.eval_shape(init))


def to_flax(state: Mapping[str, Any], cfg: LMConfig, source: str | None = None) -> dict:
    """Official PyTorch state dict of `cfg.family` -> CausalLM params (numpy)."""
    return convert_to_flax(table(cfg), state, abstract_params(cfg), source)


def to_torch(params: Mapping, cfg: LMConfig) -> dict[str, np.ndarray]:
    """CausalLM params -> official PyTorch state dict of `cfg.family` (numpy)."""
    return convert_to_torch(table(cfg), params, abstract_params(cfg))


def grow_vocab(params: Mapping, cfg: LMConfig, vocab_size: int) -> tuple[dict, LMConfig]:
    """(params, cfg) with `vocab_size` rows: the new rows of the input embedding and of the LM
    head are the mean of the existing ones, the rule LLaVA-style fine-tuning code uses for added
    tokens (InternVL2's and HoVLE's InternLM2 have 92553 rows: InternLM2-chat's 92544 + 9 added)."""
    if vocab_size < cfg.vocab_size:
        raise CheckpointError(f"--vocab-size {vocab_size} is below the checkpoint's {cfg.vocab_size} rows; "
                              "rows are only added, never cut")
    extra = vocab_size - cfg.vocab_size
    embedding = np.asarray(params["embed_tokens"]["embedding"])
    head = np.asarray(params["lm_head"]["kernel"])
    grown = dict(params, embed_tokens={"embedding": np.concatenate(
                     [embedding, np.repeat(embedding.mean(0, keepdims=True), extra, 0)], 0)},
                 lm_head={"kernel": np.concatenate([head, np.repeat(head.mean(1, keepdims=True), extra, 1)], 1)})
    return grown, cfg.replace(vocab_size=vocab_size)


# ---- config.json <-> LMConfig ---------------------------------------------------------

# evejax activation name -> the transformers ACT2FN name export writes; reading also
# takes the ACT2FN aliases of the same functions.
_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                   "quick_gelu": "quick_gelu"}
_FROM_HF_ACTIVATIONS = {**{hf: name for name, hf in _HF_ACTIVATIONS.items()},
                        "swish": "silu", "gelu_python": "gelu", "gelu_new": "gelu_tanh"}
_SCALINGS = ("linear", "dynamic")


def _activation(hidden_act) -> str:
    if hidden_act not in _FROM_HF_ACTIVATIONS:
        raise CheckpointError(f"config.json: hidden_act {hidden_act!r} is not supported; "
                              f"use one of {sorted(_FROM_HF_ACTIVATIONS)}")
    return _FROM_HF_ACTIVATIONS[hidden_act]


def _rope_scaling(kind, factor, where: str):
    if kind in (None, "default"):
        return None
    if kind not in _SCALINGS:
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported; evejax has {_SCALINGS}")
    return (("type", kind), ("factor", float(factor)))


def _first_id(value, default):
    if value is None:
        return default
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _check_family(config: Mapping[str, Any], family: str) -> None:
    model_type = config.get("model_type")
    if model_type is not None and model_type != family:
        raise CheckpointError(f"config.json has model_type {model_type!r}, but family {family!r} was asked "
                              f"for; pass --family {model_type} if that is what the checkpoint is")


def _llama_from_hf(c: Mapping[str, Any]) -> LMConfig:
    _check_family(c, "llama")
    if c.get("tie_word_embeddings", False):
        raise CheckpointError("config.json: tie_word_embeddings=true is not supported (CausalLM keeps a "
                              "separate lm_head)")
    act = _activation(c.get("hidden_act", "silu"))
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = c.get("rope_parameters") or {}
    legacy = c.get("rope_scaling") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", legacy.get("rope_type", legacy.get("type")))
    scaling = _rope_scaling(kind, rope.get("factor", legacy.get("factor")), "config.json")
    heads = c["num_attention_heads"]
    t = TransformerConfig(
        num_layers=c["num_hidden_layers"], embed_dim=c["hidden_size"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
        mlp_act=act, mlp_bias=bool(c.get("mlp_bias", False)), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(c.get("attention_bias", False)), out_bias=bool(c.get("attention_bias", False)),
        rope_base=float(theta), rope_scaling=scaling,
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)))
    return LMConfig("llama", c["vocab_size"], t, bos_id=_first_id(c.get("bos_token_id"), 1),
                    eos_id=_first_id(c.get("eos_token_id"), 2), pad_id=_first_id(c.get("pad_token_id"), 0))


def _internlm2_from_hf(c: Mapping[str, Any]) -> LMConfig:
    """Every field the official modeling code reads; missing ones take the official class defaults."""
    from evejax.port.torch_ref.internlm2 import InternLM2Config

    _check_family(c, "internlm2")
    try:
        ref = InternLM2Config.from_hf_config_dict(c)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json is not a supported InternLM2 config: {e}") from None
    scaling = ref.rope_scaling or {}
    t = TransformerConfig(
        num_layers=ref.num_hidden_layers, embed_dim=ref.hidden_size, num_heads=ref.num_attention_heads,
        num_kv_heads=ref.num_key_value_heads, head_dim=ref.head_dim, mlp_dim=ref.intermediate_size,
        mlp_act=_activation(ref.hidden_act), qkv_bias=bool(ref.bias), out_bias=bool(ref.bias),
        norm_eps=float(ref.rms_norm_eps), rope_base=float(ref.rope_theta),
        rope_scaling=_rope_scaling(scaling.get("type"), scaling.get("factor"), "config.json"),
        max_position_embeddings=int(ref.max_position_embeddings))
    return LMConfig("internlm2", ref.vocab_size, t, bos_id=_first_id(ref.bos_token_id, 1),
                    eos_id=_first_id(ref.eos_token_id, 2), pad_id=_first_id(ref.pad_token_id, 0))


def config_from_hf(config: Mapping[str, Any], family: str | None = None) -> LMConfig:
    """HF config.json (as a dict) -> LMConfig; `family` defaults to its model_type."""
    family = family or config.get("model_type")
    readers = {"llama": _llama_from_hf, "internlm2": _internlm2_from_hf}
    if family not in readers:
        raise CheckpointError(f"family {family!r} is not known; use one of {sorted(readers)}")
    try:
        return readers[family](config)
    except KeyError as e:
        raise CheckpointError(f"config.json has no {e.args[0]!r}, which a {family} config needs") from None


def _exportable(cfg: LMConfig) -> None:
    t = cfg.transformer
    wrong = {name: value for name, value, ok in (
        ("norm", t.norm, t.norm == "rms"),
        ("mlp_gated", t.mlp_gated, t.mlp_gated),
        ("mlp_act", t.mlp_act, t.mlp_act in _HF_ACTIVATIONS),
        ("causal", t.causal, t.causal),
        ("rope_base", t.rope_base, t.rope_base is not None),
        ("rope_layout", t.rope_layout, t.rope_layout == "rotate_half"),
        ("qkv_bias/out_bias", (t.qkv_bias, t.out_bias), t.qkv_bias == t.out_bias),
    ) if not ok}
    if wrong:
        raise CheckpointError(f"this {cfg.family} model has no official PyTorch form: {wrong}")


def hf_config(cfg: LMConfig, dtype: str = "float32") -> dict[str, Any]:
    """LMConfig -> config.json dict for LlamaForCausalLM or the official InternLM2."""
    _exportable(cfg)
    t = cfg.transformer
    scaling = None if t.rope_scaling is None else dict(t.rope_scaling)
    if cfg.family == "internlm2":
        from evejax.port.torch_ref.internlm2 import InternLM2Config

        if t.mlp_bias or t.head_dim * t.num_heads != t.embed_dim:
            raise CheckpointError("InternLM2 has no MLP bias and needs head_dim * heads == width; "
                                  f"got mlp_bias={t.mlp_bias}, {t.head_dim} x {t.num_heads} vs {t.embed_dim}")
        try:
            ref = InternLM2Config(
                vocab_size=cfg.vocab_size, hidden_size=t.embed_dim, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads, hidden_act=_HF_ACTIVATIONS[t.mlp_act],
                max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.norm_eps,
                bias=t.qkv_bias, rope_theta=t.rope_base, rope_scaling=scaling,
                bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)
        except ValueError as e:
            raise CheckpointError(f"this internlm2 model has no official config: {e}") from None
        return {**ref.to_hf_config_dict(), "torch_dtype": dtype}
    if cfg.family != "llama":
        raise CheckpointError(f"family {cfg.family!r} has no HF config writer; use llama or internlm2")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": t.embed_dim,
        "intermediate_size": t.mlp_dim,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "hidden_act": _HF_ACTIVATIONS[t.mlp_act],
        "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope_base,
        "rope_scaling": scaling,
        "max_position_embeddings": t.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_bias": t.qkv_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "pad_token_id": cfg.pad_id,
        "torch_dtype": dtype,
    }
