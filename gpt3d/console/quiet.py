"""Third-party imports without their noise: one place that knows which libraries talk while being imported.

Importing torchao (gpt3d's `--fp8`, and transformers, which imports it when installed) logs a "Failed to load
.../torchao/_C_*.so" line per CUDA extension it cannot use on this machine and, through torch, a deprecation
line per Enum it registers; transformers and torchao may also raise DeprecationWarning/FutureWarning while
loading. None of it is about the user's run, and a first-time user takes it for an error. So gpt3d imports
those libraries inside `quiet_imports()`, which lowers only those libraries' loggers and warnings for the
duration of the import. gpt3d's own warnings (gpt3d.errors.warn, printed directly) are never affected, nor is
anything the libraries say after they are imported.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Loggers that speak while torchao / transformers are imported (see the module docstring).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers")
NOISY_MODULES = r"(torchao|transformers|torch\.utils\._pytree)(\.|$)"


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Within the block, NOISY_LOGGERS log only errors and the noisy modules' deprecation warnings are hidden."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
