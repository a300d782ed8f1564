"""`gpt3d checkpoint-info`, `gpt3d checkpoint verify` and `gpt3d checkpoint import-megatron-deepspeed`: what a
checkpoint holds, whether it is intact, and a Megatron-DeepSpeed checkpoint brought into gpt3d's format."""
from __future__ import annotations

import argparse
import os

from ..config.rules import NON_NEGATIVE
from .output import emit, note

CHECKPOINT_RULES = {"iteration": NON_NEGATIVE}   # `checkpoint import-megatron-deepspeed --iteration`


def register(sub) -> None:
    p = sub.add_parser("checkpoint-info", help="print a checkpoint's layout, iteration, tokens and size")
    p.add_argument("path", help="checkpoint root (uses `latest`) or one iter_XXXXXXX directory")
    p.set_defaults(func=_info)
    c = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="action", required=True)
    v = c.add_parser("verify", help="check every checkpoint under a directory: sizes, checksums, finite values "
                                    "(exit 0 if all are good, 2 if any is not)")
    v.add_argument("path", help="checkpoint root or one iter_XXXXXXX directory")
    v.set_defaults(func=_verify)
    m = c.add_parser("import-megatron-deepspeed",
                     help="convert a Megatron-DeepSpeed (DeepSpeed) checkpoint into a gpt3d checkpoint: weights, "
                          "ZeRO optimizer state, position in the run (its files are only read)")
    m.add_argument("--load", required=True, help="Megatron-DeepSpeed checkpoint directory (uses its `latest`) or "
                                                 "one global_stepN directory")
    m.add_argument("--iteration", type=int, help="convert global_step<ITERATION> instead of `latest`'s")
    m.add_argument("--save", required=True, help="new gpt3d checkpoint directory (not inside the Megatron-DeepSpeed "
                                                 "one)")
    m.set_defaults(func=_import_megatron_deepspeed)


def _info(args: argparse.Namespace) -> int:
    from ..checkpoint import describe
    emit(describe(args.path))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """One line per checkpoint; a CheckpointError (one error line, exit 2) if any is bad or there is none."""
    from ..checkpoint import list_checkpoints
    from ..errors import CheckpointError
    from ..checkpoint.integrity import describe_files, problem
    root = args.path
    if os.path.exists(os.path.join(root, "meta.json")):
        paths = [root]
    else:
        if not os.path.isdir(root):
            raise CheckpointError(f"no checkpoint directory {root}")
        paths = [os.path.join(root, name) for name in list_checkpoints(root)]
    if not paths:
        raise CheckpointError(f"no checkpoint in {root}")
    bad = 0
    for path in paths:
        why = problem(path)
        if why:
            bad += 1
            emit(f"BAD  {path}: {why}")
            continue
        n, size, checksummed = describe_files(path)
        how = "checksums match" if checksummed else "sizes only: written before checksums"
        emit(f"ok   {path}: {n} files, {size / 2 ** 20:,.1f} MiB, {how}")
    if bad:
        raise CheckpointError(f"{bad} of {len(paths)} checkpoints in {root} are bad")
    return 0


def _import_megatron_deepspeed(args: argparse.Namespace) -> int:
    from ..checkpoint.megatron_deepspeed import import_checkpoint
    from ..config.rules import check_flags
    from ..errors import os_errors_are_user_errors
    check_flags(args, CHECKPOINT_RULES)
    out = os_errors_are_user_errors(import_checkpoint)(args.load, args.save, args.iteration)
    emit(out, as_json=True)
    note(f"continue it: gpt3d train --config {out['config']} --load {args.save} --save {args.save} "
         "(plus --data-path and the tokenizer files where they live now)")
    return 0
