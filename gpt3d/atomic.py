"""Crash-safe writes: build the result under a temporary name, fsync it, rename it into place.

A reader (or a resumed run after kill -9) sees either the old file/directory or the complete new one, never
a half-written one. Used for checkpoints, Hugging Face exports, plots, preprocess's .bin/.idx, the
sample-index caches and the token-id caches.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> None:
    """`path` holds either its old content or `text`, also after a crash."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fresh_dir(tmp: str) -> str:
    """An empty temporary directory (a leftover of a killed writer is discarded); its parents are created."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish_dir(tmp: str, final: str) -> None:
    """Rename the finished `tmp` to `final` (replacing what was there) and make the rename durable."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
