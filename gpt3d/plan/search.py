"""`predict(config, world_size, gpu)`: memory and step time of one layout; `plan(...)`: every layout, ranked.

Why its own module: it is the planner's one entry point for the CLI and for
`gpt3d train` (which prints the prediction for its own layout and can refuse a
layout predicted not to fit); it joins memory.py and timing.py and reads only
the model, parallel, training and precision sections of the config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..config import Config
from ..errors import ConfigError, Gpt3dError
from ..perf.flops import model_flops_per_iter
from ..perf.flops import megatron_flops_per_iter
from ..model import quack_gemm
from ..model.build import compile_enabled, gelu_epilogues
from ..parallel.layout import padded_vocab_size
from ..parallel.state import ParallelState
from .layout import Candidate, apply_layout, enumerate_layouts, layout_of, own_layout
from .memory import StageMemory, plan_memory
from .presets import GIB, Gpu, gpu_for_device, resolve_gpu
from .timing import StepTime, step_time


@dataclass
class Prediction:
    layout: Candidate
    peak_bytes: float              # the busiest stage's rank
    busiest_stage: int
    memory: dict                   # bytes by term, busiest stage
    usable_bytes: float
    time: StepTime
    tflops_per_gpu: float          # hardware: Megatron-DeepSpeed's formula (recompute counted), as training logs it
    mfu: float                     # model FLOPs (gpt3d/perf/flops.py) over peak, as training logs it
    model_tflops_per_gpu: float    # the model's FLOPs (no recompute) per GPU-second: the MFU numerator
    stages: list = field(default_factory=list)   # StageMemory per stage
    notes: list = field(default_factory=list)    # what the config asks for that the figures do not model

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.time.tokens_per_s

    def as_dict(self) -> dict:
        return {"layout": self.layout.as_dict(), "label": self.layout.label(), "fits": self.fits,
                "peak_gib": self.peak_bytes / GIB, "usable_gib": self.usable_bytes / GIB,
                "busiest_stage": self.busiest_stage,
                "memory_gib": {k: v / GIB for k, v in self.memory.items()},
                "step_s": self.time.seconds, "tokens_per_s": self.time.tokens_per_s,
                "tflops_per_gpu": self.tflops_per_gpu, "model_tflops_per_gpu": self.model_tflops_per_gpu,
                "mfu": self.mfu,
                "time_s": dict(self.time.parts), "notes": list(self.notes)}


def vocab_of(cfg: Config, vocab_size: Optional[int] = None) -> int:
    """`vocab_size` if given, else the vocabulary `gpt3d train` would build the model with (`planned_vocab`)."""
    return vocab_size or planned_vocab(cfg)[0]


def planned_vocab(cfg: Config) -> tuple[int, Optional[str]]:
    """The vocabulary `gpt3d train` builds the model with (tokenizers/factory.model_vocab_size, as train/loop.py
    asks it: --padded-vocab-size, --vocab-size, the tokenizer's), and a note where the tokenizer it names cannot
    be read here (then --vocab-size or GPT-2's 50,257 is taken, and the note says so)."""
    from ..tokenizers.factory import model_vocab_size, tokenizer_from_config
    m, d = cfg.model, cfg.data
    if d.mock_data or m.padded_vocab_size:
        return model_vocab_size(None, m.vocab_size, m.padded_vocab_size), None
    try:
        tok = tokenizer_from_config(d, m.vocab_size, quiet=True)
    except Gpt3dError as e:
        v = model_vocab_size(None, m.vocab_size)
        return v, (f"vocabulary taken as {v:,}: the tokenizer is not readable here ({e}); --padded-vocab-size or "
                   f"--vocab-size sets it")
    return model_vocab_size(tok, m.vocab_size, m.padded_vocab_size), None


def unmodelled(cfg: Config) -> list[str]:
    """What `cfg` asks for that the memory and time models leave out, said wherever figures are shown (the
    plan's table and JSON, train's prediction, measured and advice lines, --check-memory's and fits.py's
    refusals) rather than silently modelled as something else. FP8's speed is modelled for the tensorwise
    recipe (timing.py: FP8 GEMMs and their casts); its memory is not: FP8 keeps FP8 copies of the linears'
    inputs (and the fused MLP a transposed one), measured against bf16 on one H100: 43.4 against 48.0 GiB at
    1.3B 8x1, 36.1 against 37.6 at the Llama shape 4x1, 15.2 against 14.5 at 125M 16x1 (benchmarks/RESULTS.md
    2026-12-06), and where a step holds the weights' FP8 copies (model/fp8_weights.py) those too, not measured."""
    if not cfg.precision.fp8:
        return []
    if cfg.precision.fp8_recipe != "tensorwise":
        return [f"--fp8-recipe {cfg.precision.fp8_recipe} is not modelled: memory and speed are bf16's (measured "
                "at 1.3B: rowwise 0.96x, rowwise_with_gw_hp 1.02x of bf16; docs/performance.md)"]
    return ["--fp8 memory is not modelled: it is bf16's (measured: 0.90x of it at 1.3B, 1.05x at 125M; "
            "docs/planning.md; before the FP8 weight copies held for a step with several micro-batches, up to 2 "
            "bytes a weight parameter, were added)"]


def fp8_modelled(cfg: Config, gpu: Gpu) -> bool:
    """Whether the time model runs the layers' linears in FP8: --fp8 with the tensorwise recipe, on a GPU that
    has FP8 tensor cores (elsewhere --fp8 is refused at start, gpt3d/model/fp8.py; so is the plan)."""
    if not cfg.precision.fp8:
        return False
    if not gpu.fp8:
        raise ConfigError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); {gpu.name} has none")
    return cfg.precision.fp8_recipe == "tensorwise"


def param_bytes_of(cfg: Config) -> int:
    return 2 if cfg.precision.bf16 or cfg.precision.fp16 else 4


def predict_layout(cfg: Config, lay: Candidate, gpu: Gpu, gpus_per_node: int = 8, *, device: str = "cuda",
                   cache: Optional[dict] = None, vocab_size: Optional[int] = None) -> Prediction:
    """One layout of `cfg` (its model, batch, precision and compile setting) on `lay.world` GPUs of kind `gpu`.

    `device="cpu"` models the CPU code paths (vocab-parallel loss at TP=1), for tests."""
    c = apply_layout(cfg, lay)
    m, vocab, pb = c.model, vocab_of(c, vocab_size), param_bytes_of(c)
    compiled = compile_enabled(c.training, torch.device(device))
    fused = lay.tp == 1 and device == "cuda"
    stages: list[StageMemory] = plan_memory(m, vocab, lay, param_bytes=pb, bucket_size_mb=c.parallel.bucket_size_mb,
                                            compiled=compiled, fused_loss=fused, device=device, cache=cache,
                                            granularity=c.training.compile_granularity, fp8=c.precision.fp8)
    busiest = max(stages, key=lambda s: s.peak)
    t = step_time(m, vocab, lay, gpu, gpus_per_node, [s.persistent for s in stages], param_bytes=pb,
                  overlap_grad_reduce=c.parallel.overlap_grad_reduce, fused_loss=fused, compiled=compiled,
                  fp8=fp8_modelled(c, gpu), fp8_linears=c.precision.fp8,
                  gelu_epilogues=device == "cuda" and gpu.hopper and gelu_epilogues(c) and quack_gemm.installed())
    gbs = lay.global_batch
    pv = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1)
    flops = megatron_flops_per_iter(m, pv, gbs, recompute=lay.recompute is not None)
    model_flops = model_flops_per_iter(m, pv, gbs)   # the MFU numerator training logs (gpt3d/perf/flops.py)
    model_tflops = model_flops / t.seconds / lay.world / 1e12
    return Prediction(lay, busiest.peak, busiest.pp_rank, busiest.breakdown(), gpu.usable_bytes, t,
                      flops / t.seconds / lay.world / 1e12, model_tflops / gpu.tflops, model_tflops, stages,
                      unmodelled(c))


