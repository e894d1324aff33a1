"""HoVLE: the official-names PyTorch reference <-> evejax HoVLE through `evejax import` and
`evejax export` (float32 safetensors shards, config.json with embedding_config / llm_config,
tokenizer files), parity of embedding-module outputs and logits, and the refusals."""
import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from evejax.models import hovle  # noqa: E402
from evejax.port import commands, io  # noqa: E402
from evejax.port import hovle as hovle_port  # noqa: E402
from evejax.port.torch_ref.hovle import HolisticEmbeddingConfig, InternVLChatModel  # noqa: E402
from evejax.port.torch_ref.internlm2 import InternLM2Config  # noqa: E402

TOLERANCE = 1e-5  # max |diff| / max |reference| in float32
CTX, IMG_START, IMG_END = 250, 251, 252

# Tiny, with the same structure as HoVLE: GQA in both stacks, different RoPE bases, and dynamic
# NTK that engages in both (the embedding at > 32 tokens, the LLM at > 16), so a swapped or
# mis-positioned stream shows.
EMBEDDING = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, rms_norm_eps=1e-5, rope_theta=20000.0,
                 rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=32, image_size=56,
                 patch_size=14, llm_vocab_size=256, llm_hidden_size=64, img_context_token_id=CTX)
LLM = InternLM2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, bias=False,
                      rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0},
                      max_position_embeddings=16, pad_token_id=2)
TOKENIZER = {"tokenizer_config.json": b'{"model_max_length": 8192}\n', "added_tokens.json": b'{"<IMG_CONTEXT>": 250}\n',
             "tokenizer.model": bytes(range(256)) * 3}


def official_config(loc: str) -> dict:
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "embedding_config": HolisticEmbeddingConfig(**EMBEDDING, pixel_shuffle_loc=loc).to_hf_config_dict(),
            "llm_config": LLM.to_hf_config_dict(), "downsample_ratio": 0.5, "force_image_size": 56,
            "max_dynamic_patch": 3, "use_thumbnail": True, "template": "internlm2-chat",
            "normalize_encoder_output": False}


def reference(loc: str, seed: int = 0):
    torch.manual_seed(seed)
    model = InternVLChatModel(HolisticEmbeddingConfig(**EMBEDDING, pixel_shuffle_loc=loc), LLM).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    return model


def streams(tiles: int, seed: int = 0):
    """(input_ids [1, N], hd_input_ids [1, N_hd], pixel_values [T, 3, 56, 56]) as official chat builds them."""
    rng = np.random.default_rng(seed)
    text = lambda k: rng.integers(3, 240, k).tolist()  # noqa: E731
    head, tail = [1] + text(3) + [IMG_START], [IMG_END] + text(4)
    ids = head + [CTX] * 4 * tiles + tail
    hd_ids = head + [CTX] * 16 * tiles + tail
    pixels = torch.from_numpy(rng.standard_normal((tiles, 3, 56, 56)).astype(np.float32))
    return torch.tensor([ids]), torch.tensor([hd_ids]), pixels


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def write_official(model, loc, directory):
    directory.mkdir()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    io.save_state_dict(state, directory, max_shard_bytes=300_000)
    io.save_config_json(official_config(loc), directory)
    for name, data in TOKENIZER.items():
        (directory / name).write_bytes(data)
    return state


def compare(model, cfg, params, tiles):
    ids, hd_ids, pixels = streams(tiles, seed=tiles)
    with torch.no_grad():
        logits, _, out = model(pixels, ids, hd_ids, return_embeddings=True)
    encoder_outputs, got = _jax_forward(cfg)(params, ids.numpy().astype(np.int32),
                                             pixels.permute(0, 2, 3, 1).numpy()[None])
    return rel(encoder_outputs, out.numpy()), rel(got, logits.numpy())


@functools.cache
def _jax_forward(cfg):
    """(embedding-module outputs, logits), one compilation per config and shape."""
    module = hovle.HoVLE(cfg)

    def forward(params, tokens, pixels):
        x = module.apply({"params": params}, tokens, pixels, method=hovle.HoVLE.embed_inputs)
        return x.encoder_outputs, module.apply({"params": params}, tokens, pixels)

    return jax.jit(forward)


