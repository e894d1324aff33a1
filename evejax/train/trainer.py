"""`evejax train`: one trainer for every model and stage; what differs is config.

  evejax train --config configs/eve.py:7b_stage1 [--workdir DIR] [--config.optim.lr=1e-4 ...]

`--workdir` defaults to runs/<config file>_<arg> (runs/eve_7b_stage1). Running
the same command again resumes from the newest complete checkpoint in it:
train state, data position and RNG, so the result is the same as a run that
was never stopped. A checkpoint that does not restore is reported (step and
reason), moved to <workdir>/checkpoints_damaged/ and the next older one is
tried; one written by another model (family, size or parameter shapes) is
refused, naming both. One run at a time holds a workdir (`train.lock`, see
checkpoint.WorkdirLock). Impossible config values fail first, with their key
(config.validate). SIGTERM (Cloud TPU preemption) saves a checkpoint at the
current step and exits 0, also while the trainer waits for data (the batch is
read in a helper thread). The first batch is read before the state is built
and the step compiled: data with no good record in a whole pass stops the run
(exit 1) at once, naming the file and the skips by kind. A non-finite loss or gradient norm stops the run
(exit 1) without saving, so the last good checkpoint stays the newest.

Where a stage starts (`config.stage.start`), when its workdir has no checkpoint:
  kind="fresh"   random init from config.train.seed
  kind="stage"   the params of a finished stage's last checkpoint; `workdir` is
                 that stage's workdir, resolved against this run's parent
                 directory when relative (runs/eve_7b_stage2 -> runs/eve_7b_stage1)
  kind="import"  random init, then subtrees replaced by `evejax import` output:
                 `path` = "DIR" (whole tree) or "SUBTREE=DIR,SUBTREE=DIR,..."

Data comes from `make_data(config, process_index, process_count)`, an endless
iterator of host batches (dicts of numpy arrays) with get_state / set_state,
found from `config.data.name`: a pipeline of evejax/data/pipeline.py (llava,
shapes_caption, ...), a name in DATA_SOURCES (synthetic_text), or
"package.module:function". The step reads the batch keys of the model's
`batch_specs`; other keys (ids, statistics) stay on the host.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from evejax import config as config_lib
from evejax import sharding
from evejax.data.sources import NoGoodRecordsError
from evejax.models import registry
from evejax.train import checkpoint as ckpt_lib
from evejax.train import metrics as metrics_lib
from evejax.train import optimizer as optimizer_lib
from evejax.train import step as step_lib

# Names outside evejax/data/pipeline.py's DATA_NAMES.
DATA_SOURCES = {"synthetic_text": "evejax.data.synthetic:make_data"}
START_KINDS = ("fresh", "stage", "import")
# model.json "format" of an `evejax import` directory -> the module whose
# load_checkpoint(directory, shardings) reads it.
IMPORT_FORMATS = {"evejax.lm": "evejax.port.checkpoint", "evejax.eve": "evejax.port.eve",
                  "evejax.clip": "evejax.port.clip", "evejax.internvl": "evejax.port.internvit"}


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without saving."""


class ModelMismatchError(ValueError):
    """The workdir's checkpoints were written by a different model than the config's."""


class NoRestorableCheckpointError(RuntimeError):
    """The workdir has checkpoints, and none of them restores (all were set aside)."""


def data_source(name: str) -> Callable:
    """make_data for config.data.name: DATA_SOURCES, "package.module:function", or a pipeline name."""
    from evejax.data import pipeline

    if name in pipeline.DATA_NAMES:
        return pipeline.make_data
    target = DATA_SOURCES.get(name, name)
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"config.data.name={name!r} is not known; use one of "
                         f"{sorted(DATA_SOURCES) + list(pipeline.DATA_NAMES)} or 'module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config.data.name={name!r}: cannot load {target} ({e})") from e


def weighted_loss(loss_fn: Callable, weights: dict[str, float]) -> Callable:
    """The stage's loss: sum of weight x term over the terms the model reports in its metrics."""
    def fn(params, batch, rng):
        _, metrics = loss_fn(params, batch, rng)
        missing = sorted(set(weights) - set(metrics))
        if missing:
            raise KeyError(f"config.stage.losses names {missing}, but the model's loss reports "
                           f"{sorted(k for k in metrics if k != 'weight')}")
        return sum(w * metrics[k] for k, w in weights.items()), metrics
    return fn


