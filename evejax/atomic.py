"""Writing over something the user has: build it beside the target, swap it in when complete.

    with replaced_dir(out, owned=("info.json", "data.*")) as tmp:   # tmp: <out>.tmp-<token>, empty
        ...write everything into tmp...
    # out now holds exactly what was written into tmp; an exception inside leaves out untouched

    write_text(path, text)                                          # one file, the same rule
    write_file(path, lambda tmp: torch.save(obj, tmp))              # any writer, the same rule

A directory is swapped in by two renames: <out> -> <out>.old-<token>, then
<out>.tmp-<token> -> <out>; the old one is deleted last. Before the first rename
the complete old directory is at <out>, after the second the complete new one.
A crash between the two renames leaves no <out>, the complete old directory at
<out>.old-<token> and the complete new one at <out>.tmp-<token>: `recover(out)`,
which every `replaced_dir` runs first, renames the old one back (an interrupted
write leaves what was there) and deletes the leftovers; `leftover_note(out)`
names them for a reader that finds <out> missing. One writer per target at a time.

Files and directories are fsynced before each rename, so the swap holds across a
power cut as well as a kill.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence


def _siblings(path: Path, kind: str) -> list[Path]:
    pattern = re.compile(re.escape(path.name) + rf"\.{kind}-[0-9a-f]{{32}}")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def fsync(path: str | os.PathLike) -> None:
    """Flushes a file or directory to disk: a rename is crash-safe only once the renamed bytes
    (and the directory entry) are there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync(Path(directory) / name)
        fsync(Path(directory))


def recover(path: str | os.PathLike) -> None:
    """Finishes or undoes a swap into `path` that a crash cut short (module docstring)."""
    path = Path(path).absolute()
    old = _siblings(path, "old")
    if not path.exists() and old:
        if len(old) > 1:
            raise FileExistsError(f"{path} is missing and {len(old)} earlier versions of it are beside it "
                                  f"({', '.join(p.name for p in old)}); rename the one to keep to {path.name}")
        os.rename(old.pop(), path)
        fsync(path.parent)
    for leftover in old + _siblings(path, "tmp"):
        _remove(leftover)


def leftover_note(path: str | os.PathLike) -> str:
    """"" or a sentence naming what an interrupted write left beside a missing `path`."""
    path = Path(path).absolute()
    old = _siblings(path, "old")
    if path.exists() or not old:
        return ""
    return (f"; a write to it was interrupted and left the previous version at {old[-1]}: rerun the "
            f"command, or rename that directory to {path.name}")


def _foreign(path: Path, owned: Sequence[str] | None) -> list[Path]:
    if owned is None or not path.is_dir():
        return []
    return sorted(e for e in path.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in owned))


def _link_into(entry: Path, directory: Path) -> None:
    """`entry` under `directory` by hard links: the same bytes, nothing copied."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.copytree(entry, directory / entry.name, symlinks=True, copy_function=os.link)
    elif entry.is_symlink():
        os.symlink(os.readlink(entry), directory / entry.name)
    else:
        os.link(entry, directory / entry.name)


@contextlib.contextmanager
def replaced_dir(path: str | os.PathLike, owned: Sequence[str] | None = None,
                 keep_others: bool = False) -> Iterator[Path]:
    """Yields an empty directory beside `path`; on a normal exit it replaces `path`.

    `owned`: glob patterns of the entries a previous write put in `path`. Any
    other entry of an existing `path` is refused (FileExistsError, before
    anything is written) or, with `keep_others`, hard-linked into the new
    directory before the swap (files a user put beside an export), so the
    swap never deletes files it did not write. Whether replacing is allowed
    at all is the caller's check.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a directory")
    foreign = _foreign(path, owned)
    if foreign and not keep_others:
        names = ", ".join(e.name for e in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds files this command does not write ({names}); it replaces the "
                              "whole directory, so choose an empty or new one")
    token = uuid.uuid4().hex
    tmp = path.with_name(f"{path.name}.tmp-{token}")
    tmp.mkdir()
    try:
        yield tmp
        for entry in foreign:
            _link_into(entry, tmp)
        _fsync_tree(tmp)
    except BaseException:
        _remove(tmp)
        raise
    old = path.with_name(f"{path.name}.old-{token}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    fsync(path.parent)
    _remove(old)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary file beside it and one atomic rename."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` by one
    atomic rename; if `write` fails, `path` is untouched and the temporary file removed."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path