@pytest.mark.parametrize("loc", ["pre", "post"])
def test_import_export_parity(loc, tmp_path, capsys):
    model = reference(loc)
    state = write_official(model, loc, tmp_path / "official")
    assert len(list((tmp_path / "official").glob("model-*.safetensors"))) > 1
    assert commands.import_main(["--family", "hovle", str(tmp_path / "official"), str(tmp_path / "ckpt")]) == 0
    cfg, params = hovle_port.load_checkpoint(tmp_path / "ckpt")
    assert cfg.pixel_shuffle_loc == loc and cfg.embedding.transformer.rope_base == 20000.0
    for tiles in (1, 4):  # one tile; three tiles + thumbnail
        emb_diff, logit_diff = compare(model, cfg, params, tiles)
        print(f"after import {loc} tiles={tiles}: embedding {emb_diff:.2e} logits {logit_diff:.2e}")
        assert emb_diff <= TOLERANCE and logit_diff <= TOLERANCE

    out = tmp_path / "exported"
    assert commands.export_main([str(tmp_path / "ckpt"), str(out), "--max-shard-size", "300KB"]) == 0
    index = json.loads((out / io.SAFETENSORS_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert all((out / name).read_bytes() == data for name, data in TOKENIZER.items())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "params"]
    written = io.load_state_dict(out, keep_dtype=True)
    assert sorted(written) == sorted(state)
    assert list(hovle_port.to_torch(params, cfg)) == list(state)  # the official state-dict order
    assert all(written[k].dtype == np.float32 and np.array_equal(written[k], state[k]) for k in state)
    config = json.loads((out / io.CONFIG_NAME).read_text())
    assert config["embedding_config"]["pixel_shuffle_loc"] == loc
    assert config["llm_config"]["model_type"] == "internlm2" and config["model_type"] == "internvl_chat"

    exported = InternVLChatModel(HolisticEmbeddingConfig.from_hf_config_dict(config["embedding_config"]),
                                 InternLM2Config.from_hf_config_dict(config["llm_config"])).eval()
    exported.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()}, strict=True)
    for tiles in (1, 4):
        emb_diff, logit_diff = compare(exported, cfg, params, tiles)
        print(f"after export {loc} tiles={tiles}: embedding {emb_diff:.2e} logits {logit_diff:.2e}")
        assert emb_diff <= TOLERANCE and logit_diff <= TOLERANCE


def test_official_names_and_count_of_the_release():
    cfg = hovle.get_config("2.6b")
    shapes = hovle_port.official_shapes(cfg)
    assert len(shapes) == 236 and sum(int(np.prod(s)) for s in shapes.values()) == 2_606_327_808
    assert shapes["embedding_model.encoder.7.attention.wqkv.weight"] == (4096, 2048)
    assert shapes["embedding_model.vision_embeddings.position_embedding"] == (1, 1025, 2048)
    assert shapes["embedding_model.vision_embeddings.patch_embedding.weight"] == (2048, 3, 14, 14)
    assert shapes["embedding_model.pixel_shuffle_proj.0.weight"] == (2048, 8192)
    assert shapes["embedding_model.llm_text_embeddings.weight"] == (92553, 2048)
    assert shapes["language_model.output.weight"] == (92553, 2048)
    assert hovle_port.official_shapes(hovle.get_config("2.6b_hd")) == shapes


def test_refusals_name_the_problem_and_write_nothing(tmp_path, capsys):
    model = reference("pre")
    write_official(model, "pre", tmp_path / "official")

    # Another family's checkpoint: an InternLM2 directory.
    lm = tmp_path / "internlm2"
    lm.mkdir()
    io.save_config_json(LLM.to_hf_config_dict(), lm)
    assert commands.import_main(["--family", "hovle", str(lm), str(tmp_path / "a")]) == 1
    assert "model_type 'internlm2'" in capsys.readouterr().err and not (tmp_path / "a").exists()

    # An unknown pixel_shuffle_loc.
    bad = official_config("pre")
    bad["embedding_config"]["pixel_shuffle_loc"] = "middle"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert commands.import_main(["--family", "hovle", str(tmp_path / "official"), str(tmp_path / "b"),
                                 "--config", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert "pixel_shuffle_loc 'middle'" in err and not (tmp_path / "b").exists()

    # Weights of another size: every mismatch listed, nothing written.
    small = official_config("pre")
    small["llm_config"]["num_hidden_layers"] = 1
    (tmp_path / "small.json").write_text(json.dumps(small))
    assert commands.import_main(["--family", "hovle", str(tmp_path / "official"), str(tmp_path / "c"),
                                 "--config", str(tmp_path / "small.json")]) == 1
    assert "language_model.model.layers.1.attention.wqkv.weight" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
