"""evejax.atomic: a directory or file is replaced only by a complete new version."""
import os

import pytest

from evejax import atomic


def _tree(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _old(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.bin").write_bytes(b"old a")
    (out / "sub" / "b.bin").write_bytes(b"old b")
    return out, _tree(out)


def test_a_failing_writer_leaves_the_old_directory_and_no_leftovers(tmp_path):
    out, before = _old(tmp_path)
    with pytest.raises(RuntimeError, match="midway"):
        with atomic.replaced_dir(out) as tmp:
            (tmp / "a.bin").write_bytes(b"new a")
            raise RuntimeError("midway")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_complete_write_replaces_exactly(tmp_path):
    out, _ = _old(tmp_path)
    with atomic.replaced_dir(out) as tmp:
        assert tmp.parent == out.parent and list(tmp.iterdir()) == []
        (tmp / "c.bin").write_bytes(b"new c")
    assert _tree(out) == {"c.bin": b"new c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_is_undone_by_the_next_write(tmp_path):
    out, before = _old(tmp_path)
    token = "0" * 32
    # What a kill after the first rename leaves: the old aside, the complete new beside it.
    os.rename(out, tmp_path / f"out.old-{token}")
    (tmp_path / f"out.tmp-{token}").mkdir()
    (tmp_path / f"out.tmp-{token}" / "new.bin").write_bytes(b"new")
    assert "interrupted" in atomic.leftover_note(out) and f"out.old-{token}" in atomic.leftover_note(out)
    atomic.recover(out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert atomic.leftover_note(out) == ""


def test_foreign_files_are_refused_before_anything_is_written(tmp_path):
    out, before = _old(tmp_path)
    with pytest.raises(FileExistsError, match="a.bin"):
        with atomic.replaced_dir(out, owned=("sub",)):
            raise AssertionError("the body must not run")
    assert _tree(out) == before


def test_write_text_replaces_a_file_and_a_failure_leaves_it(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    monkeypatch.setattr(atomic, "fsync", lambda p: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "newer")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
