"""The trainer in-process on the tiny LLM: stage chaining, NaN stop, mesh change, checkpoints, metrics,
damaged checkpoints, a checkpoint of another model, impossible config values, skip counts, progress."""
import json
import math
import os
import shutil
import struct
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evejax import config as config_lib
from evejax import sharding
from evejax.data import pipeline, synthetic
from evejax.train import checkpoint as ckpt_lib
from evejax.train import metrics as metrics_lib
from evejax.train import optimizer as optimizer_lib
from evejax.train import step as step_lib
from evejax.train import trainer

# Small and fast: short sequences, no rematerialisation, fsdp over the 8 CPU
# devices. The same run as tests/test_train_resume.py's, so with the run's
# compilation cache (tests/conftest.py) the step compiles once for both files.
BASE = ["--config.data.seq_len=16", "--config.model.overrides.remat=none", "--config.mesh.data=1",
        "--config.mesh.fsdp=8", "--config.train.log_every=1", "--config.train.progress_bar=False",
        "--config.train.steps=12", "--config.checkpoint.every=4"]


def tiny(*overrides):
    return config_lib.apply_overrides(config_lib.load("configs/llm.py:tiny"), BASE + list(overrides))


def by_path(tree):
    return {optimizer_lib.path_str(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def saved_state(workdir, step):
    """A checkpoint's whole train state as a nested dict of numpy arrays."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args))


def test_second_stage_starts_from_the_first_stages_final_params(tmp_path):
    trainer.train(tiny(), str(tmp_path / "s1"))
    second = tiny("--config.train.steps=2", "--config.stage.trainable=('lm_head/.*',)",
                  "--config.stage.start.kind=stage", "--config.stage.start.workdir=s1",
                  "--config.model.overrides.dtype=bfloat16")
    result = trainer.train(second, str(tmp_path / "s2"))
    (step1, p1), (step2, p2) = (ckpt_lib.load_params(str(tmp_path / s)) for s in ("s1", "s2"))
    assert (step1, step2, result["step"]) == (12, 2, 2)
    for path, value in by_path(p2).items():
        assert value.dtype == np.float32   # bf16 compute, fp32 master weights
        same = np.array_equal(value, by_path(p1)[path])
        assert same != path.startswith("lm_head/"), path
    # A fresh optimizer: its update counts are this stage's 2, not 12 + 2.
    opt_state = by_path(saved_state(tmp_path / "s2", 2)["opt_state"])
    counts = [v for p, v in opt_state.items() if p.endswith("count")]
    assert counts and all(int(c) == 2 for c in counts)

    # A previous stage that did not finish is refused, with the way out.
    shutil.rmtree(tmp_path / "s1" / "checkpoints" / "12")
    with pytest.raises(ValueError, match="stopped at step 8 of 12.*run its command again"):
        trainer.train(second, str(tmp_path / "s3"))


def nan_at_step_5(config, process_index, process_count):
    """Synthetic batches with NaN in the loss mask of the 5th batch."""
    return NanAt(synthetic.make_data(config, process_index, process_count), 5)


class NanAt:
    def __init__(self, batches, bad):
        self.batches, self.bad, self.count = batches, bad, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batches)
        self.count += 1
        if self.count == self.bad:
            batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
        return batch

    def get_state(self):
        return dict(self.batches.get_state(), count=self.count)

    def set_state(self, state):
        state = dict(state)
        self.count = state.pop("count")
        self.batches.set_state(state)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    workdir = str(tmp_path)
    # Metrics are fetched every 10 steps but also before every save: the NaN
    # of step 5 is caught at step 8, before checkpoint 8 would be written.
    args = ["--config", "configs/llm.py:tiny", "--workdir", workdir, *BASE, "--config.train.log_every=10"]
    assert trainer.main(args + ["--config.data.name=test_train_trainer:nan_at_step_5"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "newest checkpoint is step 4" in err
    step, params = ckpt_lib.load_params(workdir)
    assert step == 4 and all(np.isfinite(v).all() for v in jax.tree.leaves(params))
    assert not (tmp_path / "train.lock").exists()   # released when the error left train()
    # The same command with clean data resumes from it.
    assert trainer.main(args) == 0
    assert "resumed from checkpoint 4" in capsys.readouterr().out
    assert ckpt_lib.load_params(workdir)[0] == 12


def saved_metrics(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "metrics" / "metrics").read_text())


def test_restore_onto_a_different_mesh_gives_the_same_next_loss(tmp_path):
    a, b = tmp_path / "fsdp8", tmp_path / "data2_fsdp4"
    trainer.train(tiny(), str(a))
    for step in (8, 12):   # continue both from checkpoint 4
        shutil.rmtree(a / "checkpoints" / str(step))
    shutil.copytree(a, b)
    trainer.train(tiny("--config.checkpoint.every=5"), str(a))
    trainer.train(tiny("--config.checkpoint.every=5", "--config.mesh.data=2", "--config.mesh.fsdp=4"), str(b))
    same_mesh, other_mesh = saved_metrics(a, 5), saved_metrics(b, 5)
    assert other_mesh["loss"] == pytest.approx(same_mesh["loss"], rel=1e-5)
    assert other_mesh["grad_norm"] == pytest.approx(same_mesh["grad_norm"], rel=1e-4)


def test_half_written_checkpoint_is_ignored(tmp_path):
    mesh = sharding.make_mesh(dict(data=-1))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(4.0), replicated)}
    store = ckpt_lib.Checkpoints(str(tmp_path), keep=5)
    for step in (1, 2):
        store.save(step, jax.tree.map(lambda x: x * step, state), {"next_index": step}, {"c": 1},
                   {"loss": 0.5})
    store.wait()
    store.close()
    # What a kill in the middle of saving step 3 leaves: a temporary directory
    # with part of the files.
    partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1795300000000000"
    shutil.copytree(tmp_path / "checkpoints" / "2", partial)
    shutil.rmtree(partial / "state")
    (partial / "commit_success.txt").unlink()

    store = ckpt_lib.Checkpoints(str(tmp_path), keep=5)
    assert store.latest_step() == 2
    restored, data_state, metrics = store.restore(2, state, {"w": replicated})
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) * 2)
    assert data_state == {"next_index": 2} and metrics == {"loss": 0.5}
    # The resumed run saves step 3 again; the leftover is deleted first.
    store.save(3, restored, {"next_index": 3}, {"c": 1}, {"loss": 0.25})
    store.wait()
    assert store.latest_step() == 3 and not partial.exists()
    store.close()


def test_cpu_saves_replicated_arrays_whole_with_no_compile_and_reads_both_layouts(tmp_path, monkeypatch):
    """On the CPU backend a save compiles nothing (replica-parallel would slice each of the 8 replicas
    of every array shape with a compiled program) and writes each replicated array as one chunk; a
    checkpoint written replica-parallel (as on TPU) restores the same values bit for bit."""
    mesh = sharding.make_mesh(dict(data=-1))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {f"w{i}": jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (8 * i, 16 + i)), replicated)
             for i in (1, 2, 3)}
    compiles = []

    def count(event, seconds, **kw):
        compiles.extend([event] if event.endswith("backend_compile_duration") else [])

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        store = ckpt_lib.Checkpoints(str(tmp_path / "whole"), async_save=False)
        store.save(1, state, {}, {}, {})
        store.close()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    saved = ocp.PyTreeCheckpointer().metadata(store.directory / "1" / "state").item_metadata.tree
    assert {k: tuple(m.storage.chunk_shape) for k, m in saved.items()} == {k: v.shape for k, v in state.items()}

    # Orbax's own default (TPU's): each replica writes a slice.
    from orbax.checkpoint._src.metadata import array_metadata_store
    from orbax.checkpoint._src.serialization import type_handler_registry

    registry = type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY
    whole = registry.get(jax.Array)
    monkeypatch.setattr(ckpt_lib, "_save_replicas_whole_on_cpu", lambda: None)
    registry.add(jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store()),
                 override=True, ignore_warnings=True)
    try:
        sliced = ckpt_lib.Checkpoints(str(tmp_path / "sliced"), async_save=False)
        sliced.save(1, state, {}, {}, {})
        sliced.close()
    finally:
        registry.add(jax.Array, whole, override=True, ignore_warnings=True)
    saved = ocp.PyTreeCheckpointer().metadata(sliced.directory / "1" / "state").item_metadata.tree
    assert all(m.storage.chunk_shape[0] * 8 == m.shape[0] for m in saved.values())
    for directory in (tmp_path / "whole", tmp_path / "sliced"):
        restored, _, _ = ckpt_lib.Checkpoints(str(directory), read_only=True).restore(
            1, state, {k: replicated for k in state})
        for k, v in state.items():
            assert np.asarray(restored[k]).tobytes() == np.asarray(v).tobytes(), (directory, k)


def test_import_start_replaces_the_named_subtrees(tmp_path, monkeypatch):
    from ml_collections import ConfigDict

    mesh = sharding.make_mesh(dict(data=1, fsdp=8))
    fsdp = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    params = {"llm": {"w": jnp.zeros(8), "b": jnp.zeros(8)}, "pel": {"w": jnp.ones(8)}}
    shardings = jax.tree.map(lambda _: fsdp, params)
    written = {"llm_dir": {"w": np.arange(8, dtype=np.float64), "b": np.full(8, 2.0)},
               "bad_dir": {"w": np.zeros(4), "b": np.zeros(4)}}
    for name in written:   # what `evejax import` leaves: model.json naming the format
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps({"format": "test.format"}))
    fake = type(sys)("test_import_format")
    fake.load_checkpoint = lambda directory, shardings: (
        {}, jax.tree.map(lambda x, s: jax.device_put(x, s) if x.shape == (8,) else jnp.asarray(x),
                         written[os.path.basename(directory)], shardings))
    monkeypatch.setitem(sys.modules, "test_import_format", fake)
    monkeypatch.setitem(trainer.IMPORT_FORMATS, "test.format", "test_import_format")

    start = ConfigDict(dict(kind="import", workdir="", path=f"llm={tmp_path / 'llm_dir'}"))
    new, origin = trainer.imported_params(start, params, shardings)
    np.testing.assert_array_equal(new["llm"]["w"], np.arange(8))
    assert new["llm"]["w"].dtype == jnp.float32 and new["llm"]["w"].sharding == fsdp
    assert new["pel"]["w"] is params["pel"]["w"] and "llm=" in origin
    with pytest.raises(ValueError, match=r"bad_dir: llm/b has shape \(4,\), the model wants \(8,\)"):
        trainer.imported_params(ConfigDict(dict(start, path=f"llm={tmp_path / 'bad_dir'}")), params,
                                shardings)
    with pytest.raises(KeyError, match="'vit' is not a parameter subtree"):
        trainer.imported_params(ConfigDict(dict(start, path=f"vit={tmp_path / 'llm_dir'}")), params,
                                shardings)
    with pytest.raises(FileNotFoundError, match="no model.json; create it with `evejax import`"):
        trainer.imported_params(ConfigDict(dict(start, path=f"llm={tmp_path}")), params, shardings)


def test_unknown_override_and_data_source_are_named():
    with pytest.raises(KeyError, match="train.nosuch"):
        trainer.main(["--config", "configs/llm.py:tiny", "--config.train.nosuch=1"])
    with pytest.raises(ValueError, match="config.data.name='nosuch'"):
        trainer.data_source("nosuch")
    assert trainer.config_name("configs/eve.py:7b_stage1") == "eve_7b_stage1"


def read_scalars(logdir):
    """{tag: [(step, value)]} from TFRecord event files, without TensorFlow."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_log_line_mfu_and_tensorboard(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: next(clock))
    reporter = metrics_lib.Reporter("demo", 10, 0, logdir=str(tmp_path), flops_per_step=4e9,
                                    tokens_per_step=1000, num_devices=2, peak_flops_per_device=1e9,
                                    loss_terms=["ce", "pal"], progress_bar=False)
    values = reporter.log(4, {"loss": 2.5, "ce": 2.0, "pal": 0.5, "grad_norm": 1.25}, lr=1e-4)
    reporter.close()
    assert values["step_time"] == pytest.approx(0.5)
    assert values["tokens_per_s"] == pytest.approx(2000)
    assert values["mfu"] == pytest.approx(4e9 / 0.5 / 2e9)
    line = capsys.readouterr().out
    for part in ("[demo] step 4/10", "loss 2.5 ce 2 pal 0.5", "lr 1.00e-04", "grad_norm 1.25",
                 "2e+03 tok/s", "0.5 s/step", "MFU 400.0%", "eta 0:00:03"):
        assert part in line, (part, line)
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(4, 2.5)] and scalars["train/mfu"] == [(4, 4.0)]
    history = [(1, {"loss": 1.0}), (2, {"loss": 1.0, "grad_norm": math.inf})]
    assert metrics_lib.first_nonfinite(history)[0] == 2


def test_eve_stage_configs():
    paths = ["vision_tokenizer/patch_embedding/kernel", "mm_projector/fc1/kernel",
             "vision_compressor/input_layer/kernel", "llm/embed_tokens/embedding",
             "llm/decoder/layers/mlp/wo/kernel", "llm/lm_head/kernel", "clip/encoder/layers/mlp/wo/kernel"]
    params = {}
    for path in paths:
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.zeros(2)
    expect = {  # arg: (steps, lr, warmup, global batch, start kind, previous workdir, trains llm)
        "7b_stage1": (31250, 4e-4, 0.03, 512, "import", "", False),
        "7b_stage2": (64454, 4e-5, 0.01, 512, "stage", "eve_7b_stage1", True),
        "7b_stage3": (5198, 2e-5, 0.01, 128, "stage", "eve_7b_stage2", True),
        "7b_hd_stage3": (14063, 2e-5, 0.01, 128, "stage", "eve_7b_stage2", True),
        "tiny_stage2": (30, 4e-4, 0.01, 8, "stage", "eve_tiny_stage1", True),
    }
    for arg, (steps, lr, warmup, batch, kind, previous, trains_llm) in expect.items():
        c = config_lib.load(f"configs/eve.py:{arg}")
        got = (c.train.steps, c.optim.lr, c.optim.warmup_frac, c.data.global_batch)
        assert got == (steps, lr, warmup, batch), arg
        assert (c.stage.start.kind, c.stage.start.workdir) == (kind, previous)
        assert dict(c.stage.losses) == {"ce": 1.0, "pal": 1.0} and c.model.name == "eve"
        assert (c.optim.weight_decay, c.optim.b1, c.optim.b2, c.optim.eps) == (0.0, 0.9, 0.999, 1e-8)
        trains = by_path(optimizer_lib.path_mask(params, c.stage.trainable, "trainable"))
        assert not any(v for p, v in trains.items() if p.startswith("clip/"))
        assert all(trains[p] for p in paths[:3])
        assert all(trains[p] == trains_llm for p in paths[3:6])
    hd = config_lib.load("configs/eve.py:7b_hd_stage3")
    assert (hd.data.seq_len, hd.data.template) == (4096, "vicuna_v1")
    assert pipeline.image_geometry(hd).image_size == 1344
    assert config_lib.load("configs/eve.py:7b_stage1").model.overrides.dtype == "bfloat16"
    for arg in ("7b_stage1", "7b_stage2", "7b_stage3", "7b_hd_stage3", "tiny_stage1", "tiny_stage2",
                "tiny_stage3"):   # every data config is one the pipeline accepts
        pipeline.options(config_lib.load(f"configs/eve.py:{arg}").data)


def truncate_a_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    biggest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)