def _gpu(gpu: Union[str, Gpu, None]) -> Gpu:
    return gpu if isinstance(gpu, Gpu) else resolve_gpu(gpu or "h100-80gb")


def predict(cfg: Config, world_size: int, gpu: Union[str, Gpu, None] = None, gpus_per_node: int = 8, *,
            vocab_size: Optional[int] = None) -> Prediction:
    """The prediction for the layout `cfg` itself asks for (what `gpt3d train` will run); `vocab_size`: the
    tokenizer's, when the config does not name one."""
    lay = layout_of(cfg, world_size)
    apply_layout(cfg, lay).validate(world_size)
    return predict_layout(cfg, lay, _gpu(gpu), gpus_per_node, vocab_size=vocab_size)


def check_memory(cfg: Config, world_size: int, gpu: Union[str, Gpu, None] = None, gpus_per_node: int = 8, *,
                 vocab_size: Optional[int] = None) -> Prediction:
    """`--check-memory`: raise ConfigError when the layout is predicted not to fit, naming the largest terms."""
    p = predict(cfg, world_size, gpu, gpus_per_node, vocab_size=vocab_size)
    if not p.fits:
        top = sorted(p.memory.items(), key=lambda kv: -kv[1])[:3]
        raise ConfigError(f"layout {p.layout.label()} is predicted to need {p.peak_bytes / GIB:.1f} GiB per GPU on "
                          f"pipeline stage {p.busiest_stage}, more than the {p.usable_bytes / GIB:.1f} GiB usable "
                          f"({', '.join(f'{k} {v / GIB:.1f}' for k, v in top)}); see `gpt3d plan`" + noted(p))
    return p


