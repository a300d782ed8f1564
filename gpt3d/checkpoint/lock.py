"""One run owns its --save directory: an exclusive lock on SAVE/.lock for as long as the run lives.

Two runs saving into one directory used to die with a misleading I/O error and leave checkpoints of both
mixed together. Now rank 0 of a job takes `flock(LOCK_EX | LOCK_NB)` on SAVE/.lock before the run touches
anything and broadcasts the outcome, so a second job (on this node or, where the file system supports flock
across nodes, as NFSv4 and Lustre mounted with `flock` do, on another) fails at start on every rank with one
line, naming the holder recorded in the file (pid, host, start time). The other ranks of the owning job need
no lock of their own: they act only through the job's collectives. The kernel drops the lock when the
holding process ends, however it ends (kill -9 included), so a stale .lock file never blocks a new run.

The lock file is opened without following links (O_NOFOLLOW) and must be a regular file with one name: a
symlink or hard link planted at SAVE/.lock is refused with one line, never written through.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import stat
from typing import Optional

import torch.distributed as dist

from ..errors import CheckpointError
from ..parallel.state import ParallelState

LOCK_FILE = ".lock"


class SaveDirLock:
    """The held lock of one --save directory (rank 0's); `release` (or the process ending) gives it up."""

    def __init__(self, root: str, fd: Optional[int]):
        self.root, self._fd = root, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor drops the flock
            self._fd = None


def _try_lock(root: str) -> tuple[Optional[int], Optional[str]]:
    """(descriptor holding the lock, None) or (None, why not)."""
    path = os.path.join(root, LOCK_FILE)
    try:
        os.makedirs(root, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, f"{path} is a symbolic link; refusing to write through it (remove it)"
        return None, f"cannot create the lock file {path}: {e.strerror or e}"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        return None, f"{path} is {what}; refusing to write to it (remove it)"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        return None, (f"--save {root} is in use by another run ({holder}); two runs saving into one directory would "
                      "mix their checkpoints: wait for it to end, stop it, or pass another --save")
    except OSError as e:   # a file system without flock
        os.close(fd)
        return None, f"cannot lock {path}: {e.strerror or e} (the --save file system must support flock)"
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd, None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "its pid is not recorded yet"


def lock_save_dir(root: str, ps: ParallelState) -> SaveDirLock:
    """Take the job's lock on `root` (rank 0 holds it). A collective: every rank gets the lock object or the
    same CheckpointError."""
    fd, err = _try_lock(root) if ps.rank == 0 else (None, None)
    if ps.distributed:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise CheckpointError(err)
    return SaveDirLock(root, fd)
