"""The project's error types: one base, one exit code each, printed by the CLI alone.

A `Gpt3dError` is an error the user can act on (a bad setting, a missing or corrupt file, a checkpoint that
does not fit) or a run that cannot go on (diverged): `gpt3d.cli.main` prints it as the one line
`gpt3d: error: <message>` and exits with the error's `exit_code`, without a traceback. Anything else is a bug
or a crash and keeps its traceback (under torchrun it goes to the job's failure summary). Modules raise;
they never print errors themselves.

The subclasses also derive from the builtin type they replaced (ValueError, RuntimeError), so code that
caught those keeps working.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class Gpt3dError(Exception):
    """An error the CLI reports as one line; `exit_code` is the process' exit status."""
    exit_code = 2


class ConfigError(Gpt3dError, ValueError):
    """A bad or inconsistent setting."""


class DataError(Gpt3dError, ValueError):
    """A data file that cannot be used (missing, corrupt, too small); the message names it."""


class TokenizerError(Gpt3dError, ValueError):
    """A vocabulary or merges file that cannot be used."""


class CheckpointError(Gpt3dError, RuntimeError):
    """A checkpoint that cannot be used or written; the message says which and why."""


class HFError(Gpt3dError, ValueError):
    """A model or directory that cannot be converted to or from Hugging Face."""


class PlotError(Gpt3dError, ValueError):
    """A metrics file that cannot be plotted."""


class FileError(Gpt3dError, OSError):
    """A file the user named cannot be read or written (an OSError at a command's boundary)."""


class PreprocessError(DataError):
    """Bad input to `gpt3d preprocess` (a user error like any other: exit code 2)."""


class TrainingError(Gpt3dError, RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message names the iteration. Exit code 3."""
    exit_code = 3


class HangError(Gpt3dError, RuntimeError):
    """A rank made no progress within its deadline (train/watchdog.py); the message names the stuck ranks.
    Exit code 4: the job is ended so that a launcher can restart it from the last checkpoint."""
    exit_code = 4


def error_line(e: Gpt3dError) -> str:
    """How an error is shown: the CLI prints it; the watchdog, whose main thread is stuck, prints it itself."""
    return f"gpt3d: error: {e}"


def os_errors_are_user_errors(fn: Callable) -> Callable:
    """For commands whose files all come from the user: an OSError (missing input, unwritable output)
    becomes a FileError with the same message, so the CLI reports it as one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Gpt3dError:
            raise
        except OSError as e:
            raise FileError(str(e)) from e
    return wrapper


def warn(msg: str) -> None:
    """A problem the run survives (a skipped checkpoint, a failed plot): one `gpt3d: warning:` line."""
    sys.stderr.write(f"gpt3d: warning: {msg}\n")   # one write (print writes the newline apart): ranks sharing
    sys.stderr.flush()                              # a stderr never split the line
