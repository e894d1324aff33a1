"""Data reliability: all-bad data stops the run with its skips; SIGTERM is honoured while the
trainer waits for data; every EVE config takes LLaVA data, preprocessed as its model needs.
The trainer runs as a subprocess (`python -m evejax.cli train`)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import jax
import pytest

from evejax import config as config_lib
from evejax.data import pipeline, shapes, synthetic
from evejax.data.sources import NoGoodRecordsError
from evejax.models import registry
from evejax.train import checkpoint as ckpt_lib
from evejax.train import step as step_lib
from evejax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny EVE (the all-bad run stops before it compiles anything), without rematerialisation: the
# same numbers, a cheaper compile. The data keys given with it exist in every EVE config.
TINY_EVE = ["--config", "configs/eve.py:tiny_stage1", "--config.model.overrides.remat=none",
            "--config.train.log_every=1", "--config.train.progress_bar=False", "--config.train.steps=2",
            "--config.checkpoint.every=0", "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def env():
    """The test's 8 CPU devices, this directory importable; the run's compilation cache comes with the
    environment (tests/conftest.py)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__))]))


def train(workdir, *args):
    return [sys.executable, "-m", "evejax.cli", "train", "--workdir", str(workdir), *args]


def write_all_bad(path, n=40):
    """A LLaVA JSONL file in which no record is usable: cut JSON, no conversation, a missing image."""
    lines = []
    for i in range(n):
        lines.append([b'{"id": "cut", "conversations": ',
                      json.dumps({"id": f"e{i}", "conversations": []}).encode(),
                      json.dumps({"id": f"m{i}", "image": f"nope/{i}.jpg", "conversations": [
                          {"from": "human", "value": "<image>\ncaption"}, {"from": "gpt", "value": "a red circle."}]
                      }).encode()][i % 3])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_all_bad_records_stop_with_the_skips_by_kind(tmp_path):
    path = write_all_bad(tmp_path / "bad.jsonl", n=30)
    data = dict(name="llava", path=path, image_root=str(tmp_path), tokenizer="shapes", template="plain",
                seq_len=64, global_batch=2, image_size=64, patch_size=8, teacher_image_size=32,
                teacher_patch_size=8)
    it = pipeline.make_data(SimpleNamespace(data=data), 0, 1)
    with pytest.raises(NoGoodRecordsError, match=r"30 records in a row of .*bad\.jsonl .*whole pass") as e:
        next(it)
    assert re.search(r"malformed 10\b", str(e.value)) and re.search(r"empty_conversation 10\b", str(e.value))
    assert re.search(r"missing_image 10\b", str(e.value))
    assert it.stats()["skipped"] == 30
    # A shorter run of bad records than a pass, with max_bad_run below it, stops at max_bad_run.
    it = pipeline.make_data(SimpleNamespace(data=dict(data, max_bad_run=7)), 0, 1)
    with pytest.raises(NoGoodRecordsError, match=r"7 records in a row .*max_bad_run=7"):
        next(it)


def test_train_on_all_bad_jsonl_exits_nonzero_with_counts_and_file(tmp_path, env):
    path = write_all_bad(tmp_path / "bad.jsonl")
    start = time.monotonic()
    done = subprocess.run(train(tmp_path / "run", *TINY_EVE, "--config.data.name=llava",
                                f"--config.data.path={path}", f"--config.data.image_root={tmp_path}"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]
    assert time.monotonic() - start < 240
    last = done.stderr.strip().splitlines()[-1]   # the error itself, not a traceback
    assert str(tmp_path / "bad.jsonl") in last and "whole pass over this host's 40 records" in last
    assert re.search(r"malformed 14\b", last) and re.search(r"empty_conversation 13\b", last)
    assert re.search(r"missing_image 13\b", last)
    assert "Traceback" not in done.stderr


@pytest.fixture
def nothing_built(monkeypatch):
    """The trainer in this test must stop before it builds the state or compiles the step."""
    def built(*args, **kwargs):
        raise AssertionError("the state was built or the step compiled before the first batch was read")

    abstract_or_built = step_lib.init_state
    monkeypatch.setattr(step_lib, "make_train_step", built)
    monkeypatch.setattr(step_lib, "init_state", lambda *a: abstract_or_built(*a) if isinstance(
        a[-1], jax.core.Tracer) else built())   # under eval_shape the rng is a tracer


def test_bad_data_stops_the_run_before_the_state_is_built_or_the_step_compiled(tmp_path, nothing_built):
    path = write_all_bad(tmp_path / "bad.jsonl")
    config = config_lib.apply_overrides(config_lib.load("configs/eve.py:tiny_stage1"), [
        *TINY_EVE[2:], "--config.data.name=llava", f"--config.data.path={path}",
        f"--config.data.image_root={tmp_path}"])
    with pytest.raises(NoGoodRecordsError, match="malformed 14"):
        trainer.train(config, str(tmp_path / "run"))


def test_sigterm_while_waiting_for_the_first_batch_exits_with_nothing_saved(tmp_path, nothing_built,
                                                                            monkeypatch):
    asked = threading.Event()

    class AsksThenStalls(Stalls):
        def __next__(self):
            asked.set()
            return super().__next__()

    monkeypatch.setattr(trainer, "data_source", lambda name: lambda config, index, count: AsksThenStalls(
        synthetic.make_data(config, index, count), after=0))
    config = config_lib.apply_overrides(config_lib.load("configs/llm.py:tiny"), [
        "--config.data.seq_len=16", "--config.train.progress_bar=False", "--config.train.steps=4"])
    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=lambda: asked.wait(120) and os.kill(os.getpid(), signal.SIGTERM), daemon=True).start()
    assert trainer.train(config, str(tmp_path / "run")) == {"step": 0, "metrics": {}, "preempted": True}
    assert signal.getsignal(signal.SIGTERM) is handler
    assert ckpt_lib.Checkpoints(str(tmp_path / "run"), read_only=True).latest_step() is None


