"""Reading and writing checkpoints from the command line: interrupted writes keep the old
checkpoint, damage is one line naming the path, training workdirs are taken by export,
generate and eval, unknown generated ids are wrong answers, and reads are quiet.

Workdirs are written through evejax.train.checkpoint.Checkpoints (the trainer's writer)
with random normal params in the models' shapes, so nothing is compiled to make them.
"""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from evejax import cli
from evejax import config as config_lib
from evejax.data import shapes
from evejax.eval import evaluate as ev
from evejax.models import registry
from evejax.port import checkpoint as port_ckpt
from evejax.port import eve as eve_port
from evejax.port import io, tables
from evejax.sharding import unbox
from evejax.train import checkpoint as ckpt_lib

ROOT = Path(__file__).parents[1]
# A small EVE of the demo's geometry (64 px canvas, the shapes tokenizer's 67 words in a
# 256-id LLM), one layer: random init answers with ids the tokenizer does not know.
EVE_MODEL = dict(name="eve", size="demo", pal_weight=1.0, overrides=dict(
    dtype="float32", remat="none", num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
    mlp_dim=64))
EXPECTED_WARNINGS = ("Given directory is read only", "Metadata file does not exist")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _init(model: dict, seed: int):
    """(config, random params as numpy): normal values in the model's shapes (compiling the
    EVE's init takes longer than every test here)."""
    spec = registry.build(ml_collections.ConfigDict(model))
    abstract = unbox(jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0), *spec.init_args,
                                                             **spec.init_kwargs)["params"]))
    rng = np.random.default_rng(seed)
    return spec.config, jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), abstract)


def _workdir(path, config: dict, params, step: int):
    store = ckpt_lib.Checkpoints(str(path), async_save=False)
    store.save(step, {"params": params, "step": np.int32(step)}, {}, config, {"loss": 1.0})
    store.wait()
    store.close()


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """An LM workdir (steps 1 and 3, different params), an import source (HF layout) and its checkpoint."""
    root = tmp_path_factory.mktemp("lm")
    config = config_lib.load("configs/llm.py:tiny").to_dict()
    cfg, params = _init(config["model"], 0)
    _, older = _init(config["model"], 1)
    _workdir(root / "run", config, older, 1)
    _workdir(root / "run", config, params, 3)
    port_ckpt.save_checkpoint(root / "ckpt", cfg, params)
    _, other = _init(config["model"], 2)
    port_ckpt.save_checkpoint(root / "other", cfg, other)
    assert cli.main(["export", str(root / "other"), str(root / "hf")]) == 0
    return root, cfg, params, other


# ---- item 6: an interrupted import or eval --json keeps what was there -------------------

def test_interrupted_import_overwrite_keeps_the_old_checkpoint(lm, tmp_path, monkeypatch):
    root, cfg, params, other = lm
    ckpt = tmp_path / "ckpt"
    port_ckpt.save_checkpoint(ckpt, cfg, params)
    before = _files(ckpt)
    argv = ["import", "--family", "llama", str(root / "hf"), str(ckpt), "--overwrite"]

    save = ocp.StandardCheckpointer.save

    def save_then_fail(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self.wait_until_finished()
        raise OSError("No space left on device")

    # The parameters are written, then the write fails: the old checkpoint is intact, nothing is left beside it.
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        cli.main(argv)
    monkeypatch.undo()
    assert _files(ckpt) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    # SIGKILL while Orbax writes in the background: no cleanup runs; the old checkpoint is intact and loads.
    script = ("import os, signal, sys\nimport orbax.checkpoint as ocp\nfrom evejax import cli\n"
              "save = ocp.StandardCheckpointer.save\n"
              "def save_then_die(self, *args, **kwargs):\n"
              "    save(self, *args, **kwargs)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "ocp.StandardCheckpointer.save = save_then_die\n"
              "cli.main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert _files(ckpt) == before
    _, loaded = port_ckpt.load_checkpoint(ckpt)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))

    # A complete import replaces it, and clears what the killed one left.
    assert cli.main(argv) == 0
    _, loaded = port_ckpt.load_checkpoint(ckpt)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(other)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in ckpt.iterdir()) == [port_ckpt.MODEL_JSON, port_ckpt.PARAMS_DIR]