def resolve_dir(path: str, workdir: str) -> epath.Path:
    """Relative stage workdirs live next to this run's workdir."""
    if "://" in path or os.path.isabs(path):
        return epath.Path(path)
    return epath.Path(workdir).parent / path


# --------------------------------------------------------------------------
# Where a stage starts.
# --------------------------------------------------------------------------
def stage_params(start, workdir: str, params_shape, param_shardings):
    """Final params of the previous stage, placed with this run's shardings."""
    previous = resolve_dir(start.workdir, workdir)
    store = ckpt_lib.Checkpoints(str(previous), read_only=True)
    step = store.latest_step()
    if step is None:
        raise FileNotFoundError(f"config.stage.start.workdir: {previous} has no checkpoint; "
                                "run the previous stage first (or set the right workdir)")
    planned = store.config(step)["train"]["steps"]
    if step < planned:
        raise ValueError(f"the previous stage in {previous} stopped at step {step} of {planned}; "
                         "run its command again to finish it before starting this stage")
    params = store.restore_params(step, params_shape, param_shardings)
    store.close()
    return params, f"params of {previous} at step {step}"


def load_imported(directory: str, shardings):
    """(cfg, params) of an `evejax import` directory, restored straight onto `shardings`."""
    path = epath.Path(directory) / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"config.stage.start.path: {directory} has no model.json; "
                                "create it with `evejax import`")
    kind = json.loads(path.read_text()).get("format")
    if kind not in IMPORT_FORMATS:
        raise ValueError(f"{directory}: checkpoint format {kind!r} cannot be imported; "
                         f"known: {sorted(IMPORT_FORMATS)}")
    return importlib.import_module(IMPORT_FORMATS[kind]).load_checkpoint(directory, shardings)