def stalled_data(config, process_index, process_count):
    """The synthetic batches, then nothing: the third batch never comes."""
    return Stalls(synthetic.make_data(config, process_index, process_count), after=2)


class Stalls:
    def __init__(self, batches, after):
        self.batches, self.left = batches, after

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            time.sleep(3600)
        self.left -= 1
        return next(self.batches)

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state):
        self.batches.set_state(state)


def test_sigterm_while_waiting_for_data_saves_and_exits_zero(tmp_path, env):
    workdir = tmp_path / "run"
    # The model, mesh and step count of tests/test_train_resume.py's run, so the step compiled for one
    # is read from the run's compilation cache by the other.
    command = train(workdir, "--config", "configs/llm.py:tiny", "--config.data.seq_len=16",
                    "--config.model.overrides.remat=none", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                    "--config.data.name=test_data_reliability:stalled_data", "--config.train.log_every=1",
                    "--config.train.progress_bar=False", "--config.train.steps=12",
                    "--config.checkpoint.every=0", "--config.checkpoint.async_save=False")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if re.search(r"step 2/12", line):
                    break
            time.sleep(1.0)   # the trainer is now waiting for the third batch
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            waited = time.monotonic() - sent
            lines += proc.stdout.readlines()
        finally:
            if proc.poll() is None:
                proc.kill()
    out = "".join(lines)
    assert code == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert waited < 30
    assert "preempted: saved checkpoint 2" in out
    assert ckpt_lib.load_params(str(workdir))[0] == 2


def write_llava_shapes(root, n=8):
    """A LLaVA-format JSONL of generated shapes captions, images as PNG files under root/img."""
    (root / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        scene = shapes.scene(i)
        shapes.render(scene).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "image": f"img/{i}.png",
                                 "conversations": shapes.caption_conversation(scene)}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "data.jsonl")


def test_tiny_eve_trains_on_llava_jsonl(tmp_path, env):
    path = write_llava_shapes(tmp_path)
    workdir = tmp_path / "run"
    done = subprocess.run(train(workdir, *TINY_EVE, "--config.data.name=llava",
                                f"--config.data.path={path}", f"--config.data.image_root={tmp_path}"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished 2 steps" in done.stdout
    assert ckpt_lib.load_params(str(workdir))[0] == 2


def test_pipeline_image_geometry_follows_the_model(tmp_path):
    path = write_llava_shapes(tmp_path, n=4)
    config = config_lib.apply_overrides(config_lib.load("configs/eve.py:7b_stage3"), [
        "--config.model.size=tiny", "--config.data.global_batch=2", f"--config.data.path={path}",
        f"--config.data.image_root={tmp_path}", "--config.data.tokenizer=shapes", "--config.data.seq_len=64"])
    spec = registry.build(config.model)
    assert pipeline.image_geometry(config) == spec.config.anyres()
    batch = next(pipeline.make_data(config, 0, 1))
    for key, want in spec.batch_specs(2, 64).items():
        assert batch[key].shape == want.shape and batch[key].dtype == want.dtype, key
    assert batch["has_image"].all() and batch["pixel_mask"].any()
    # The model's geometry cannot be contradicted from config.data.
    with pytest.raises(ValueError, match=r"\['image_size'\].*config.model"):
        pipeline.options(dict(config.data.to_dict(), image_size=672), spec.config.anyres())
    for arg in ("configs/eve.py:7b_stage1", "configs/eve.py:tiny_stage1", "configs/demo.py:stage3",
                "configs/demo.py:teacher"):
        assert set(config_lib.load(arg).data) == set(config_lib.DATA_KEYS), arg
