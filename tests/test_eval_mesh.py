"""`--mesh` on `evejax eval` and `evejax generate` (8 fake CPU devices): on data 2 x fsdp 2 x tensor 2
a tiny EVE and HoVLE answer 5 held-out questions in batches of 3 (rows padded to the 4 data-parallel
devices, the padding dropped) exactly as without a mesh, and an LLM's 3 prompts decode the same ids;
a mesh that does not fit the 8 devices is an error naming the mesh and the device count, reported
before the checkpoint is read."""
import json

import jax
import pytest
from test_checkpoint_io import EVE_MODEL, _init, _workdir
from test_hovle_eval import MODEL as HOVLE_MODEL

from evejax import config as config_lib
from evejax.eval import evaluate as ev
from evejax.eval import generate as gen
from evejax.eval.benchmarks import run as bench_run
from evejax.port import checkpoint as port_ckpt
from evejax.port import hovle as hovle_port

MESH = "data=2,fsdp=2,tensor=2"
QUESTIONS = 5  # not a multiple of the mesh's 4 data-parallel devices


@pytest.mark.parametrize("family", ["eve", "hovle"])
def test_eval_on_a_mesh_answers_as_without_one(family, tmp_path):
    if family == "eve":
        _workdir(tmp_path / "ckpt", {"model": EVE_MODEL}, _init(EVE_MODEL, 0)[1], 2)
    else:
        hovle_port.save_checkpoint(tmp_path / "ckpt", *_init(HOVLE_MODEL, 3))

    def figures(*extra):
        out = tmp_path / f"{len(extra)}.json"
        argv = [str(tmp_path / "ckpt"), "--num-questions", str(QUESTIONS), "--batch-size", "3", "--json", str(out)]
        assert ev.main(argv + list(extra)) == 0
        return json.loads(out.read_text())

    alone, sharded = figures(), figures("--mesh", MESH)
    assert len(alone["predictions"]) == QUESTIONS and len(set(alone["predictions"])) > 1, alone["predictions"]
    for key in ("predictions", "blank_predictions"):
        assert sharded[key] == alone[key], key

    # the parameters really are split over the mesh (placed once, on the first batch)
    answerer = ev.load_shapes_answerer(tmp_path / "ckpt", 3, mesh=gen.mesh_from_arg(MESH))
    questions = ev.heldout_questions(3)
    assert answerer.answer([q.image for q in questions], [q.question for q in questions]) == alone["predictions"][:3]
    axes = {a for leaf in jax.tree.leaves(answerer.params) for a in jax.tree.leaves(tuple(leaf.sharding.spec))}
    assert {"fsdp", "tensor"} <= axes, axes


def test_generate_prompt_ids_on_a_mesh_as_without_one(tmp_path, capsys):
    model = config_lib.load("configs/llm.py:tiny").to_dict()["model"]
    port_ckpt.save_checkpoint(tmp_path / "lm", *_init(model, 0))
    argv = [str(tmp_path / "lm"), "--prompt-ids", "1,5,7", "--prompt-ids", "4,2", "--prompt-ids", "9", "--max-new",
            "5", "--no-eos"]
    assert gen.main(argv) == 0
    alone = capsys.readouterr().out
    assert gen.main(argv + ["--mesh", MESH]) == 0
    assert capsys.readouterr().out == alone and len(alone.splitlines()) == 3, alone


@pytest.mark.parametrize("mesh, message", [
    ("data=3", "mesh {'slice': 1, 'data': 3, 'fsdp': 1, 'tensor': 1} has 3 devices but 8 are available"),
    ("tensor=3,data=-1", "does not fit 8 devices"),
    ("dta=8", "mesh axes ['dta'] are not known"),
    ("data:8", "mesh 'data:8' is not axis=size,..."),
])
def test_a_mesh_that_does_not_fit_is_an_error_before_loading(mesh, message, tmp_path, capsys):
    missing = str(tmp_path / "no_checkpoint")  # a mesh error first means nothing was read or compiled
    assert ev.main([missing, "--mesh", mesh]) == 1
    assert gen.main([missing, "--prompt-ids", "1", "--mesh", mesh]) == 1
    assert bench_run.main([missing, "--bench", "pope", "--data-root", str(tmp_path), "--mesh", mesh]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all("--mesh: " in e and message in e for e in errors), errors