def imported_params(start, params, param_shardings):
    """`params` with subtrees replaced by directories written by `evejax import`."""
    params = dict(params)
    for entry in filter(None, (e.strip() for e in start.path.split(","))):
        subtree, _, directory = entry.rpartition("=")
        keys = [k for k in subtree.split("/") if k]
        target, target_sh = params, param_shardings
        for k in keys:
            if k not in target:
                raise KeyError(f"config.stage.start.path: {subtree!r} is not a parameter subtree; "
                               f"top level has {sorted(params)}")
            target, target_sh = target[k], target_sh[k]
        try:
            _, loaded = load_imported(directory, target_sh)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{directory} does not load as the parameters of {subtree or 'the model'}: "
                             f"{e}") from e
        for (kp, new), old in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(target)):
            if new.shape != old.shape:
                where = "/".join(keys + [optimizer_lib.path_str(kp)])
                raise ValueError(f"{directory}: {where} has shape {new.shape}, the model wants {old.shape}")
        placed = jax.tree.map(lambda new, old: new.astype(old.dtype), loaded, target)
        if not keys:
            params = placed
            continue
        node = params
        for k in keys[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        node[keys[-1]] = placed
    return params, f"imported {start.path}"


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------
def train(config, workdir: str) -> dict:
    """Runs (or resumes) one stage. Returns {"step", "metrics", "preempted"}."""
    config_lib.validate(config)
    sharding.maybe_initialize_distributed()
    with ckpt_lib.WorkdirLock(workdir):
        return _train(config, workdir)


def _train(config, workdir: str) -> dict:
    tc, dc, name = config.train, config.data, config.stage.name
    total, accum = tc.steps, tc.accum_steps
    mesh = sharding.make_mesh(dict(config.mesh))
    if config.stage.start.kind not in START_KINDS:
        raise ValueError(f"config.stage.start.kind={config.stage.start.kind!r} is not known; "
                         f"use one of {START_KINDS}")
    if dc.global_batch % accum or (dc.global_batch // accum) % sharding.data_parallel_size(mesh):
        raise ValueError(
            f"config.data.global_batch={dc.global_batch} must split into config.train.accum_steps="
            f"{accum} micro-batches that divide over the {sharding.data_parallel_size(mesh)} "
            "data-parallel devices of config.mesh")

    spec = registry.build(config.model)
    module, init_args, init_kwargs = spec.module, spec.init_args, spec.init_kwargs
    with sharding.rules_context(mesh):
        # ---- model, optimizer and the state's shapes and shardings ----
        boxed = jax.eval_shape(lambda r: module.init(r, *init_args, **init_kwargs)["params"],
                               jax.random.PRNGKey(0))
        params_shape = sharding.unbox(boxed)
        opt = optimizer_lib.make_optimizer(config.optim, config.stage.trainable, params_shape, total)
        _, shardings = step_lib.abstract_state(module, init_args, init_kwargs, opt.tx, mesh,
                                               ema=tc.ema_decay > 0)
        rng = jax.random.PRNGKey(tc.seed)
        state_shape = jax.eval_shape(
            lambda r: step_lib.init_state(module, init_args, init_kwargs, opt.tx, shardings, r), rng)

        # ---- data ----
        data_iter = data_source(dc.name)(config, jax.process_index(), jax.process_count())
        # Scheduled scalars (drop_path_rate, ...) are made inside the step, not read from the data.
        scalars = optimizer_lib.batch_schedules(tc)
        specs = {k: v for k, v in spec.batch_specs(dc.global_batch, dc.seq_len).items() if k not in scalars}
        batch_shardings = {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in specs.items()}

        # ---- checkpoints, and where this run starts ----
        store = ckpt_lib.Checkpoints(workdir, keep=config.checkpoint.keep,
                                     async_save=config.checkpoint.async_save)
        resumed = newest_restorable(store, config, params_shape, state_shape, shardings)
        last_metrics: dict = {}
        if resumed is not None:
            latest, state, data_state, last_metrics = resumed
            data_iter.set_state(data_state)
        start_step = 0 if resumed is None else int(jax.device_get(state.step))
        # The first batch is read before the state is built and the step compiled (minutes at 7B),
        # so data that cannot make one (a wrong path, no good record) stops the run at once.
        waiting = PreemptionFlag()
        try:
            first_batch = DataWait(data_iter, waiting.event).next() if start_step < total else None
        except BaseException:
            store.close()
            raise
        finally:
            waiting.restore()
        if waiting.is_set():
            store.close()
            if jax.process_index() == 0:
                print(f"[{name}] preempted while waiting for the first batch: nothing to save", flush=True)
            return {"step": start_step, "metrics": last_metrics, "preempted": True}
        if resumed is not None:
            origin = f"resumed from checkpoint {latest} in {store.directory}"
        elif config.stage.start.kind == "fresh":
            state = step_lib.init_state(module, init_args, init_kwargs, opt.tx, shardings, rng)
            origin = f"fresh init (seed {tc.seed})"
        else:
            state, origin = _started_state(config, workdir, module, init_args, init_kwargs, opt.tx,
                                           shardings, state_shape, rng)

        # ---- the step: compiled once, before the loop ----
        train_step = step_lib.make_train_step(
            weighted_loss(spec.loss_fn, dict(config.stage.losses)), opt.tx, shardings, batch_shardings,
            accum, trainable=opt.trainable, ema_decay=tc.ema_decay, batch_scalars=scalars)
        state_spec = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state_shape, shardings)
        compiled = train_step.lower(state_spec, specs).compile()

        reporter = metrics_lib.Reporter(
            name, total, start_step, logdir=str(epath.Path(workdir) / "tensorboard"),
            flops_per_step=spec.flops_per_step(dc.global_batch, dc.seq_len),
            tokens_per_step=dc.global_batch * dc.seq_len, num_devices=jax.device_count(),
            peak_flops_per_device=metrics_lib.peak_flops_per_device(tc.peak_flops_per_device),
            loss_terms=list(config.stage.losses), progress_bar=tc.progress_bar)
        n_train = sum(int(np.prod(p.shape)) for p, t in zip(jax.tree.leaves(params_shape),
                                                            jax.tree.leaves(opt.trainable)) if t)
        n_all = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params_shape))
        reporter.write(f"[{name}] {origin}; workdir {workdir}; mesh {dict(mesh.shape)}; "
                       f"params {n_all:,} ({n_train:,} trainable); global batch {dc.global_batch} x "
                       f"{dc.seq_len} tokens in {accum} micro-batch(es); {total} steps")
        if start_step >= total:
            reporter.write(f"[{name}] already finished at step {start_step}")
            reporter.close()
            store.close()
            return {"step": start_step, "metrics": last_metrics, "preempted": False}

        config_dict = config.to_dict()
        every = config.checkpoint.every   # 0: only the final and preemption checkpoints
        learning_rate = jax.jit(opt.schedule)   # one small compile, not one per jnp op
        preempted = PreemptionFlag()
        pending: list[tuple[int, Any]] = []   # device metrics not yet fetched
        last_saved = start_step
        reporter.restart_clock(start_step)
        feed = DataWait(data_iter, preempted.event)
        try:
            for step in range(start_step + 1, total + 1):
                host_batch = first_batch if step == start_step + 1 else feed.next()
                if host_batch is None:   # SIGTERM while waiting for data: stop after the previous step
                    step -= 1
                    finished = step
                else:
                    if step == start_step + 1:
                        _check_batch(host_batch, specs, jax.process_count())
                    batch = sharding.global_batch({k: host_batch[k] for k in specs}, mesh)
                    with jax.transfer_guard("disallow"):  # the step itself moves nothing to/from host
                        state, step_metrics = compiled(state, batch)
                    pending.append((step, step_metrics))
                    # One step in flight: step - 1 is waited for once step is queued,
                    # so the bar and its rate count finished steps, not dispatched ones.
                    finished = step - 1
                    if len(pending) > 1:
                        jax.block_until_ready(pending[-2][1])
                stop = preempted.is_set() or store.reached_preemption(step)
                save = (stop or step == total or (every > 0 and step % every == 0)) and step > last_saved
                if pending and (save or step % tc.log_every == 0):
                    fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
                    pending.clear()
                    finished = step
                    bad = metrics_lib.first_nonfinite(fetched)
                    if bad is not None:
                        raise NonFiniteLossError(_nonfinite_message(name, bad, last_saved, store))
                    last_metrics = reporter.log(step, fetched[-1][1], float(learning_rate(step - 1)),
                                                metrics_lib.skip_counts(data_iter))
                if save:
                    store.save(step, state, feed.get_state(), config_dict, dict(last_metrics, step=step))
                    last_saved = step
                reporter.advance(finished)
                if stop:
                    reporter.summarize_skips(metrics_lib.skip_counts(data_iter))
                    reporter.write(f"[{name}] preempted: saved checkpoint {step}; run the same command "
                                   "to resume" if step else f"[{name}] preempted before step 1: nothing to save")
                    return {"step": step, "metrics": last_metrics, "preempted": True}
            reporter.summarize_skips(metrics_lib.skip_counts(data_iter))
            reporter.write(f"[{name}] finished {total} steps; final checkpoint in {store.directory}")
            return {"step": total, "metrics": last_metrics, "preempted": False}
        finally:
            store.wait()
            store.close()
            reporter.close()
            preempted.restore()


