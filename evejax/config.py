"""Config files are Python: `configs/eve.py:7b_stage2` calls `get_config("7b_stage2")`.

Overrides come as `--config.optim.lr=1e-4` pairs; a key that does not exist
fails with its name before anything is built, and `validate` refuses
impossible training values (a negative learning rate, zero steps) the same way.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

# key: (test, what the value must be). Keys a config does not have are not checked.
LIMITS = {
    "optim.lr": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.min_lr_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.warmup_init_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": (lambda v: v >= 0, ">= 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.clip_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "train.steps": (lambda v: v >= 1, ">= 1"),
    "train.accum_steps": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0: no EMA)"),
    "data.global_batch": (lambda v: v >= 1, ">= 1"),
    "data.seq_len": (lambda v: v >= 1, ">= 1"),
    "checkpoint.every": (lambda v: v >= 0, ">= 0 (0: only final and preemption checkpoints)"),
    "checkpoint.keep": (lambda v: v >= 1, ">= 1"),
}

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# config.data of every config whose data is a grain pipeline (evejax/data/pipeline.py documents
# the keys), so the same overrides (name, path, image_root, tokenizer, ...) work on any of them.
# No image geometry: the pipeline takes it from config.model, so the two cannot disagree.
DATA_KEYS = dict(
    name="", global_batch=0, seed=0, shuffle=True, num_epochs=0, num_workers=0, read_threads=2,
    max_bad_run=10_000, seq_len=2048, template="vicuna_v1", tokenizer="", pack=False, overlong="skip",
    with_teacher=True, with_ids=False, path="", image_root="",
    split="train", num_examples=100_000, min_side=16, max_side=64, qa_rounds="sample",
    tfds_name="imagenet2012", tfds_dir="", image_key="image", label_key="label", augment=True,
    crop_pct=0.875, rand_augment="", random_erase=0.0, mixup=0.0, cutmix=0.0, mix_prob=1.0,
    mix_switch_prob=0.5, label_smoothing=0.0, repeated_aug=1,
    distractors=0, counting_task="count", train_images=0,
)


def data_config(**values) -> dict:
    """config.data: every key of DATA_KEYS, with `values` set."""
    unknown = sorted(set(values) - set(DATA_KEYS))
    if unknown:
        raise KeyError(f"data key(s) {unknown} are not pipeline keys; known: {sorted(DATA_KEYS)}")
    return dict(DATA_KEYS, **values)


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`; a bare name like `llm.py:tiny` is looked up in configs/."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        candidate = os.path.join(REPO_CONFIGS, os.path.basename(path))
        if not os.path.exists(candidate):
            raise FileNotFoundError(f"config file {path!r} not found (also looked in {REPO_CONFIGS})")
        path = candidate
    module_spec = importlib.util.spec_from_file_location(f"evejax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `config.a.b=value` strings (leading dashes and `config.` optional)."""
    for item in overrides:
        key, eq, text = item.lstrip("-").partition("=")
        if not eq:
            raise ValueError(f"override {item!r} must look like --config.key=value")
        key = key[len("config."):] if key.startswith("config.") else key
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                have = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
                raise KeyError(f"config key {'.'.join(parts[:i + 1])!r} does not exist; "
                               f"known keys here: {have}")
            if i < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        node[parts[-1]] = _parse_value(text, current)
    return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` items from the other arguments."""
    overrides, rest = [], []
    for a in argv:
        (overrides if a.startswith("--config.") else rest).append(a)
    return overrides, rest


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first key of LIMITS whose value is impossible (NaN included)."""
    for key, (test, want) in LIMITS.items():
        node = config
        for part in key.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                break
            node = node[part]
        else:
            number = isinstance(node, (int, float)) and not isinstance(node, bool)
            if not (number and test(node)):
                raise ValueError(f"config.{key}={node!r} must be {want}")