def empty_the_metadata_json(step_dir):
    (step_dir / "state" / "_METADATA").write_text("")


def remove_state(step_dir):
    shutil.rmtree(step_dir / "state")


def test_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(tmp_path, capsys):
    # Checkpoints 4, 8 and 12 (the configs of the other tests, so the step compiles once).
    trainer.train(tiny(), str(tmp_path / "clean"))
    _, reference = ckpt_lib.load_params(str(tmp_path / "clean"))
    reasons = {truncate_a_data_file: "Error reading", remove_state: "12/state is missing",
               empty_the_metadata_json: "_METADATA is missing or not valid JSON"}
    for damage, reason in reasons.items():
        workdir = tmp_path / damage.__name__
        shutil.copytree(tmp_path / "clean", workdir)
        damage(workdir / "checkpoints" / "12")
        capsys.readouterr()
        trainer.train(tiny(), str(workdir))
        out, err = capsys.readouterr()
        warning = next(line for line in err.splitlines() if "WARNING: checkpoint 12 " in line)
        assert "does not restore (" in warning and reason in warning, warning
        assert f"moved to {workdir / 'checkpoints_damaged' / '12'} for inspection" in warning
        assert "resumed from checkpoint 8" in out
        kept = workdir / "checkpoints_damaged" / "12"
        assert (kept / "config").exists() and (kept / "state").exists() == (damage is not remove_state)
        step, params = ckpt_lib.load_params(str(workdir))   # checkpoint 12 again, as if never damaged
        assert step == 12
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    # Nothing restores: the run stops (exit 1) instead of starting over; both are kept.
    workdir = tmp_path / "remove_state"
    for step in (4, 8, 12):
        remove_state(workdir / "checkpoints" / str(step))
    assert trainer.main(["--config", "configs/llm.py:tiny", "--workdir", str(workdir), *BASE]) == 1
    assert "no checkpoint in" in capsys.readouterr().err
    kept = sorted(p.name for p in (workdir / "checkpoints_damaged").iterdir())
    assert kept[0] == "12" and kept[1].startswith("12-") and kept[2:] == ["4", "8"], kept   # 12 twice


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path, capsys):
    workdir = str(tmp_path)
    args = ["--workdir", workdir, *BASE]
    assert trainer.main(["--config", "configs/llm.py:tiny", *args]) == 0
    capsys.readouterr()
    assert trainer.main(["--config", "configs/llm.py:internlm2_tiny", *args]) == 1
    err = capsys.readouterr().err
    assert ("holds model llm size llama_tiny (family llama), but this config is model llm size "
            "internlm2_tiny (family internlm2)") in err, err
    # Same family and size, other shapes (a third layer): refused, naming the shapes.
    three_layers = tiny()
    with three_layers.unlocked():
        three_layers.model.overrides.num_layers = 3
    with pytest.raises(trainer.ModelMismatchError,
                       match=r"parameter shapes differ.*decoder/layers/attention/key/kernel: saved "
                             r"\(2, 64, 2, 16\), config \(3, 64, 2, 16\)"):
        trainer.train(three_layers, workdir)
    assert ckpt_lib.load_params(workdir)[0] == 12 and not (tmp_path / "checkpoints_damaged").exists()


