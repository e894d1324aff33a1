"""EVE checkpoints: official release layout (.bin shards, duplicated teacher) -> evejax ->
official safetensors, with and without the training-only PAL and CLIP teacher."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_eve_model import CFG, official_state_dict, reference_model  # noqa: E402

from evejax.models import eve  # noqa: E402
from evejax.port import commands  # noqa: E402
from evejax.port import eve as eve_port  # noqa: E402
from evejax.port import io  # noqa: E402
from evejax.port.io import CheckpointError  # noqa: E402
from evejax.port.torch_ref import eve as ref  # noqa: E402

# The official EVE-7B-v1.0 config.json fields (reference/eve.md §1.1).
OFFICIAL_7B_CONFIG = {
    "architectures": ["EVELlamaForCausalLM"], "model_type": "eve", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16", "transformers_version": "4.31.0",
    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "openai/eve-patch14-anypixel-672",
    "mm_vision_tower_clip": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch", "requires_cliploss": True, "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "image_aspect_ratio": "square"}


@pytest.fixture(scope="module")
def official():
    model, teacher = reference_model()
    state = official_state_dict(model, teacher)
    state["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # older transformers saved it
    return state


def _write_bin_shards(state, directory):
    """The release layout: two pytorch_model-*.bin shards + index + config.json."""
    directory.mkdir()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: torch.from_numpy(np.asarray(state[k])) for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / io.BIN_INDEX_NAME).write_text(json.dumps(index))
    io.save_config_json(eve_port.hf_config(CFG, "float32"), directory)


def _flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_import_release_then_export_both_ways(official, tmp_path):
    _write_bin_shards(official, tmp_path / "release")
    notes = eve_port.import_eve(tmp_path / "release", tmp_path / "ckpt")
    assert any("equals" in n for n in notes)
    assert commands.import_main(["--family", "eve", str(tmp_path / "release"), str(tmp_path / "ckpt")]) == 1
    cfg, params = eve_port.load_checkpoint(tmp_path / "ckpt")
    assert cfg == CFG
    expected, _ = eve_port.to_flax(official, CFG)
    got, want = _flat(params), _flat(expected)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    # Training export: official names, teacher once, sharded safetensors with an index.
    files = eve_port.export_eve(tmp_path / "ckpt", tmp_path / "train", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "train" / io.SAFETENSORS_INDEX_NAME).is_file()
    written = io.load_state_dict(tmp_path / "train")
    kept = {k: v for k, v in official.items()
            if not k.startswith(eve_port.DUPLICATE_CLIP_PREFIX) and "rotary_emb" not in k}
    assert written.keys() == kept.keys()
    assert all(np.array_equal(written[k], kept[k]) for k in kept)
    config = io.load_config_json(tmp_path / "train")
    assert {k: config[k] for k in ("architectures", "model_type", "mm_hidden_size", "mm_projector_type",
                                   "mm_vision_select_layer", "requires_cliploss", "mm_vision_tower")} == {
        "architectures": ["EVELlamaForCausalLM"], "model_type": "eve", "mm_hidden_size": 48,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "requires_cliploss": True,
        "mm_vision_tower": "openai/eve-patch4-anypixel-64"}

    # The export reads back into the same model.
    eve_port.import_eve(tmp_path / "train", tmp_path / "ckpt2")
    _, again = eve_port.load_checkpoint(tmp_path / "ckpt2")
    assert all(np.array_equal(v, want[k]) for k, v in _flat(again).items())

    # Inference export through the CLI: no PAL, no teacher; loads strictly into the official
    # layout without them.
    assert commands.export_main([str(tmp_path / "ckpt"), str(tmp_path / "infer"), "--inference"]) == 0
    inference = io.load_state_dict(tmp_path / "infer")
    assert not any(k.startswith((eve_port.PAL_PREFIX, "model.vision_clip.")) for k in inference)
    assert io.load_config_json(tmp_path / "infer")["requires_cliploss"] is False
    model, _ = reference_model(with_pal=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in inference.items()}, strict=True)
    assert inference.keys() == ref.strip_teacher_keys(kept, keep_pal=False).keys()


def test_teacher_copies(official):
    only_duplicate = {k: v for k, v in official.items() if not k.startswith(eve_port.CLIP_PREFIX)}
    params, notes = eve_port.to_flax(only_duplicate, CFG)
    assert any("copy" in n for n in notes)
    reference, _ = eve_port.to_flax(official, CFG)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["clip"]),
                                                    jax.tree.leaves(reference["clip"])))

    differing = dict(official)
    name = eve_port.DUPLICATE_CLIP_PREFIX + "vision_model.post_layernorm.bias"
    differing[name] = differing[name] + 1
    with pytest.raises(CheckpointError, match="different contents"):
        eve_port.to_flax(differing, CFG)

    no_teacher = {k: v for k, v in official.items() if "clip" not in k}
    with pytest.raises(CheckpointError, match="no CLIP teacher"):
        eve_port.to_flax(no_teacher, CFG)
    params, notes = eve_port.to_flax(no_teacher, CFG.replace(with_pal=False))
    assert set(params) == {"llm", "vision_tokenizer", "mm_projector"} and any("dropped" in n for n in notes)

    broken = dict(official)
    del broken["model.vision_tower.split_embedding"]
    broken["model.vision_tower.extra"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="split_embedding"):
        eve_port.to_flax(broken, CFG)


def test_official_config_json():
    for tower, size in (("openai/eve-patch14-anypixel-672", "7b"), ("openai/eve-patch14-anypixel-1344", "7b_hd")):
        cfg = eve_port.config_from_hf({**OFFICIAL_7B_CONFIG, "mm_vision_tower": tower})
        assert cfg == eve.get_config(size)
    assert eve_port.config_from_hf(OFFICIAL_7B_CONFIG, with_pal=False) == eve.get_config("7b", with_pal=False)
    written = eve_port.hf_config(eve.get_config("7b"), "bfloat16")
    assert {k: written[k] for k in OFFICIAL_7B_CONFIG if k != "transformers_version"} == {
        k: v for k, v in OFFICIAL_7B_CONFIG.items() if k != "transformers_version"}
    with pytest.raises(CheckpointError, match="teacher"):
        eve_port.config_from_hf({**OFFICIAL_7B_CONFIG, "mm_vision_tower_clip": "someone/other-clip"})


def test_family_converters_do_not_import_the_command_module():
    """Imports point one way: port.commands dispatches to port.eve / port.clip, which
    take their shared command-line pieces from port.command_line, never from commands."""
    import ast
    import importlib

    for name in ("evejax.port.eve", "evejax.port.clip", "evejax.port.command_line"):
        tree = ast.parse(open(importlib.import_module(name).__file__).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for a in node.names}
        assert not {"evejax.port.commands", "evejax.port.eve"} & imported - {name}, name
