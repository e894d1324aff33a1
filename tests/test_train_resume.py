"""Exact resume and preemption, with the trainer as a subprocess: `python -m evejax.cli train ...`."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from evejax.data import synthetic
from evejax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
ARGS = ["--config", "configs/llm.py:tiny", "--config.data.seq_len=16", "--config.model.overrides.remat=none",
        "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.train.log_every=1",
        "--config.train.progress_bar=False", f"--config.train.steps={STEPS}",
        f"--config.checkpoint.every={EVERY}"]
SLOW = "--config.data.name=test_train_resume:slow_data"


def slow_data(config, process_index, process_count):
    """The synthetic batches at 0.25 s each, so a test can stop the run where it wants."""
    return Slow(synthetic.make_data(config, process_index, process_count))


class Slow:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(0.25)
        return next(self.batches)

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state):
        self.batches.set_state(state)


def stuck_data(config, process_index, process_count):
    """One synthetic batch, then none: the run stays at step 1 until it is killed."""
    return Stuck(synthetic.make_data(config, process_index, process_count))


class Stuck(Slow):
    served = False

    def __next__(self):
        while self.served:
            time.sleep(1)
        self.served = True
        return next(self.batches)


@pytest.fixture(scope="module")
def env():
    """The test's 8 CPU devices, this directory importable; the run's compilation cache comes with the
    environment (tests/conftest.py)."""
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))


def command(workdir, *extra):
    return [sys.executable, "-m", "evejax.cli", "train", "--workdir", str(workdir), *ARGS, *extra]


def run(workdir, env, *extra):
    done = subprocess.run(command(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def stop_at(workdir, env, sig, after_step, tmp_path):
    """Starts a slow run, sends `sig` once it logged `after_step` and checkpoint EVERY exists."""
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(command(workdir, SLOW), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                m = re.search(rf"step (\d+)/{STEPS}", line)
                if m and int(m.group(1)) >= after_step and (workdir / "checkpoints" / str(EVERY)).exists():
                    proc.send_signal(sig)
                    break
            lines += proc.stdout.readlines()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, "".join(lines)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """The params of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run(workdir, env)
    step, params = ckpt_lib.load_params(str(workdir))
    assert step == STEPS
    return params


def assert_bit_identical(a, b):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_sigkill_between_checkpoints_then_rerun_is_bit_identical(tmp_path, env, reference):
    workdir = tmp_path / "run"
    code, out = stop_at(workdir, env, signal.SIGKILL, EVERY + 2, tmp_path)
    assert code == -signal.SIGKILL
    assert ckpt_lib.load_params(str(workdir))[0] == EVERY   # killed after 4, before 8
    out = run(workdir, env, SLOW)
    assert f"resumed from checkpoint {EVERY}" in out
    step, params = ckpt_lib.load_params(str(workdir))
    assert step == STEPS
    assert_bit_identical(params, reference)


def test_sigterm_saves_exits_zero_and_the_next_start_resumes(tmp_path, env, reference):
    workdir = tmp_path / "run"
    code, out = stop_at(workdir, env, signal.SIGTERM, EVERY + 1, tmp_path)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    saved = int(re.search(r"preempted: saved checkpoint (\d+)", out).group(1))
    assert EVERY < saved < STEPS
    assert ckpt_lib.load_params(str(workdir))[0] == saved
    assert not (workdir / "train.lock").exists()
    out = run(workdir, env, SLOW)
    assert f"resumed from checkpoint {saved}" in out
    step, params = ckpt_lib.load_params(str(workdir))
    assert step == STEPS
    assert_bit_identical(params, reference)


def test_a_second_run_on_the_workdir_is_refused_until_the_first_is_gone(tmp_path, env):
    workdir = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        first = subprocess.Popen(command(workdir, "--config.data.name=test_train_resume:stuck_data"), cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert any(f"step 1/{STEPS}" in line for line in first.stdout)   # then it waits for data
            second = subprocess.run(command(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert second.returncode == 1
            assert f"in use by another training run (pid {first.pid} on host {socket.gethostname()}" in \
                second.stderr, second.stderr[-3000:]
            assert first.poll() is None
        finally:
            first.kill()
            first.wait()
            first.stdout.close()
    # SIGKILL leaves the lock behind; its process is gone, so the next run replaces it.
    assert str(first.pid) in (workdir / "train.lock").read_text()
    out = run(workdir, env)
    assert f"removed the stale lock {workdir / 'train.lock'} of pid {first.pid}" in out
    assert ckpt_lib.load_params(str(workdir))[0] == STEPS and not (workdir / "train.lock").exists()
