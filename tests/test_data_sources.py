"""Record sources: LLaVA JSON/JSONL, the ArrayRecord conversion round trip, TFDS."""
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from evejax.data import commands, pipeline, sources
from test_data_pipeline import assert_batches_equal, llava_data, write_llava


def _originals(path):
    """Good records of a write_llava JSONL, parsed, in file order."""
    out = []
    for line in open(path, "rb").read().splitlines():
        try:
            out.append(sources.parse_record(line))
        except sources.BadRecord:
            pass
    return out


@pytest.mark.parametrize("embed", [True, False])
def test_arrayrecord_round_trip_is_lossless(tmp_path, embed, capsys):
    path, good = write_llava(tmp_path, n_good=10)
    out = tmp_path / "ar"
    argv = ["convert", path, "--image-root", str(tmp_path), "--out", str(out), "--shards", "3"]
    assert commands.main(argv + (["--embed-images"] if embed else [])) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["shards"] == 3 and len(list(out.glob("data.array_record-*-of-00003"))) == 3
    # Conversion skips what it can see without decoding images: bad UTF-8, bad JSON and,
    # when embedding, a missing file. The rest is caught (and counted) by the pipeline.
    expected_skips = {"undecodable_text": 1, "malformed": 1} | ({"missing_image": 1} if embed else {})
    assert info["skipped"] == expected_skips
    originals = [r for r in _originals(path) if not (embed and r["id"] == "missing")]
    decoded = list(sources.iter_arrayrecord(str(out)))
    assert [r for r, _ in decoded] == originals
    for record, image in decoded:
        if embed and "image" in record:
            assert image == (tmp_path / record["image"]).read_bytes()
        else:
            assert image is None
    assert commands.main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert commands.main(["inspect", str(out), "-n", "1"]) == 0
    assert f"{len(originals)} records in 3 shard(s)" in capsys.readouterr().out


@pytest.mark.parametrize("embed", [True, False])
def test_arrayrecord_pipeline_matches_the_jsonl_pipeline(tmp_path, embed):
    path, _ = write_llava(tmp_path, n_good=10, bad=False)
    out = tmp_path / "ar"
    sources.convert_conversations(path, str(out), str(tmp_path), embed_images=embed, shards=2, log=lambda _: None)
    direct = list(pipeline.make_data(SimpleNamespace(data=llava_data(path, tmp_path, num_epochs=1)), 0, 1))
    # By-path records find their images through the image root recorded in info.json.
    data = dict(llava_data(str(out), "", num_epochs=1), name="arrayrecord")
    converted = list(pipeline.make_data(SimpleNamespace(data=data), 0, 1))
    assert_batches_equal(converted, direct)


def test_json_list_and_jsonl_give_the_same_records(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "é" * i}]} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    as_list, as_lines = sources.JsonConversations(tmp_path / "a.json"), sources.JsonConversations(tmp_path / "a.jsonl")
    assert len(as_list) == len(as_lines) == 5
    assert [sources.parse_record(as_list[i]) for i in range(5)] == records
    assert [sources.parse_record(as_lines[i]) for i in range(5)] == records
    with pytest.raises(sources.BadRecord, match="malformed"):
        sources.decode_record(b"JUNKJUNK")


