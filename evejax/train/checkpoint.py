"""Orbax checkpoints of a run: one CheckpointManager, four items per step.

  <workdir>/checkpoints/<step>/
    state/     the TrainState (params, optimizer state, step, rng, EMA params)
    data/      the data iterator's state, one JSON file per process
    config/    the run's config as JSON (a later stage reads it from here)
    metrics/   the metrics of that step as JSON

Saves are asynchronous: `save` returns once the arrays are copied off the
devices and the files are written in the background. Orbax writes a step into
a temporary directory and renames it when complete (or, on object stores,
marks it with commit_success.txt), so a save cut short by a kill is never
listed: `latest_step` is the newest complete checkpoint, and leftover
temporary directories are deleted before the next save. The caller decides
when to save (the trainer: every N steps, at the end, on preemption); the
manager keeps the newest `keep`.

State is always restored into an abstract target whose leaves carry the
*current* run's shardings, so a checkpoint written on one mesh loads onto
another (fsdp=8 -> data=2 x fsdp=4).

A complete step that does not restore (a truncated array file, an emptied
metadata JSON, a missing item) is moved by `set_aside` to
`<workdir>/checkpoints_damaged/<step>`: kept for inspection, out of the
manager's sight, so keep-N never deletes it and the step can be saved again.

`WorkdirLock` makes a workdir one run's at a time (`<workdir>/train.lock`).

Replicated arrays are written replica-parallel (each replica writes a slice,
orbax's default) except on the CPU backend: see `_save_replicas_whole_on_cpu`.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import socket
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data", "config", "metrics")


class DataIteratorHandler(ocp.CheckpointHandler):
    """Each process's data-iterator state as `process_<i>-of-<n>.json` (grain's layout)."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state, indent=1))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore" = None) -> dict:
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a different number of "
                "processes, so the data position of this process is unknown")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    # The state is taken when the save is requested, not when the background
    # write runs, so it matches the batches the saved train state has seen.
    state: dict


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    pass


def _absolute(workdir: str) -> epath.Path:
    """Orbax (tensorstore) needs absolute paths; URLs like gs://... already are."""
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


