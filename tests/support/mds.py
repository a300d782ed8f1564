"""The Megatron-DeepSpeed reference checkpoints (written by Megatron-DeepSpeed itself) and their runs.

They live beside the repository, in `<repo>/../shared/mds_checkpoints` (GPT3D_MDS_FIXTURES overrides the
path); the only tests that read outside the repository are the ones marked `needs_fixtures`, and they skip,
saying where they looked, when the folder is absent. Every folder holding a `command.txt` is a run: its
exact command line, its ds_config, `losses.json` and `ckpt/`. Tests never write there: the data files are
symlinked into the test's own directory (gpt3d caches its sample index beside the data).
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from tests.support import ROOT

FIXTURES = Path(os.environ.get("GPT3D_MDS_FIXTURES") or ROOT.parent / "shared" / "mds_checkpoints")
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "README.md").is_file(),
    reason=f"no Megatron-DeepSpeed reference checkpoints at {FIXTURES} (CI has them beside the repository; "
           "GPT3D_MDS_FIXTURES names another folder)")


def runs() -> list[str]:
    return sorted(p.parent.name for p in FIXTURES.glob("*/command.txt")) if FIXTURES.is_dir() else []


def command(name: str) -> list[str]:
    """The run's pretrain_gpt.py arguments, as it was launched (placeholders resolved to the fixture folder),
    without its --save."""
    text = (FIXTURES / name / "command.txt").read_text()
    line = next(x for x in text.splitlines() if x.strip() and not x.startswith("#"))
    toks = shlex.split(line)
    start = next(i for i, t in enumerate(toks) if t.endswith(".py")) + 1
    args = [t.replace("<data>", str(FIXTURES)).replace("<fixtures>", str(FIXTURES)) for t in toks[start:]]
    i = args.index("--save")
    return args[:i] + args[i + 2:]


def flag(args: list[str], name: str, default: str = "1") -> str:
    return args[args.index(name) + 1] if name in args else default


def nproc(name: str) -> int:
    """The run's number of processes (its own layout is TP x PP x the rest as DP)."""
    toks = shlex.split(next(x for x in (FIXTURES / name / "command.txt").read_text().splitlines()
                            if x.strip() and not x.startswith("#")))
    return int(toks[toks.index("--nproc_per_node") + 1])


def losses(name: str) -> dict:
    return json.loads((FIXTURES / name / "losses.json").read_text())


def linked_data(args: list[str], where: Path) -> list[str]:
    """`args` with each --data-path prefix replaced by symlinks to its .bin/.idx under `where`."""
    out = list(args)
    i = out.index("--data-path") + 1
    while i < len(out) and not out[i].startswith("--"):
        src = Path(out[i])
        if src.with_suffix(".idx").exists() or Path(str(src) + ".idx").exists():
            where.mkdir(parents=True, exist_ok=True)
            for ext in (".bin", ".idx"):
                link = where / (src.name + ext)
                if not link.exists():
                    link.symlink_to(str(src) + ext)
            out[i] = str(where / src.name)
        i += 1
    return out


def continuation_argv(name: str, tmp: Path, tp: int, pp: int, tag: str) -> list[str]:
    """`gpt3d train` arguments continuing run `name` from its global_step3 at TP x PP (the run's own flags;
    --no-pipeline-parallel dropped where the new layout pipelines), saving and logging under `tmp`."""
    args = linked_data(command(name), tmp / "data")
    for f, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if f in args:
            args[args.index(f) + 1] = str(v)
        else:
            args += [f, str(v)]
    if pp > 1 and "--no-pipeline-parallel" in args:
        args.remove("--no-pipeline-parallel")
    out = tmp / f"{name}-{tag}"
    return [*args, "--load", str(FIXTURES / name / "ckpt" / "global_step3"), "--save", str(out),
            "--log-file", str(out / "metrics.jsonl"), "--device", "cpu"]


def logged(argv: list[str]) -> dict:
    """{"loss": {iteration: loss}, "lr": {...}, "grad_norm": {...}, "val": {iteration: loss}} of a run."""
    path = Path(argv[argv.index("--log-file") + 1])
    out: dict = {"loss": {}, "lr": {}, "grad_norm": {}, "val": {}}
    for row in map(json.loads, path.read_text().splitlines()):
        if "loss" in row:
            for k in ("loss", "lr", "grad_norm"):
                out[k][row["iteration"]] = row[k]
        if "val_loss" in row:
            out["val"][row["iteration"]] = row["val_loss"]
    return out
