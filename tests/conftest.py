"""Test set-up: 8 fake CPU devices and XLA:CPU's quickest compilation, set before JAX is
imported anywhere, and one JAX persistent compilation cache per run, shared by the xdist workers
and the CLI subprocesses the tests start."""
import os
import shutil
import tempfile

# The suite is compile-bound: XLA:CPU's fusion emitters and LLVM optimising the tiny programs cost
# more than they save when the programs run a few steps (the gradient of HoVLE demo's loss compiles
# in 3.2 s instead of 16.7 s; tests/test_demo*.py take 129 s of CPU instead of 220 s). Only the
# machine code changes: results move by rounding (that loss equal to 9 digits). An XLA_FLAGS of the
# user's comes after these and wins.
os.environ["XLA_FLAGS"] = " ".join([
    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the flags: nothing here imports JAX at collection)


def pytest_configure(config):
    """The suite is compile-bound and many tests compile the same tiny programs (a fresh
    `jax.jit(module.apply)`, the same CLI run in another file or worker); a cache on disk compiles
    each once. It is made here, in the controller or the only process, before the xdist workers
    start and before JAX is imported, so JAX reads it from the environment; it is new and empty on
    every run (mkdtemp: private to this user) and removed at the end, so no run sees another's."""
    if hasattr(config, "workerinput"):
        return
    config.jax_cache_dir = tempfile.mkdtemp(prefix="evejax-test-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config.jax_cache_dir,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_unconfigure(config):
    if hasattr(config, "jax_cache_dir"):
        shutil.rmtree(config.jax_cache_dir, ignore_errors=True)


@pytest.fixture
def train_logged(monkeypatch):
    """train(config, workdir, overrides) -> (the trainer's result, the metrics of every step): logs
    every step, no progress bar, the `--config.` overrides applied first."""
    from evejax import config as config_lib
    from evejax.train import metrics as metrics_lib
    from evejax.train import trainer

    logged = []
    log = metrics_lib.Reporter.log
    monkeypatch.setattr(metrics_lib.Reporter, "log",
                        lambda self, step, metrics, *a, **k: logged.append(dict(metrics)) or log(
                            self, step, metrics, *a, **k))

    def train(config, workdir, overrides=()):
        config_lib.apply_overrides(config, ["--config.train.log_every=1", "--config.train.progress_bar=False",
                                            *overrides])
        return trainer.train(config, str(workdir)), logged

    return train
