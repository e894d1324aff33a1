"""Decoder-only LMs (LLaMA/Vicuna, InternLM2) on next-token prediction.

  evejax train --config configs/llm.py:tiny --workdir runs/llm_tiny
  evejax plan configs/llm.py:vicuna_7b --topology v5p-64 --search

Args: tiny | llama_110m | vicuna_7b | internlm2_tiny | internlm2_1_8b.
Data is the built-in generated text (evejax/data/synthetic.py): counting and
copying patterns; the tiny model's loss falls from log(256) = 5.5 to about
4.5 in the default 60 steps.
"""
import ml_collections

SIZES = {"tiny": "llama_tiny", "llama_110m": "llama_110m", "vicuna_7b": "vicuna_7b",
         "internlm2_tiny": "internlm2_tiny", "internlm2_1_8b": "internlm2_1_8b"}
VOCAB = {"tiny": 256, "llama_110m": 32000, "vicuna_7b": 32000, "internlm2_tiny": 256,
         "internlm2_1_8b": 92553}


def get_config(arg: str = "tiny"):
    if arg not in SIZES:
        raise ValueError(f"configs/llm.py takes one of {sorted(SIZES)}, got {arg!r}")
    big = arg in ("vicuna_7b", "internlm2_1_8b")
    c = ml_collections.ConfigDict()
    c.model = dict(name="llm", size=SIZES[arg],
                   overrides=dict(dtype="bfloat16" if big else "float32", remat="full",
                                  attention_impl="splash" if big else "xla"))
    c.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1) if not big else dict(slice=1, data=1, fsdp=-1, tensor=1)
    c.data = dict(name="synthetic_text", seq_len=2048 if big else 64, global_batch=8 if not big else 256,
                  vocab_size=VOCAB[arg], seed=0)
    c.optim = dict(lr=2e-5 if big else 3e-4 if arg == "llama_110m" else 3e-3, warmup_frac=0.03,
                   schedule="cosine", min_lr_frac=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                   clip_norm=1.0, no_decay=(r".*norm.*", r".*bias", r".*embed.*"))
    c.stage = dict(name=f"llm_{arg}", trainable=(".*",), losses=dict(ce=1.0),
                   start=dict(kind="fresh", workdir="", path=""))
    c.train = dict(steps=60, accum_steps=1, seed=0, log_every=10, ema_decay=0.0,
                   peak_flops_per_device=0.0, progress_bar=True)
    c.checkpoint = dict(every=20 if not big else 1000, keep=3, async_save=True)
    return c