@pytest.mark.parametrize("override, key", [
    ("--config.optim.lr=-1", "config.optim.lr=-1.0 must be >= 0"),
    ("--config.train.steps=-5", "config.train.steps=-5 must be >= 1"),
    ("--config.data.global_batch=0", "config.data.global_batch=0 must be >= 1"),
    ("--config.optim.warmup_frac=1.5", r"config.optim.warmup_frac=1.5 must be in \[0, 1\]"),
    ("--config.optim.warmup_frac=-0.1", r"config.optim.warmup_frac=-0.1 must be in \[0, 1\]"),
])
def test_impossible_config_values_fail_before_anything_is_built(tmp_path, monkeypatch, override, key):
    monkeypatch.setattr(step_lib, "make_train_step", None)   # compiling would be a TypeError
    with pytest.raises(ValueError, match=key):
        trainer.train(tiny(override), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def skipping_data(config, process_index, process_count):
    """Synthetic batches whose counters (as BatchIterator.stats() gives them) report skipped records:
    one missing image per batch from the 3rd batch on, one over-long record at the 4th."""
    return Skipping(synthetic.make_data(config, process_index, process_count))


class Skipping(NanAt):
    def __init__(self, batches):
        super().__init__(batches, bad=0)

    def stats(self):
        missing, long = max(self.count - 2, 0), int(self.count >= 4)
        return {"examples": 8.0 * self.count, "batches": float(self.count), "skipped": float(missing + long),
                "skipped_missing_image": float(missing), "skipped_too_long": float(long),
                "skipped_corrupt_image": 0.0}


def test_skip_counts_in_log_lines_tensorboard_metrics_and_summary(tmp_path, capsys):
    trainer.train(tiny("--config.data.name=test_train_trainer:skipping_data"), str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    logged = {int(l.split("step ")[1].split("/")[0]): l for l in lines if "/12 | loss" in l}
    assert "skipped" not in logged[2]
    assert "| skipped 1 (missing_image 1) |" in logged[3]
    assert "| skipped 11 (missing_image 10, too_long 1) |" in logged[12]
    assert "[llm_tiny] data: skipped 11 (missing_image 10, too_long 1)" in lines
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/skipped_missing_image"][:5] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert scalars["train/skipped"][-1] == (12, 11)
    saved = saved_metrics(tmp_path, 12)
    assert (saved["skipped"], saved["skipped_missing_image"], saved["skipped_too_long"]) == (11, 10, 1)


def test_progress_bar_counts_finished_steps_with_one_in_flight(tmp_path, monkeypatch):
    """Each step's device work waits 0.1 s in a host callback, so a dispatched step is not finished
    when dispatch returns; the bar may only show steps whose metrics are ready."""
    dispatched, shown = [], []   # metrics of each step in dispatch order; (bar value, steps dispatched)

    def slow_loss(loss_fn, weights):
        fn = weighted(loss_fn, weights)
        wait = jax.ShapeDtypeStruct((), jnp.float32)

        def slow(params, batch, rng):
            loss, metrics = fn(params, batch, rng)
            return loss + jax.pure_callback(lambda: time.sleep(0.1) or np.float32(0), wait), metrics
        return slow

    def recording_step(*args, **kwargs):
        jitted = make_step(*args, **kwargs)

        def lower(*specs):
            compiled = jitted.lower(*specs).compile()

            def run(state, batch):
                state, metrics = compiled(state, batch)
                dispatched.append(metrics)
                return state, metrics
            return types.SimpleNamespace(compile=lambda: run)
        return types.SimpleNamespace(lower=lower)

    def advance(reporter, step):
        assert all(m.is_ready() for m in jax.tree.leaves(dispatched[:step])), f"bar at {step} before it finished"
        shown.append((step, len(dispatched)))

    weighted, make_step = trainer.weighted_loss, step_lib.make_train_step
    monkeypatch.setattr(trainer, "weighted_loss", slow_loss)
    monkeypatch.setattr(step_lib, "make_train_step", recording_step)
    monkeypatch.setattr(metrics_lib.Reporter, "advance", advance)
    trainer.train(tiny("--config.train.steps=5", "--config.train.log_every=100",
                       "--config.checkpoint.every=0"), str(tmp_path))
    # One step in flight: the bar is one behind the dispatched steps until the last is fetched.
    assert shown == [(0, 1), (1, 2), (2, 3), (3, 4), (5, 5)]
