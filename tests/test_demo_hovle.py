"""`evejax demo --model hovle --quick`: every phase of the HoVLE demo at toy sizes.

Checks the artefacts (stage checkpoints, the teacher's CLIP imported and kept frozen, the exported
official layout, results.json), that the PyTorch reference answers exactly what the JAX model
answers, and, so that agreement cannot come from two degenerate answers, that the reference's
next-token logits on the exported weights equal the JAX model's for those prompts.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402

from evejax import demo  # noqa: E402
from evejax.eval import evaluate as ev  # noqa: E402
from evejax.models import hovle  # noqa: E402
from evejax.port import clip as clip_port  # noqa: E402
from evejax.port import hovle as hovle_port  # noqa: E402
from evejax.port import io  # noqa: E402
from evejax.train import checkpoint as ckpt_lib  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_hovle_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_hovle") / "out"
    status = demo.main(["--model", "hovle", "--out", str(out), "--quick"])
    return out, status


def test_hovle_artefacts_and_checks(quick_hovle_demo):
    out, status = quick_hovle_demo
    assert status == 0
    for stage in ("teacher",) + demo.STAGES:
        assert (out / stage / "checkpoints" / str(demo.QUICK_STEPS)).is_dir(), stage
    # Stage 1 distils to EVE demo's trained CLIP: imported into teacher/clip, and frozen there; stages
    # 2 and 3 keep the teacher for their distill_image term, CLIP and projection frozen.
    _, trained = ckpt_lib.load_params(str(out / "teacher"))
    _, stage1 = ckpt_lib.load_params(str(out / "stage1"))
    _, stage3 = ckpt_lib.load_params(str(out / "stage3"))
    _, saved = clip_port.load_checkpoint(out / "teacher_clip")
    for a, b, c in zip(jax.tree.leaves(trained["clip"]), jax.tree.leaves(saved),
                       jax.tree.leaves(stage1["teacher"]["clip"]), strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    jax.tree.map(np.testing.assert_array_equal, stage3["teacher"], stage1["teacher"])
    config = io.load_config_json(out / "hovle_official")
    assert config["model_type"] == "internvl_chat" and config["max_dynamic_patch"] == 1
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "hovle" and len(results["torch"]) == demo.TORCH_QUESTIONS
    assert all(r["jax"] == r["pytorch"] for r in results["torch"]), results["torch"]
    assert results["checks"] == {"PyTorch answers == JAX answers": True}
    assert sum(results["counts"].values()) == demo.QUICK_QUESTIONS
    assert (out / "loss_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_hovle_exported_logits_match_jax(quick_hovle_demo):
    out, _ = quick_hovle_demo
    cfg, params = hovle_port.load_checkpoint(out / "hovle_final")
    model = demo.hovle_reference_model(out / "hovle_official")
    answerer = ev.FAMILIES["hovle"].answerer(cfg, params, 1)
    for q in ev.heldout_questions(demo.TORCH_QUESTIONS):
        tiled = answerer.tiles(cfg, q.image)
        ids = np.asarray([answerer.prompt_ids(q.question, tiled.num_tiles)], np.int32)
        want = np.asarray(hovle.HoVLE(cfg).apply({"params": params}, ids, tiled.pixels[None],
                                                 tile_mask=tiled.tile_mask[None])[0, -1])
        pixels = torch.from_numpy(tiled.pixels[:tiled.num_tiles].transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            logits = model(pixels, torch.from_numpy(ids).long())[0, -1].numpy()
        assert np.max(np.abs(logits - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), q.question
