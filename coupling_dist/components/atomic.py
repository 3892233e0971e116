"""Atomic writes: the one helper family every module uses to put a file or a directory in place.

A reader sees the old version or the new one, never a partial file: the content goes to a hidden
temporary name beside the target (``.<name>.tmp.<pid>``, same filesystem), is fsynced, and is
renamed over the target. A failed write removes its temporary file; stale temporaries left by a
killed process carry the ``.tmp.`` infix so a stage can sweep them (``data.shard_job``).
Directories (exports, built assets) are written into a temporary sibling directory and swapped in.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp.{os.getpid()}")


def write_with(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
    """``write(fh)`` fills a temp file beside ``path``; then fsync and rename into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_path(path: str, write: Callable[[str], None]) -> None:
    """For writers that want a path (``torch.save``, ``fig.savefig``): ``write(tmp_path)``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    write_with(path, lambda fh: fh.write(data), binary=True)


def write_text(path: str, text: str) -> None:
    write_with(path, lambda fh: fh.write(text))


def write_json(path: str, obj: Any) -> None:
    """Indented, key-sorted JSON with a trailing newline (non-JSON values as ``str``)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    write_with(path, lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir(out_dir: str, write: Callable[[str], None], replace: bool = True) -> str:
    """``write(tmp_dir)`` fills a temporary sibling of ``out_dir``, which is then renamed into place.

    ``replace=True``: an existing ``out_dir`` is moved aside first and removed after the swap.
    ``replace=False`` (build-once caches): an existing ``out_dir`` is kept and nothing is built; if
    another process wins the race to create it, its copy is kept."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    if not replace and os.path.exists(out_dir):
        return out_dir
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp.", dir=parent)
    old = None
    try:
        write(tmp)
        fsync_tree(tmp)
        if replace and os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{base}.old.", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if replace or not os.path.exists(out_dir):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
