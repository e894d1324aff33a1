"""Builds a model family from `config.model`: the module, a loss, batch shapes and FLOPs.

Every trainer, planner and benchmark goes through `build`, so a family plugs in
by adding one entry to `FAMILIES`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp


@dataclasses.dataclass
class ModelSpec:
    module: Any                      # flax module
    init_args: tuple                 # example inputs for module.init (small shapes are fine)
    init_kwargs: dict
    loss_fn: Callable                # (params, batch, rng) -> (loss, metrics)
    batch_specs: Callable            # (batch, seq_len) -> dict of jax.ShapeDtypeStruct
    flops_per_step: Callable         # (batch, seq_len) -> MaxText-style model FLOPs
    config: Any                      # the family's dataclass config


def _build_llm(model_cfg) -> ModelSpec:
    from evejax.models import llm
    from evejax.train import losses

    overrides = dict(model_cfg.get("overrides", {}) or {})
    cfg = llm.get_config(model_cfg.size, **overrides)
    module = llm.CausalLM(cfg)
    return ModelSpec(
        module=module, init_args=(jnp.zeros((1, 8), jnp.int32),), init_kwargs={},
        loss_fn=losses.lm_loss_fn(module), batch_specs=losses.batch_specs,
        flops_per_step=lambda b, t: llm.training_flops_per_step(cfg, b, t), config=cfg)


FAMILIES: dict[str, Callable[[Any], ModelSpec]] = {"llm": _build_llm}


def build(model_cfg) -> ModelSpec:
    name = model_cfg.name
    if name not in FAMILIES:
        raise ValueError(f"config.model.name={name!r} is not known; use one of {sorted(FAMILIES)}")
    return FAMILIES[name](model_cfg)