def test_eval_json_is_replaced_only_when_complete(tmp_path, monkeypatch):
    class Answerer:  # stands in for the model: every answer "yes"
        def __init__(self, *args, **kwargs):
            pass

        def answer(self, pictures, questions):
            return ["yes"] * len(questions)

    monkeypatch.setattr(ev, "load_shapes_answerer", lambda path, batch_size, **kw: Answerer())
    out = tmp_path / "eval.json"
    out.write_text('{"accuracy": 0.5}\n')
    write_text = Path.write_text

    def half_then_disk_full(self, text, *args, **kwargs):
        write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        ev.main(["ckpt", "--num-questions", "8", "--json", str(out)])
    assert out.read_text() == '{"accuracy": 0.5}\n' and [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    monkeypatch.setattr(Path, "write_text", write_text)
    assert ev.main(["ckpt", "--num-questions", "8", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["counts"] and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


# ---- item 8: a damaged checkpoint is one line naming it -----------------------------------

def test_damaged_checkpoint_is_one_line_naming_it(lm, tmp_path, capsys):
    root, cfg, params, _ = lm
    ckpt = tmp_path / "ckpt"
    port_ckpt.save_checkpoint(ckpt, cfg, params)
    largest = max((p for p in (ckpt / port_ckpt.PARAMS_DIR).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
    capsys.readouterr()
    for argv in (["generate", str(ckpt), "--prompt-ids", "1,2,3"], ["export", str(ckpt), str(tmp_path / "out")]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(ckpt / port_ckpt.PARAMS_DIR) in err and "damaged" in err, err
    assert not (tmp_path / "out").exists()
    # A lost index file: reads still in flight when the restore fails print nothing more.
    ckpt = tmp_path / "ckpt2"
    port_ckpt.save_checkpoint(ckpt, cfg, params)
    for lost in (ckpt / port_ckpt.PARAMS_DIR / "d").iterdir():
        lost.unlink()
    done = subprocess.run([sys.executable, "-m", "evejax.cli", "generate", str(ckpt), "--prompt-ids", "1,2"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(ckpt / port_ckpt.PARAMS_DIR) in done.stderr


# ---- item 11: export and generate take a training workdir -----------------------------------

def test_export_and_generate_take_a_training_workdir(lm, tmp_path, capsys):
    root, cfg, params, _ = lm
    assert cli.main(["export", str(root / "run"), str(tmp_path / "hf")]) == 0
    assert "step 3" in capsys.readouterr().out
    exported = io.load_state_dict(tmp_path / "hf")
    want = tables.to_torch(params, cfg)
    assert exported.keys() == want.keys() and all(np.array_equal(exported[k], want[k]) for k in want)
    assert tables.config_from_hf(io.load_config_json(tmp_path / "hf"), "llama") == cfg

    argv = ["--prompt-ids", "5,17,99", "--prompt-ids", "4,2", "--max-new", "6", "--no-eos"]
    assert cli.main(["generate", str(root / "ckpt"), *argv]) == 0
    from_checkpoint = capsys.readouterr().out
    assert cli.main(["generate", str(root / "run"), *argv]) == 0
    assert capsys.readouterr().out == from_checkpoint and len(from_checkpoint.splitlines()) == 2


def test_export_takes_an_eve_workdir(tmp_path):
    cfg, params = _init(EVE_MODEL, 0)
    _workdir(tmp_path / "run", {"model": EVE_MODEL}, params, 2)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--inference"]) == 0
    inference_params, inference_cfg = eve_port.drop_training_parts(params, cfg)
    want = eve_port.to_torch(inference_params, inference_cfg)
    exported = io.load_state_dict(tmp_path / "hf")
    assert exported.keys() == want.keys() and all(np.array_equal(exported[k], want[k]) for k in want)
    assert io.load_config_json(tmp_path / "hf")["architectures"] == ["EVELlamaForCausalLM"]


# ---- items 12 and 15: eval of an under-trained EVE workdir, quiet reads -----------------------

@pytest.fixture(scope="module")
def eve_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eve")
    cfg, params = _init(EVE_MODEL, 0)
    _workdir(root / "run", {"model": EVE_MODEL}, params, 2)
    return root / "run", cfg


def test_unknown_generated_ids_are_wrong_answers_and_counted(eve_workdir, tmp_path):
    workdir, _ = eve_workdir
    argv = [str(workdir), "--num-questions", "6", "--batch-size", "6", "--json", str(tmp_path / "eval.json")]
    assert ev.main(argv) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < figures["out_of_vocabulary"] <= 6 and figures["blank_out_of_vocabulary"] >= 0
    assert figures["accuracy"] <= (6 - figures["out_of_vocabulary"]) / 6
    tokenizer = shapes.tokenizer()
    answer = ev.decode_answer([tokenizer.vocab_size + 101, tokenizer.eos_id], tokenizer)
    assert ev.is_out_of_vocabulary(answer) and str(tokenizer.vocab_size + 101) in answer
    assert ev.decode_answer(tokenizer.encode("yes") + [tokenizer.eos_id, 200], tokenizer) == "yes"


def test_eval_reads_a_workdir_without_expected_orbax_warnings(eve_workdir, caplog):
    workdir, cfg = eve_workdir
    with caplog.at_level(logging.WARNING):
        assert ev.load_model(workdir)[1] == cfg
    assert not [r for r in caplog.records if r.getMessage().startswith(EXPECTED_WARNINGS)], caplog.text


def test_silencing_keeps_other_warnings(caplog):
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING), port_ckpt.expected_orbax_warnings_silenced():
        absl.warning("Given directory is read only=/w/checkpoints")
        absl.warning("Metadata file does not exist: /w/checkpoints/7/state/_CHECKPOINT_METADATA")
        absl.warning("Metadata file does not exist: /ckpt/params/_CHECKPOINT_METADATA")  # a damaged import
        absl.warning("something real")
    assert [r.getMessage() for r in caplog.records] == [
        "Metadata file does not exist: /ckpt/params/_CHECKPOINT_METADATA", "something real"]


def test_demo_reads_without_expected_orbax_warnings(tmp_path, caplog, monkeypatch):
    from evejax import demo

    def run(out, quick, model):  # what the demo's reads of stage workdirs log
        ckpt_lib.load_params(str(workdir))
        return 0

    workdir = tmp_path / "run"
    _workdir(workdir, {"model": {"name": "llm"}}, {"w": np.ones(3, np.float32)}, 1)
    monkeypatch.setattr(demo, "run", run)
    with caplog.at_level(logging.WARNING):
        assert demo.main(["--out", str(tmp_path / "demo")]) == 0
    assert not [r for r in caplog.records if r.getMessage().startswith(EXPECTED_WARNINGS)]
