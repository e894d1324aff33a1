"""`evejax demo --quick`: every phase of the demo at toy sizes (tests/test_demo_hovle.py: the same
for `--model hovle`, a file of its own so that the two runs can go to two test workers).

Checks the artefacts (stage checkpoints, the exported official layout, the two
PNGs, results.json), that the PyTorch reference answers exactly what the JAX
model answers, and, so that agreement cannot come from two degenerate answers,
that the reference's next-token logits on the exported weights equal the JAX
model's on the final checkpoint for those prompts.
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from evejax import demo  # noqa: E402
from evejax.data import image as image_lib  # noqa: E402
from evejax.data import shapes  # noqa: E402
from evejax.eval import evaluate as ev  # noqa: E402
from evejax.models import eve  # noqa: E402
from evejax.port import eve as eve_port  # noqa: E402
from evejax.port import io  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    status = demo.main(["--out", str(out), "--quick"])
    return out, status


def test_artefacts(quick_demo):
    out, status = quick_demo
    assert status == 0
    for stage in ("teacher", "stage1", "stage2", "stage3"):
        assert (out / stage / "checkpoints" / str(demo.QUICK_STEPS)).is_dir(), stage
    config = io.load_config_json(out / "eve_official")
    assert config["architectures"] == ["EVELlamaForCausalLM"] and config["requires_cliploss"] is False
    assert any(k.startswith("model.vision_tower.") for k in io.load_state_dict(out / "eve_official"))
    for png in ("loss_curves.png", "heldout_grid.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png
    results = json.loads((out / "results.json").read_text())
    assert len(results["torch"]) == demo.TORCH_QUESTIONS
    assert all(r["jax"] == r["pytorch"] for r in results["torch"]), results["torch"]
    assert results["checks"] == {"PyTorch answers == JAX answers": True}
    assert sum(results["counts"].values()) == demo.QUICK_QUESTIONS
    # Refuses to write into a used directory.
    assert demo.main(["--out", str(out), "--quick"]) == 1


def test_exported_logits_match_jax(quick_demo):
    out, _ = quick_demo
    cfg, params = eve_port.load_checkpoint(out / "eve_final")
    anyres = cfg.anyres()
    model = demo.reference_model(out / "eve_official")
    tokenizer = shapes.tokenizer()
    inference = cfg.replace(with_pal=False)
    kept = {k: v for k, v in params.items() if k not in ("vision_compressor", "clip")}
    for q in ev.heldout_questions(demo.TORCH_QUESTIONS):
        ids = ev.prompt_ids(q.question, tokenizer)
        view = image_lib.preprocess_anyres(q.image, anyres, with_teacher=False)
        out_jax = eve.EVE(inference).apply({"params": kept}, ids[None], np.ones((1, len(ids)), np.int32),
                                           view.pixels[None], view.mask[None])
        last = int(np.max(np.nonzero(np.asarray(out_jax.segment_ids[0]))))
        with torch.no_grad():
            logits = model(torch.from_numpy(ids).long()[None],
                           pixel_values=torch.from_numpy(view.chw4())[None]).logits[0, -1].numpy()
        want = np.asarray(out_jax.logits[0, last])
        assert np.max(np.abs(logits - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), q.question
