"""How gpt3d creates files: crash-safe, never through a planted link, never deleting what it did not create.

Crash-safe: a result is built under a temporary name beside its target, fsynced and renamed into place, so a
reader (or a run resumed after kill -9) sees either the old file/directory or the complete new one. Used for
checkpoints, the `latest` tracker, Hugging Face exports, plots, preprocess's .bin/.idx, the sample-index
caches and the token-id caches.

Safe in a shared directory: every temporary gets a fresh, unpredictable name (`.NAME.tmp-HOST-PID-RANDOM`)
and is created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW, or mkdir), so a symlink or file planted under a
predictable name (`latest.tmp`, `model.tmp`) is never followed, overwritten or deleted. Only such temporaries
are ever removed: a writer's own on failure, and leftovers of a killed writer of the same target on this
host, recognised by that name and a process id that is no longer alive (`remove_leftovers`).

Modes: files are created 0666 and directories 0777 less the user's umask (0644 / 0755 under umask 022), as
any tool's output; `honour_umask` fixes files written by libraries that create them 0600 (safetensors).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator

_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


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


def umask() -> int:
    """The process' umask (read without changing it where /proc says it; else set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def honour_umask(path: str) -> None:
    """Give a regular file the mode a plain `open(path, "w")` would have (0666 less the umask)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)


def _temp_path(target: str) -> str:
    target = os.path.abspath(target)
    return os.path.join(os.path.dirname(target),
                        f".{os.path.basename(target)}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _leftover(target: str, name: str) -> bool:
    """Whether `name` (an entry beside `target`) is a temporary of `target` left by a dead process of this host."""
    m = re.fullmatch(rf"\.{re.escape(os.path.basename(os.path.abspath(target)))}\.tmp-(.+)-(\d+)-[0-9a-f]{{8}}",
                     name)
    if not m or m.group(1) != _HOST or int(m.group(2)) == os.getpid():
        return False
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except OSError:   # alive, another user's
        return False
    return False


def is_temporary(name: str) -> bool:
    """Whether a directory entry's name is one of gpt3d's temporaries (of any target)."""
    return re.fullmatch(r"\..+\.tmp-.+-\d+-[0-9a-f]{8}", name) is not None


def remove_created(path: str) -> None:
    """Remove what gpt3d created at `path` (a file, or a real directory and all in it; a symlink found there is
    unlinked, never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_leftovers(target: str) -> None:
    """Remove the temporaries of `target` that killed gpt3d processes of this host left beside it."""
    directory = os.path.dirname(os.path.abspath(target))
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if _leftover(target, name):
            remove_created(os.path.join(directory, name))


def new_file(target: str) -> str:
    """A new, empty temporary file beside `target`, created exclusively (never through a link); its path."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    while True:
        path = _temp_path(target)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def new_dir(target: str) -> str:
    """A new, empty temporary directory beside `target` (parents created); its path."""
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    while True:
        path = _temp_path(target)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path


def write_text(path: str, text: str) -> None:
    """`path` holds either its old content or `text`, also after a crash (a link at `path` is replaced, not
    followed)."""
    with replacing(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def publish_dir(tmp: str, final: str) -> None:
    """Rename the finished temporary `tmp` to `final` and make the rename durable. `final` must not exist or
    be an empty directory (rename replaces it), or be a directory the caller has established is gpt3d's
    own (it is moved aside under a temporary name, then removed)."""
    old = None
    if os.path.lexists(final) and not (os.path.isdir(final) and not os.path.islink(final)
                                       and not os.listdir(final)):
        old = _temp_path(final)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        remove_created(old)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields the path of a new temporary file beside `path`; on success it replaces `path`, on failure it
    is removed. Leftovers of killed writers of `path` on this host are removed first."""
    remove_leftovers(path)
    tmp = new_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_created(tmp)