def newest_restorable(store, config, params_shape, state_shape, shardings):
    """(step, state, data state, metrics) of the newest checkpoint that restores; None if none exists.

    A checkpoint of another model is refused (ModelMismatchError). One that
    does not restore on some host is reported on stderr and set aside (never
    deleted), on every host alike; if none restores, the run stops
    (NoRestorableCheckpointError) rather than silently starting over.
    """
    damaged = []
    for step in reversed(store.all_steps()):
        restored, reason = None, None
        try:
            saved_model, saved_shapes = store.config(step)["model"], store.param_shapes(step)
        except Exception as e:   # Orbax/TensorStore raise many types; all mean "unreadable"
            reason = e
        else:
            _check_same_model(saved_model, saved_shapes, config.model, params_shape, store.directory, step)
            try:
                restored = store.restore(step, state_shape, shardings)
            except Exception as e:
                reason = e
        if _on_every_host(reason is None):
            return (step, *restored)
        where = store.set_aside(step)
        damaged.append(str(where))
        if jax.process_index() == 0:
            why = _first_line(reason) if reason is not None else "it fails on another host"
            print(f"[{config.stage.name}] WARNING: checkpoint {step} in {store.directory} does not restore "
                  f"({why}); moved to {where} for inspection; trying the next older one",
                  file=sys.stderr, flush=True)
    if damaged:
        raise NoRestorableCheckpointError(
            f"no checkpoint in {store.directory} restores; they were moved to {damaged}. Run the same "
            "command again to start this stage over, or move a repaired one back.")
    return None


