"""`gpt3d plan`: the ranked table of layouts for a model, batch and cluster, before the cluster is rented.

    gpt3d plan --config configs/gpt-13B.yaml --gpus 64 --gpus-per-node 8 --gpu h100-80gb

Config flags (`--micro-batch-size`, `--seq-length`, ...) override the YAML as for
`gpt3d train`. The table lists the fastest layouts that fit first (ranked among
those), then the fastest few that do not, struck out with their memory
(--show-unfit N); the config's own layout is always shown and marked. `--json`
prints every layout.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..errors import ConfigError
from ..config.rules import NON_NEGATIVE, POSITIVE, check_flags, check_values
from ..plan.presets import GIB, PRESETS, calibration_to_json, load_calibration, resolve_gpu
from .output import Column, emit, table_line


def register(sub) -> None:
    p = sub.add_parser("plan", help="predict memory and speed of every TP x PP x DP layout, ranked",
                       allow_abbrev=False)
    from ..config.flags import add_config_flags
    add_config_flags(p)
    g = p.add_argument_group("plan")
    g.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default: the config's TP x PP)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (TP stays inside a node)")
    g.add_argument("--gpu", default="h100-80gb", help=f"preset ({', '.join(PRESETS)}) or 'custom'")
    for flag, what in [("--gpu-tflops", "dense bf16 peak"), ("--gpu-memory-gib", "memory per GPU"),
                       ("--hbm-gbps", "memory bandwidth"), ("--nvlink-gbps", "NVLink GB/s per GPU and direction"),
                       ("--ib-gbps", "InfiniBand GB/s per GPU and direction"),
                       ("--reserve-gib", "memory outside torch's allocator (context, NCCL)")]:
        g.add_argument(flag, type=float, default=None, help=f"override the preset's {what}")
    g.add_argument("--calibration", metavar="FILE",
                   help="kernel speeds: a JSON from --calibrate, or a markdown log with plan-calibration lines")
    g.add_argument("--calibrate", action="store_true",
                   help="measure one layer's forward/backward, the loss and the optimizer step on this GPU "
                        "(without a GPU: the calibration shipped with gpt3d, gpt3d/plan/calibration.json, scaled "
                        "to --gpu as its presets are)")
    g.add_argument("--save-calibration", metavar="FILE", help="write the calibration used to FILE (JSON)")
    g.add_argument("--micro-batch-sizes", type=int, nargs="+", help="micro-batch sizes to try (default: 1 2 4 8 16)")
    g.add_argument("--top", type=int, default=15, help="layouts that fit to show, fastest first")
    g.add_argument("--show-unfit", type=int, default=3, metavar="N",
                   help="layouts that do not fit to list after those that do (struck out, fastest first)")
    g.add_argument("--json", action="store_true", help="every layout as JSON")
    p.set_defaults(func=run)


def _gpu(args):
    cal = None
    if args.calibrate:
        import torch
        if torch.cuda.is_available():
            from ..plan.calibrate import calibrate
            cal = calibrate(_config(args))
        # else the preset's own figures: the packaged H100 calibration (presets.h100_calibration), scaled to it
    elif args.calibration:
        cal = load_calibration(args.calibration)
    name = None if args.gpu == "custom" else args.gpu
    gpu = resolve_gpu(name, tflops=args.gpu_tflops, memory_gib=args.gpu_memory_gib, hbm_gbps=args.hbm_gbps,
                      nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, calibration=cal,
                      reserve_gib=args.reserve_gib)
    if args.save_calibration:
        from ..files.atomic import write_text   # crash-safe, never through a planted link, the umask honoured
        write_text(args.save_calibration, calibration_to_json(gpu.calibration) + "\n")
    return gpu


def _config(args):
    from ..config.load import load_config
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in PLAN_KEYS})
    return load_config(ns)


# The plan's own numeric flags, checked (with NaN/inf) as config settings are, before any work.
PLAN_RULES = {**dict.fromkeys(["gpus", "gpus_per_node", "gpu_tflops", "gpu_memory_gib", "hbm_gbps", "nvlink_gbps",
                               "ib_gbps", "micro_batch_sizes"], POSITIVE),
              "reserve_gib": NON_NEGATIVE, "top": NON_NEGATIVE, "show_unfit": NON_NEGATIVE}

PLAN_KEYS = {"gpus", "gpus_per_node", "gpu", "gpu_tflops", "gpu_memory_gib", "hbm_gbps", "nvlink_gbps", "ib_gbps",
             "reserve_gib", "calibration", "calibrate", "save_calibration", "micro_batch_sizes", "top", "show_unfit",
             "json"}


def run(args: argparse.Namespace) -> int:
    from ..plan.layout import own_layout
    from ..plan.search import plan, planned_vocab, unmodelled
    check_flags(args, PLAN_RULES)
    cfg = _config(args)      # a ConfigError reaches gpt3d/cli.py, which prints it as one line (exit 2)
    check_values(cfg)        # ranges and NaN/inf of the config's settings, as `gpt3d train` checks them
    m, p = cfg.model, cfg.parallel
    world = args.gpus or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if not cfg.training.global_batch_size:
        raise ConfigError("the plan needs --global-batch-size")
    gpu = _gpu(args)
    vocab, vocab_note = planned_vocab(cfg)   # reads the tokenizer once
    preds = plan(cfg, world, gpu, args.gpus_per_node, micro_batch_sizes=args.micro_batch_sizes, vocab_size=vocab)
    own, refused = own_layout(cfg, world)
    notes = unmodelled(cfg) + ([vocab_note] if vocab_note else [])
    if args.json:
        emit({"gpus": world, "gpus_per_node": args.gpus_per_node, "gpu": gpu.describe(), "notes": notes,
              "config_layout": own.as_dict() if own else None, "config_layout_refused": refused,
              "layouts": [x.as_dict() for x in preds]}, as_json=True, indent=1)
        return 0
    summary = (f"gpt3d plan: {m.num_layers}L/{m.hidden_size}h/{m.num_attention_heads} heads, seq {m.seq_length}, "
               f"vocab {vocab}, global batch {cfg.training.global_batch_size}, "
               f"{'bf16' if cfg.precision.bf16 else 'fp16' if cfg.precision.fp16 else 'fp32'}, "
               f"{'eager (--no-compile)' if cfg.training.compile is False else 'compiled'}; "
               f"{world} GPUs, {args.gpus_per_node} per node")
    emit("\n".join([summary, f"  {gpu.describe()}", *(f"  note: {n}" for n in notes),
                     table(preds, own, args.top, sys.stdout.isatty(), args.show_unfit, refused)]))
    return 0


def _strike(text: str, tty: bool) -> str:
    return f"\x1b[9m{text}\x1b[0m" if tty else f"~~{text}~~"


LEGEND = ("model TFLOPs: the model's FLOPs per GPU-second (gpt3d/perf/flops.py, no recompute); MFU = model TFLOPs "
          "/ the GPU's peak.\nhw TFLOPs: Megatron-DeepSpeed's formula, as `gpt3d train` logs it; it counts "
          "recomputed work (x4/3 with any recompute), so with recompute it is above the model's figure.")


def table(preds: list, own, top: int, tty: bool = False, show_unfit: int = 3, refused: Optional[str] = None) -> str:
    """The `top` fastest layouts that fit, ranked 1, 2, ... among those; then the config's own layout if it
    was not among them; then the `show_unfit` fastest that do not fit, struck out (the config's own always).
    `refused`: why `gpt3d train` would not run the config's own layout (plan.layout.own_layout), said instead.
    `step s` is the predicted time of one optimizer step (`step_s` in --json)."""
    head = table_line(COLUMNS)
    lines = [head, "-" * len(head)]
    fit = [p for p in preds if p.fits]
    unfit = [p for p in preds if not p.fits]
    own = None if refused else own

    def is_own(p) -> bool:
        return own is not None and p.layout.key() == own.key()
    mine = [is_own(p) for p in fit]
    for rank, (p, is_mine) in enumerate(zip(fit, mine), 1):
        if rank <= top or is_mine:
            if rank > top + 1 and not any(mine[top:rank - 1]):
                lines.append(f"{'...':>4}")
            lines.append(_row(str(rank), p, is_mine, tty))
    if len(fit) > top:
        lines.append(f"      ({len(fit) - top} more layouts fit: --top N lists them)")
    if not fit:
        lines.append("      no layout fits: fewer GPUs per model replica, more recompute or smaller micro-batches")
    shown = 0
    for p in unfit:
        is_mine = is_own(p)
        if shown < show_unfit or is_mine:
            if shown == 0:
                lines.append(f"{len(unfit)} layouts do not fit; the fastest of them (--show-unfit N):")
            lines.append(_row("-", p, is_mine, tty))
            shown += 1
    if unfit and not shown:
        lines.append(f"({len(unfit)} layouts do not fit: --show-unfit N lists the fastest of them)")
    if refused:
        lines.append(f"      the config's own layout is not valid for these GPUs: {refused}")
    elif own is not None and not any(is_own(p) for p in preds):
        lines.append(f"      the config's layout ({own.label()}) is not among those predicted")
    lines.append(LEGEND)
    return "\n".join(lines)


COLUMNS = (Column("#", 4), Column("layout", 44, "<", before="  "), Column("GiB/GPU", 9),
           Column("step s", 9, spec=".3f"), Column("tok/s", 12, spec=",.0f"), Column("model TFLOPs", 14, spec=".1f"),
           Column("hw TFLOPs", 11, spec=".1f"), Column("MFU", 7, spec=".1%"),
           Column("largest time terms", align="<", before="  "))


def _row(rank: str, p, mine: bool, tty: bool) -> str:
    terms = sorted(((k, v) for k, v in p.time.parts.items() if k != "layers (compute)"), key=lambda kv: -kv[1])
    why = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in terms[:2])
    mem = f"{p.peak_bytes / GIB:.1f}" + ("" if p.fits else f">{p.usable_bytes / GIB:.0f}")
    row = table_line(COLUMNS, [rank, p.layout.label(), mem, p.time.seconds, p.tokens_per_s, p.model_tflops_per_gpu,
                               p.tflops_per_gpu, p.mfu, why])
    row = row if p.fits else _strike(row, tty) + "  (does not fit)"
    return row + ("   <- the config's layout" if mine else "")
