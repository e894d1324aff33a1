"""Compact PyTorch reference of InternLM2ForCausalLM with the official parameter names.

Written from the facts of the official remote code (``modeling_internlm2.py`` of the
InternLM2 Hugging Face repos, also shipped with HoVLE); used to prove that the Flax
model and the weight converters agree with the official layout.

Parameters (B = batch, L = length, D = hidden_size, H = heads, K = KV heads,
G = H / K, d = head_dim = D / H, F = intermediate_size, V = vocab_size)::

    model.tok_embeddings.weight                    [V, D]
    model.layers.{i}.attention_norm.weight         [D]
    model.layers.{i}.attention.wqkv.weight         [(H + 2K) d, D]
    model.layers.{i}.attention.wqkv.bias           [(H + 2K) d]   (config.bias)
    model.layers.{i}.attention.wo.weight           [D, H d]
    model.layers.{i}.attention.wo.bias             [D]            (config.bias)
    model.layers.{i}.ffn_norm.weight               [D]
    model.layers.{i}.feed_forward.w1.weight        [F, D]   gate
    model.layers.{i}.feed_forward.w3.weight        [F, D]   up
    model.layers.{i}.feed_forward.w2.weight        [D, F]   down
    model.norm.weight                              [D]
    output.weight                                  [V, D]   (not tied)

The fused ``wqkv`` rows are grouped by KV head: reshaped to ``[K, G + 2, d, D]``,
slots ``0..G-1`` of group ``k`` are query heads ``k G .. k G + G - 1``, slot ``G``
is key head ``k`` and slot ``G + 1`` is value head ``k``.

``InternLM2ForCausalLM.forward`` takes ``input_ids`` [B, L] or ``inputs_embeds``
[B, L, D] and an optional padding mask [B, S] (1 = token, 0 = padding; S = cached + L)
and returns float32 logits [B, L, V]; with ``output_hidden_states`` also a tuple of
``layers + 1`` tensors [B, L, D]: the input of every layer, then the final *normed*
output, as the official code returns them. ``past_key_values`` is the KV cache: a list,
empty at first, that each forward extends with every layer's keys (after RoPE) and
values [B, K, S, d]. ``generate`` is greedy decoding with that cache, as the official
model under transformers' ``generate``, or by full recomputation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    raise ImportError("the PyTorch InternLM2 reference needs PyTorch: pip install 'evejax[torch]'") from None

# The pad id of the InternLM2 tokenizer (hovle.md §1.3); its config.json carries it.
PAD_TOKEN_ID = 2
ROPE_SCALINGS = ("linear", "dynamic")


@dataclasses.dataclass(frozen=True)
class InternLM2Config:
    """The fields the official modeling code reads, with the official class defaults
    (``configuration_internlm2.py``, an InternLM2-7B-like shape) for missing keys."""
    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads
    hidden_act: str = "silu"  # a transformers ACT2FN name
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    bias: bool = True  # on wqkv and wo only; the MLP never has one
    rope_theta: float = 10000.0
    # None or {"type": "linear" | "dynamic", "factor": f >= 1}, exactly these two keys.
    rope_scaling: Mapping[str, Any] | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0  # the embedding's padding_idx

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        scaling = self.rope_scaling
        if scaling is not None and not (
            isinstance(scaling, Mapping) and set(scaling) == {"type", "factor"}
            and scaling["type"] in ROPE_SCALINGS and isinstance(scaling["factor"], (int, float))
            and scaling["factor"] >= 1
        ):
            raise ValueError(
                f"rope_scaling must be None or {{'type': one of {ROPE_SCALINGS}, 'factor': f >= 1}}, got {scaling}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls) -> "InternLM2Config":
        """Two layers with GQA (4 query heads over 2 KV heads) and dynamic NTK that
        switches on above 32 tokens, so tests can cross the threshold cheaply."""
        return cls(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            bias=False,
            rope_theta=10_000.0,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            max_position_embeddings=32,
            pad_token_id=PAD_TOKEN_ID,
        )

    @classmethod
    def internlm2_1_8b(cls) -> "InternLM2Config":
        """InternLM2-chat-1.8B as used by HoVLE / InternVL (hovle.md §1.3); the
        vocabulary includes the 9 added image tokens (the bare LLM has 92544)."""
        return cls(
            vocab_size=92553,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            bias=False,
            rope_theta=1_000_000.0,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            max_position_embeddings=32768,
            pad_token_id=PAD_TOKEN_ID,
        )

    def to_hf_config_dict(self) -> dict[str, Any]:
        """config.json contents as the official InternLM2 repos write them (remote code)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            },
            "attn_implementation": "eager",
            **fields,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }

    @classmethod
    def from_hf_config_dict(cls, config: Mapping[str, Any]) -> "InternLM2Config":
        """Reads an official InternLM2 config.json (or HoVLE's ``llm_config``); missing keys
        take the official defaults."""
        if config.get("model_type", "internlm2") != "internlm2":
            raise ValueError(f"expected an internlm2 config, got model_type {config.get('model_type')!r}")
        if config.get("tie_word_embeddings", False):
            raise ValueError("InternLM2 configs with tie_word_embeddings=True are not supported")
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: config[name] for name in fields if name in config})

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official state-dict names -> shapes (the ``expected`` of ``io.check_state_dict``)."""
        D, F, V, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        H, K = self.num_attention_heads, self.num_key_value_heads
        shapes = {"model.tok_embeddings.weight": (V, D)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "attention.wqkv.weight"] = ((H + 2 * K) * d, D)
            if self.bias:
                shapes[p + "attention.wqkv.bias"] = ((H + 2 * K) * d,)
            shapes[p + "attention.wo.weight"] = (D, H * d)
            if self.bias:
                shapes[p + "attention.wo.bias"] = (D,)
            shapes[p + "feed_forward.w1.weight"] = (F, D)
            shapes[p + "feed_forward.w3.weight"] = (F, D)
            shapes[p + "feed_forward.w2.weight"] = (D, F)
            shapes[p + "attention_norm.weight"] = (D,)
            shapes[p + "ffn_norm.weight"] = (D,)
        shapes["model.norm.weight"] = (D,)
        shapes["output.weight"] = (V, D)
        return shapes


def rope_base(config: InternLM2Config, seq_len: int) -> float:
    """RoPE base for a forward pass over ``seq_len`` tokens (cached + new, padding included:
    the official attention passes ``kv_seq_len``).

    Dynamic NTK (official): above ``max_position_embeddings`` the base grows to
    ``theta * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2))``; at or
    below it the plain ``theta`` is used, so short inputs are unaffected. Under the
    cache only the new tokens are rotated with it; cached keys keep the base of the
    forward that wrote them. The official module caches its tables and never shrinks
    them, so after one long input it keeps the enlarged base for later shorter ones;
    this reference is stateless and matches a freshly loaded official model (within
    one ``generate`` the length only grows, so the two agree there).
    """
    if (config.rope_scaling or {}).get("type") != "dynamic" or seq_len <= config.max_position_embeddings:
        return config.rope_theta
    factor = float(config.rope_scaling["factor"])
    d = config.head_dim
    ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
    return config.rope_theta * ratio ** (d / (d - 2))


def rotary_cos_sin(config: InternLM2Config, position_ids: torch.Tensor, seq_len: int):
    """cos, sin [B, L, d] for positions [B, L], non-interleaved ("rotate half") layout.

    Linear scaling (official) divides the positions by the factor.
    """
    d = config.head_dim
    base = rope_base(config, seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    positions = position_ids.float()
    if (config.rope_scaling or {}).get("type") == "linear":
        positions = positions / config.rope_scaling["factor"]
    freqs = positions[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even for bf16 activations; the scale multiplies
        # after the cast back, as in the official code.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        H, K, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, (H + 2 * K) * d, bias=config.bias)
        self.wo = nn.Linear(H * d, config.hidden_size, bias=config.bias)

    def forward(self, x, cos, sin, allowed, cache: list):
        """x [B, L, D], cos/sin [B, L, d], allowed [B, 1, L, S] bool -> [B, L, D].

        ``cache`` holds this layer's earlier keys and values ([] or [(k, v)], each
        [B, K, S - L, d]); they are replaced by the extended ones.
        """
        B, L, _ = x.shape
        H, K, d = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        G = H // K
        qkv = self.wqkv(x).view(B, L, K, G + 2, d)
        q = qkv[..., :G, :].reshape(B, L, H, d).transpose(1, 2)  # query head = k * G + slot
        k = qkv[..., G, :].transpose(1, 2)
        v = qkv[..., G + 1, :].transpose(1, 2)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache:
            k, v = torch.cat([cache[0][0], k], dim=2), torch.cat([cache[0][1], v], dim=2)
        cache[:] = [(k, v)]
        # Query head h reads KV head h // G.
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, L, H * d)
        return self.wo(out)


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        try:  # the official MLP looks its activation up here
            from transformers.activations import ACT2FN
        except ImportError:
            raise ImportError("the InternLM2 reference MLP needs transformers' ACT2FN: "
                              "pip install 'evejax[torch]'") from None
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, allowed, cache):
        h = h + self.attention(self.attention_norm(h), cos, sin, allowed, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class InternLM2Model(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        # padding_idx as official: the pad row starts at zero and gets no gradient.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # The official initialisation: N(0, initializer_range) for Linear and Embedding,
        # biases and the pad row zeroed.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        with torch.no_grad():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list | None = None,
    ):
        """Logits [B, L, V] float32, or (logits, hidden_states) — see the module docstring.

        ``position_ids`` [B, L] defaults to ``P..P+L-1`` for every row (P cached
        tokens), as in the official forward; pass them for left-padded batches.
        Outputs at padded query positions are finite but meaningless.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.model.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = h.shape
        caches = past_key_values if past_key_values is not None else []
        if not caches:
            caches[:] = [[] for _ in self.model.layers]
        P = caches[0][0][0].shape[2] if caches[0] else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + L, device=h.device).expand(B, L)
        cos, sin = rotary_cos_sin(self.config, position_ids, seq_len=P + L)

        allowed = torch.ones(L, P + L, dtype=torch.bool, device=h.device).tril(P)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]

        hidden_states = []
        for layer, cache in zip(self.model.layers, caches):
            hidden_states.append(h)
            h = layer(h, cos, sin, allowed, cache)
        h = self.model.norm(h)
        hidden_states.append(h)
        logits = self.output(h).float()
        return (logits, tuple(hidden_states)) if output_hidden_states else logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding: [B, L] -> [B, L + n].

        With ``use_cache`` the prompt runs once and then one token per step, as the
        official model does under transformers' ``generate``; without, the whole
        sequence is recomputed each step (``use_cache=False`` there). The two differ
        once dynamic NTK scaling is active. Batches are left-padded (mask 0 on the
        left); positions count real tokens only, as transformers' generation derives
        them from the mask. Rows that emitted ``eos_token_id`` keep emitting it;
        decoding stops early once all have.
        """
        B = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        cache = [] if use_cache else None
        for step in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            new = slice(-1, None) if use_cache and step else slice(None)
            logits = self(input_ids[:, new], attention_mask=mask, position_ids=position_ids[:, new],
                          past_key_values=cache)
            next_token = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            input_ids = torch.cat([input_ids, next_token[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return input_ids