def _tiny_tfds(data_dir):
    """A 2-split image-classification set written by TFDS's own ArrayRecord writer (no TensorFlow)."""
    import tensorflow_datasets as tfds

    class TinyShapesTfds(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=5)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "validation": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((10 + i, 20 - i, 3), 10 * i, np.uint8)).save(buf, "PNG")
                yield i, {"image": buf.getvalue(), "label": i % 5}

    TinyShapesTfds(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "tiny_shapes_tfds"


def test_tfds_imagenet_pipeline_on_a_tfds_array_record_set(tmp_path):
    name = _tiny_tfds(str(tmp_path))
    data = dict(name="tfds_imagenet", tfds_name=name, tfds_dir=str(tmp_path), global_batch=4, image_size=8,
                num_epochs=1, seed=0)
    labels, pixels = [], []
    for host in (0, 1):
        for batch in pipeline.make_data(SimpleNamespace(data=data), host, 2):
            assert batch["pixels"].shape == (2, 8, 8, 3) and batch["pixels"].dtype == np.float32
            labels += batch["label"].tolist()
            pixels.append(batch["pixels"])
    assert sorted(labels) == sorted(i % 5 for i in range(12))
    # Eval view: no augmentation, so example i (label i, TFDS stores them shuffled) is grey 10 * i.
    data = dict(data, split="validation", augment=False, shuffle=False)
    (batch,) = list(pipeline.make_data(SimpleNamespace(data=data), 0, 1))
    std = np.asarray((0.229, 0.224, 0.225), np.float32)
    mean = np.asarray((0.485, 0.456, 0.406), np.float32)
    grey = (batch["pixels"] * std + mean).mean(axis=(1, 2, 3)) * 255
    assert sorted(batch["label"].tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(grey, 10 * batch["label"], atol=0.05)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_convert_overwrite_keeps_the_old_set_until_the_new_one_is_complete(tmp_path, capsys, monkeypatch):
    path, _ = write_llava(tmp_path, n_good=10, bad=False)
    out = tmp_path / "ar"
    argv = ["convert", path, "--out", str(out), "--shards", "2", "--overwrite"]
    assert commands.main(argv) == 0
    before = _files(out)
    # A typo in the source path: an error, and the old set untouched.
    assert commands.main(["convert", path + "x", "--out", str(out), "--overwrite"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert _files(out) == before
    # A conversion that fails after some records (as a kill or a full disk would cut it).
    written = []

    def failing_encode(record, image):
        if len(written) == 4:
            raise OSError("No space left on device")
        written.append(record)
        return sources.MAGIC + b"\0\0\0\0"

    monkeypatch.setattr(sources, "encode_record", failing_encode)
    with pytest.raises(OSError, match="No space"):
        commands.main(["convert", path, "--out", str(out), "--shards", "3", "--overwrite"])
    monkeypatch.undo()
    assert len(written) == 4 and _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar", "data.jsonl", "img"]
    # A complete conversion replaces it; info.json describes exactly the shards on disk.
    assert commands.main(["convert", path, "--out", str(out), "--shards", "3", "--overwrite"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert sorted(_files(out)) == ["data.array_record-0000{}-of-00003".format(k) for k in range(3)] + ["info.json"]
    assert info["shards"] == 3 and len(list(sources.iter_arrayrecord(str(out)))) == info["num_records"] == 10


def test_convert_killed_midway_leaves_the_old_set(tmp_path):
    path, _ = write_llava(tmp_path, n_good=6, bad=False)
    out = tmp_path / "ar"
    assert commands.main(["convert", path, "--out", str(out), "--shards", "2"]) == 0
    before = _files(out)
    # SIGKILL from inside the writer after the second record: no cleanup code runs.
    script = (
        "import os, signal, sys\n"
        "from evejax.data import commands, sources\n"
        "encode, n = sources.encode_record, [0]\n"
        "def killing(record, image):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return encode(record, image)\n"
        "sources.encode_record = killing\n"
        "commands.main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "convert", path, "--out", str(out), "--overwrite"],
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])), capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _files(out) == before
    assert any(p.name.startswith("ar.tmp-") for p in tmp_path.iterdir())  # the killed run's partial output
    assert commands.main(["convert", path, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar", "data.jsonl", "img"]  # cleaned up
    assert json.loads((out / "info.json").read_text())["shards"] == 1


def test_convert_refuses_a_directory_with_other_files(tmp_path, capsys):
    path, _ = write_llava(tmp_path, n_good=4, bad=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert commands.main(["convert", path, "--out", str(tmp_path / "notes")]) == 1
    assert "todo.txt" in capsys.readouterr().err
    assert _files(tmp_path / "notes") == {"todo.txt": b"mine"}
