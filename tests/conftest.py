"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the flags: nothing here imports JAX at collection)


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
