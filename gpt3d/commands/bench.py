"""`gpt3d bench`: its flags, over the measurements in gpt3d/perf/bench.py (`run` times each shape and prints
the table)."""
from __future__ import annotations

import argparse
import sys

from ..perf.bench import SHAPES, run


def register(sub) -> None:
    p = sub.add_parser("bench", help="tokens/s, TFLOPs and MFU of the training step vs a Hugging Face peer")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=["125M", "1.3B"],
                   help=f"shapes: {', '.join(SHAPES)}, or 'custom' with the three flags below")
    p.add_argument("--num-layers", type=int, help="custom shape: layers")
    p.add_argument("--hidden-size", type=int, help="custom shape: hidden size")
    p.add_argument("--num-attention-heads", type=int, help="custom shape: attention heads")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample")
    p.add_argument("--micro-batch-size", type=int, default=None, help="override the shape's micro batch")
    p.add_argument("--iters", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, autotuning)")
    p.add_argument("--peer", choices=["hf", "none"], default="hf",
                   help="hf: also time the Hugging Face peer (transformers); none: gpt3d only")
    p.add_argument("--peer-first", action="store_true", help="run the peer before gpt3d (order effects)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="gpt3d without torch.compile")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation checkpointing (default: none)")
    p.add_argument("--use-flash-attn", action="store_true", help="use the flash-attn package if installed")
    p.add_argument("--attention-backend", choices=["auto", "cudnn", "flash", "efficient", "math"], default="auto",
                   help="gpt3d's SDPA kernel (math = no flash attention)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation), for both systems")
    p.add_argument("--fp16", action="store_true", help="fp16 params with dynamic loss scaling (peer: fp16 "
                                                        "autocast + GradScaler) instead of bf16")
    p.add_argument("--fp8", action="store_true", help="gpt3d with FP8 GEMMs in the transformer layers (torchao)")
    p.add_argument("--fp8-recipe", choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"], default="tensorwise",
                   help="FP8 scaling recipe (see `gpt3d train --help`)")
    p.add_argument("--cross-entropy-loss-fusion", dest="ce_fusion", action="store_true",
                   help="gpt3d fuses the output projection with the loss (chunked; never stores the logits)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak for MFU (H100 bf16 dense)")
    p.add_argument("--json", action="store_true", help="print one JSON line per result")


def main(argv=None) -> int:
    """`python -m gpt3d.commands.bench ...` is `gpt3d bench ...`."""
    from ..cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