@functools.cache   # the backend is fixed for the life of the process
def _save_replicas_whole_on_cpu() -> None:
    """Orbax's replica-parallel save makes each of an array's N replicas write 1/N of it. On TPU
    that spreads the device-to-host copies over the chips and, on a pod, the writes over the hosts,
    so it stays on there. On the CPU backend every "device" is the host's own memory: nothing is
    spread, and slicing each replica costs one small compiled program per array shape and replica
    (~256 per save of a tiny model on 8 devices). There the first replica writes each array whole.
    The values written are the same either way (only the chunking differs), and either reads back
    on any backend."""
    if jax.default_backend() == "cpu":
        try:   # private modules: an orbax that moved them keeps its default, slower on CPU, same values
            from orbax.checkpoint._src.metadata import array_metadata_store
            from orbax.checkpoint._src.serialization import type_handler_registry
        except ImportError:
            return

        # Orbax's default handler (with its array metadata), replica-parallel off; no warning that
        # it replaces the default, as this is on purpose.
        type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store(), use_replica_parallel=False),
            override=True, ignore_warnings=True)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The run's checkpoints under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = _absolute(workdir) / "checkpoints"
        if read_only:   # another run's checkpoints: never written or cleaned from here
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None,
                                                   create=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def param_shapes(self, step: int) -> dict[str, tuple]:
        """{"decoder/layers/.../kernel": shape} of the params saved at `step`, from the metadata only."""
        from evejax.train.optimizer import path_str

        path = self.directory / str(step) / "state"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing")
        metadata = ocp.PyTreeCheckpointer().metadata(path).item_metadata   # None when unreadable
        if metadata is None:
            raise ValueError(f"{path / '_METADATA'} is missing or not valid JSON")
        tree = metadata.tree
        return {path_str(kp): tuple(m.shape) for kp, m in jax.tree_util.tree_leaves_with_path(tree["params"])}

    def set_aside(self, step: int) -> epath.Path:
        """Moves a damaged step out of the manager's directory (never deletes it); returns where."""
        target = self.directory.parent / "checkpoints_damaged" / str(step)
        if target.exists():   # damaged twice: keep both
            target = target.parent / f"{step}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"evejax_set_aside_{step}")
        self.manager.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the cluster's preemption notice (SIGTERM) is synced."""
        return self.manager.reached_preemption(step)

    def save(self, step: int, state, data_state: dict, config: dict, metrics: dict) -> None:
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=DataIteratorSave(data_state),
            config=ocp.args.JsonSave(config), metrics=ocp.args.JsonSave(metrics))
        _save_replicas_whole_on_cpu()
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, state_shardings):
        """(state on the current mesh, data-iterator state, metrics) of `step`."""
        target = _abstract(abstract_state, state_shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            data=DataIteratorRestore(), metrics=ocp.args.JsonRestore()))
        return restored.state, restored.data, restored.metrics

    def config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore_params(self, step: int, abstract_params, param_shardings):
        """Only the params of `step` (a finished stage's weights for the next stage)."""
        target = {"params": _abstract(abstract_params, param_shardings)}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
        return restored.state["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


WEIGHTS = ("params", "ema_params")


def load_params(workdir: str, step: Optional[int] = None, weights: str = "params") -> tuple[int, Any]:
    """(step, params as numpy arrays) of a run's checkpoint (default: the newest); `weights`
    "ema_params" reads the exponential moving average instead (config.train.ema_decay > 0).

    Needs no model, mesh or optimizer, and works on any number of devices:
    for evaluation, export and tests.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    store = Checkpoints(workdir, read_only=True)
    step = store.latest_step() if step is None else step
    store.close()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no complete checkpoint")
    path = store.directory / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path).item_metadata.tree
    if saved.get(weights) is None:
        raise FileNotFoundError(f"checkpoint {step} in {workdir} has no {weights} (an EMA is kept only when "
                                "config.train.ema_decay > 0); use the params")
    target = {weights: saved[weights]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return step, restored[weights]


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir's lock."""


class WorkdirLock:
    """`<workdir>/train.lock` ({"pid", "host", "since"}) for the duration of a `with` block.

    Created with O_EXCL, so of two runs started on one workdir the second
    refuses, naming the first's pid and host. Released on every exit that runs
    Python's `finally` (normal end, an exception, SIGTERM, which the trainer
    turns into a save and a normal return). A lock left by a process that died
    without it (SIGKILL, or SIGTERM before the training loop) is stale when its
    host is this host and its pid is not running: it is replaced with a note.
    A lock from another host is never judged stale automatically (its pid means
    nothing here); the error says to delete the file once that run is gone.
    Only process 0 of a multi-host run locks (the others share its workdir), and
    object-store workdirs (gs://...) are not locked: they have no exclusive create.
    """

    def __init__(self, workdir: str):
        self.path = None if "://" in str(workdir) else os.path.join(workdir, "train.lock")
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        if self.path is None or jax.process_index() != 0:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise WorkdirBusyError(
                        f"{os.path.dirname(self.path)} is in use by another training run (pid "
                        f"{holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}): "
                        f"wait for it or stop it, or use another --workdir. If that run is gone, delete "
                        f"{self.path}") from None
                print(f"removed the stale lock {self.path} of pid {holder.get('pid')} (no longer running "
                      "on this host)", flush=True)
                os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise WorkdirBusyError(f"{self.path}: another run took the lock at the same time")

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):   # being written, or emptied: the holder is unknown
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)   # signal 0 only asks whether the pid exists
        except ProcessLookupError:
            return True
        except PermissionError:   # it exists, as another user's process
            pass
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            os.unlink(self.path)
            self.held = False
