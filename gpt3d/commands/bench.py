"""`gpt3d bench`: its flags (defaults from `BenchOptions`) over the measurements of gpt3d/perf/bench.py
(`measure` times each shape and returns the rows), and the table of them (with --json, first one JSON line per
row as each shape is done)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..perf.bench import SHAPES, BenchOptions, measure
from .output import Column, emit, table_line

D = BenchOptions()   # the flags' defaults


def register(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s, TFLOPs and MFU of the training step vs a Hugging Face peer")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=D.model,
                   help=f"shapes: {', '.join(SHAPES)}, or 'custom' with the three flags below")
    p.add_argument("--num-layers", type=int, help="custom shape: layers")
    p.add_argument("--hidden-size", type=int, help="custom shape: hidden size")
    p.add_argument("--num-attention-heads", type=int, help="custom shape: attention heads")
    p.add_argument("--seq-length", type=int, default=D.seq_length, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=None, help="override the shape's micro batch")
    p.add_argument("--iters", type=int, default=D.iters, help="timed steps")
    p.add_argument("--warmup", type=int, default=D.warmup, help="untimed steps (compilation, autotuning)")
    p.add_argument("--peer", choices=["hf", "none"], default=D.peer,
                   help="hf: also time the Hugging Face peer (transformers); none: gpt3d only")
    p.add_argument("--peer-first", action="store_true", help="run the peer before gpt3d (order effects)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="gpt3d without torch.compile")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation checkpointing (default: none)")
    p.add_argument("--use-flash-attn", action="store_true", help="use the flash-attn package if installed")
    p.add_argument("--attention-backend", choices=["auto", "cudnn", "flash", "efficient", "math"],
                   default=D.attention_backend, help="gpt3d's SDPA kernel (math = no flash attention)")
    p.add_argument("--micro-batches", type=int, default=D.micro_batches,
                   help="micro-batches per optimizer step (gradient accumulation), for both systems")
    p.add_argument("--fp16", action="store_true", help="fp16 params with dynamic loss scaling (peer: fp16 "
                                                        "autocast + GradScaler) instead of bf16")
    p.add_argument("--fp8", action="store_true", help="gpt3d with FP8 GEMMs in the transformer layers (torchao)")
    p.add_argument("--fp8-recipe", choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"], default=D.fp8_recipe,
                   help="FP8 scaling recipe (see `gpt3d train --help`)")
    p.add_argument("--cross-entropy-loss-fusion", dest="ce_fusion", action="store_true",
                   help="gpt3d fuses the output projection with the loss (chunked; never stores the logits)")
    p.add_argument("--no-gemm-tuning", dest="gemm_tuning", action="store_false",
                   help="gpt3d's GEMMs left to torch (default: through tuned cuBLASLt where nvmath-python is "
                        "installed, as `gpt3d train` runs them; each row's gemm_tuning says which ran, and "
                        "quack_epilogues how many GEMMs took quack-kernels' GeLU epilogues)")
    p.add_argument("--peak-tflops", type=float, default=D.peak_tflops,
                   help="per-device peak for MFU (default: the GPU's bf16 dense peak: H100 and H200 989, A100 312, "
                        "V100 125; 989 elsewhere)")
    p.add_argument("--json", action="store_true", help="print one JSON line per result")


COLUMNS = (Column("system", 22, "<"), Column("shape", 11), Column("prec", 14), Column("mbs", 6),
           Column("tok/s", 11, spec=",.0f"), Column("TFLOPs", 8, spec=".1f"), Column("6N TF", 8, spec=".1f"),
           Column("MFU", 7, spec=".1%"), Column("peak GiB", 10, spec=".1f"), Column("vs peer", 9))


def table(rows: list) -> str:
    """One line per row after a blank line and the header; a row without a measurement shows its error."""
    lines = ["", table_line(COLUMNS)]
    for r in rows:
        first = [r["system"], r["shape"], r["precision"], r["micro_batch"]]
        if "tokens_per_s" not in r:
            lines.append(table_line(COLUMNS, first) + f"  {r.get('error')}")
            continue
        ratio = f"{r['vs_peer']:.2f}x" if "vs_peer" in r else ""
        lines.append(table_line(COLUMNS, [*first, r["tokens_per_s"], r["tflops_per_gpu"], r["tflops_per_gpu_6n"],
                                          r["mfu"], r["peak_mem_gib"], ratio]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opts = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    import torch
    from ..plan.presets import mfu_peak_tflops
    if torch.cuda.is_available():   # without a GPU `measure` refuses in one line
        opts.peak_tflops = mfu_peak_tflops(opts.peak_tflops, torch.device("cuda"))

    def each_shape(rows: list) -> None:
        for r in rows:
            emit(r, as_json=True)
    emit(table(measure(opts, on_shape=each_shape if args.json else None)))
    return 0


def main(argv=None) -> int:
    """`python -m gpt3d.commands.bench ...` is `gpt3d bench ...`."""
    from ..cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
