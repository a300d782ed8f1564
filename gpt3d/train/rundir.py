"""Which directory a training run writes its metrics (and W&B files) to: its own, never another run's.

A run is named by --run-name, else by its --config file (`configs/tiny.yaml` -> `tiny`), else `train`; its
directory is runs/<name> under the current directory (or under $GPT3D_RUNS_DIR). Two runs never share one:
a name already taken gets the first free `-2`, `-3`, ... suffix, claimed with one mkdir, so two runs started
at once cannot both get it. A resume (--load restoring the train state, not --finetune) of a run of the same
name goes on writing to the directory that run recorded in its checkpoint, so its curve continues. An
explicit --run-dir is used as it is. The directory is made only once the run is accepted (lock, checkpoint and
data checked) and only if something goes in it: a run whose every output has a flag of its own (--log-file,
no W&B or --wandb-save-dir) makes none.
"""
from __future__ import annotations

import itertools
import os
from typing import Optional

from ..config import TrainingConfig

RUNS_ENV = "GPT3D_RUNS_DIR"
DEFAULT_NAME = "train"


def runs_root() -> str:
    """The parent of run directories: $GPT3D_RUNS_DIR, else runs/ in the current directory."""
    return os.environ.get(RUNS_ENV) or "runs"


def name_of(t: TrainingConfig) -> str:
    """This run's name (the CLI sets --run-name from the --config file when it is not given)."""
    return t.run_name or DEFAULT_NAME


def needs_dir(t: TrainingConfig) -> bool:
    """Whether any output defaults into the run directory."""
    return t.run_dir is not None or not t.log_file or bool(t.wandb_project and not t.wandb_save_dir)


def resumed_dir(t: TrainingConfig, saved: Optional[dict]) -> Optional[str]:
    """The directory of the run being resumed, when this run has its name (`saved`: the checkpoint's training
    settings; None for a fresh start or --finetune)."""
    if not saved or not saved.get("run_dir"):
        return None
    return saved["run_dir"] if (saved.get("run_name") or DEFAULT_NAME) == name_of(t) else None


def claim(t: TrainingConfig, saved: Optional[dict] = None) -> Optional[str]:
    """The run directory, created (None if nothing goes in it): --run-dir as given, the resumed run's, or the
    first free runs/<name>, runs/<name>-2, ... (made with os.mkdir, which fails if it exists: no two runs get
    the same one, and a symlink planted there is never followed)."""
    if not needs_dir(t):
        return None
    explicit = t.run_dir or resumed_dir(t, saved)
    if explicit:
        os.makedirs(explicit, exist_ok=True)
        return explicit
    base = os.path.join(runs_root(), name_of(t))
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    for k in itertools.count(1):
        path = base if k == 1 else f"{base}-{k}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def planned_root(t: TrainingConfig) -> Optional[str]:
    """Where `claim` will create something, for the start-up check that it can (None: nothing is made)."""
    if not needs_dir(t):
        return None
    return t.run_dir or runs_root()