def _on_every_host(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _first_line(error: BaseException, limit: int = 400) -> str:
    """The first line of the innermost cause: TensorStore's own error names the file and byte range."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_model(model) -> str:
    """"llm size internlm2_tiny (family internlm2)" of a config.model (dict or ConfigDict)."""
    text = f"{model['name']} size {model['size']}"
    try:
        family = getattr(registry.build(model).config, "family", None)
    except Exception:   # a saved config this code cannot build any more: name and size say enough
        family = None
    return f"{text} (family {family})" if family else text


def _check_same_model(saved_model, saved_shapes, model, params_shape, directory, step) -> None:
    from ml_collections import ConfigDict

    saved, current = _describe_model(ConfigDict(saved_model)), _describe_model(model)
    shapes = {optimizer_lib.path_str(kp): tuple(x.shape)
              for kp, x in jax.tree_util.tree_leaves_with_path(params_shape)}
    differ = [f"{p}: saved {saved_shapes.get(p)}, config {shapes.get(p)}"
              for p in sorted(set(shapes) | set(saved_shapes)) if shapes.get(p) != saved_shapes.get(p)]
    if saved == current and not differ:
        return
    detail = f"; parameter shapes differ ({len(differ)}): " + "; ".join(differ[:3]) if differ else ""
    raise ModelMismatchError(
        f"checkpoint {step} in {directory} holds model {saved}, but this config is model {current}"
        f"{detail}. Use another --workdir for this model, or the config that wrote the checkpoint.")


def _started_state(config, workdir, module, init_args, init_kwargs, tx, shardings, state_shape, rng):
    """A step-0 state from a previous stage's or imported params, with fresh optimizer state."""
    start = config.stage.start
    if start.kind == "stage":
        params, origin = stage_params(start, workdir, state_shape.params, shardings.params)
    else:
        fresh = step_lib.init_state(module, init_args, init_kwargs, tx, shardings, rng)
        params, origin = imported_params(start, fresh.params, shardings.params)
    state_rng = jax.random.split(rng)[1]   # the same split as a fresh init_state
    return step_lib.state_from_params(params, tx, shardings, state_rng), origin


def _check_batch(host_batch, specs, process_count: int) -> None:
    for key, s in specs.items():
        if key not in host_batch:
            raise KeyError(f"the data has no {key!r} (it has {sorted(host_batch)}); the model needs "
                           f"{sorted(specs)}")
        want = (s.shape[0] // process_count,) + tuple(s.shape[1:])
        got = host_batch[key]
        if tuple(got.shape) != want or got.dtype != s.dtype:
            raise ValueError(f"data {key!r}: {got.dtype}{list(got.shape)} per host, the step "
                             f"wants {np.dtype(s.dtype)}{list(want)} (check config.data)")


def _nonfinite_message(name, bad, last_saved, store) -> str:
    step, values = bad
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
    return (f"[{name}] non-finite loss at step {step} ({shown}); stopped without saving. "
            f"The newest checkpoint is step {last_saved} in {store.directory}: lower the learning "
            "rate or fix the data, then run the same command to resume from it.")


class DataWait:
    """The data iterator, read in a helper thread so that SIGTERM is honoured while the
    trainer waits for a batch (a slow or stalled source). One batch in flight at a time,
    so the batches and the checkpointed data state are those of plain `next`."""

    def __init__(self, data_iter, stop: threading.Event):
        self.data_iter, self.stop = data_iter, stop
        self.state = None   # the iterator's state before the batch in flight

    def next(self):
        """The next batch, or None when `stop` was set first (the fetch is abandoned)."""
        self.state = self.data_iter.get_state()
        out: list = []

        def fetch():
            try:
                out.append((next(self.data_iter), None))
            except BaseException as e:  # re-raised in the trainer's thread
                out.append((None, e))

        thread = threading.Thread(target=fetch, name="evejax-data", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)
            if self.stop.is_set() and thread.is_alive():
                return None
        batch, error = out[0]
        if error is not None:
            raise error
        self.state = None
        return batch

    def get_state(self):
        return self.data_iter.get_state() if self.state is None else self.state


class PreemptionFlag:
    """Set by SIGTERM on a single-process run.

    Multi-process runs leave SIGTERM to JAX's preemption notifier, which
    `reached_preemption` syncs so every host saves at the same step.
    """

    def __init__(self):
        self.event = threading.Event()
        self.previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def is_set(self) -> bool:
        return self.event.is_set()

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------
def config_name(spec: str) -> str:
    """configs/eve.py:7b_stage1 -> eve_7b_stage1."""
    path, _, arg = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_{arg}" if arg else stem


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_lib.split_overrides(argv)
    parser = argparse.ArgumentParser(prog="evejax train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="FILE.py[:ARG], e.g. configs/eve.py:7b_stage1")
    parser.add_argument("--workdir", default=None, help="default: runs/<file>_<arg>")
    args = parser.parse_args(rest)
    config = config_lib.apply_overrides(config_lib.load(args.config), overrides)
    workdir = args.workdir or os.path.join("runs", config_name(args.config))
    try:
        train(config, workdir)
    except (NonFiniteLossError, NoGoodRecordsError, ModelMismatchError, NoRestorableCheckpointError,
            ckpt_lib.WorkdirBusyError) as e:
        print(e, file=sys.stderr, flush=True)
        return 1
    return 0