def run_gpu(ps: ParallelState) -> Optional[tuple[Gpu, int]]:
    """(the GPU `gpt3d train` runs on, GPUs per node), None off CUDA: what its prediction and advice are for."""
    if ps.device.type != "cuda":
        return None
    return gpu_for_device(ps.device), int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))


def for_run(cfg: Config, ps: ParallelState, vocab_size: int,
            gpu: Optional[tuple[Gpu, int]] = None) -> Optional[Prediction]:
    """`gpt3d train`'s prediction for its own layout on `gpu` (default `run_gpu(ps)`: the GPU it runs on, None
    off CUDA: no prediction): with `--check-memory`, a layout predicted not to fit raises ConfigError before
    anything is allocated."""
    gpu = gpu or run_gpu(ps)
    if gpu is None:
        return None
    fn = check_memory if cfg.training.check_memory else predict
    return fn(cfg, ps.world_size, gpu[0], gpu[1], vocab_size=vocab_size)


def plan(cfg: Config, world_size: int, gpu: Union[str, Gpu, None] = None, gpus_per_node: int = 8, *,
         micro_batch_sizes: Optional[list] = None, vocab_size: Optional[int] = None) -> list[Prediction]:
    """Every valid layout, fastest first (layouts that do not fit included, marked by `fits`); `vocab_size`: the
    vocabulary where the caller already has it (`planned_vocab`), else found here."""
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError("--gpus and --gpus-per-node must be positive")
    g = _gpu(gpu)
    layouts = enumerate_layouts(cfg, world_size, gpus_per_node, micro_batch_sizes=micro_batch_sizes)
    own, refused = own_layout(cfg, world_size)   # with what the search does not vary: ZeRO 0 at DP 1, a split, ...
    if own is not None and refused is None and not any(lay.key() == own.key() for lay in layouts):
        layouts.append(own)
    if not layouts:
        raise ConfigError(f"no layout of {world_size} GPUs fits the model and global batch "
                          f"{cfg.training.global_batch_size} (TP must divide the heads, PP the layers, "
                          "DP x micro-batch the global batch)")
    cache: dict = {}
    vocab = vocab_of(cfg, vocab_size)   # once: the layouts' configs are mock data (apply_layout)
    preds = [predict_layout(cfg, lay, g, gpus_per_node, vocab_size=vocab, cache=cache) for lay in layouts]
    preds.sort(key=lambda p: -p.tokens_per_s)
    return preds


def noted(p: Prediction) -> str:
    """The notes of `p` (what the figures leave out), to end any line that shows its figures."""
    return "".join(f"; {n}" for n in p.notes)


def startup_line(p: Prediction) -> str:
    """What `gpt3d train` prints for its own layout before the first step."""
    return (f"gpt3d plan: predicted {p.peak_bytes / GIB:.1f} GiB per GPU (stage {p.busiest_stage}; "
            f"{p.usable_bytes / GIB:.1f} usable) and {p.tokens_per_s:,.0f} tokens/s for {p.layout.label()}"
            + noted(p))


def measured_line(p: Prediction, tokens_per_s: float, peak_bytes: float) -> str:
    """The measured figures beside the prediction, after the first logged steps."""
    return (f"gpt3d plan: measured {peak_bytes / GIB:.1f} GiB peak on this rank (predicted "
            f"{p.peak_bytes / GIB:.1f} for the busiest stage) and {tokens_per_s:,.0f} tokens/s (predicted "
            f"{p.tokens_per_s:,.0f})" + noted(p))
