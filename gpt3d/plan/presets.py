"""The hardware a plan is made for: GPU and interconnect presets, and measured kernel speeds (calibration).

Why a separate module: the memory and time models are pure arithmetic on a
`Gpu`; everything that is a datasheet number or a measurement lives here, with
its source, so a wrong number is fixed in one place. Datasheet figures are
per GPU and per direction; collectives reach `COMM_EFFICIENCY` of them (an
assumption, not measured: no multi-GPU machine was available).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError

GIB = 2 ** 30
COMM_EFFICIENCY = 0.8          # NCCL bus bandwidth / link bandwidth (assumed)
COMM_LATENCY_S = 10e-6         # per collective / p2p hop (assumed)


# The shape of the kernels' cost curves, fitted to benchmarks/kernel_sweep.py on one H200 (benchmarks/RESULTS.md
# 2026-12-02: 997 matmul shapes, 98 attention shapes); a calibration at one shape sets only the rates.
GEMM_OVERHEAD_S = 10e-6   # per matmul on top of FLOPs / gemm_tflops: small GEMMs run far below the peak rate
ATTN_SEQ0 = 1000          # causal attention time ~ heads·s·(s + ATTN_SEQ0)·attention_head_cost(hd): per-row work
# Head sizes, fitted to cuDNN on one H100 (benchmarks/kernel_sweep.py --parts head_dims, RESULTS.md 2026-12-07:
# head sizes 64-128, 16 and 32 heads, micro-batch 4 and 8; every point within 1.2%): work that does not scale
# with the head size (softmax, the backward's dO·O) worth ATTN_HEAD_DIM0 columns, and above 64 the 128-wide
# kernels' padding, ATTN_HEAD_DIM_PAD more: head size 80 costs 0.88x of 128 (the 2.7B shape), 64 costs 0.64x.
# Outside 64-128 it is not measured: below 64 the line is extended, above 128 the rate is taken as 128's.
ATTN_HEAD_DIM0 = 192
ATTN_HEAD_DIM_PAD = 82


def attention_head_cost(head_dim: int) -> int:
    """Attention time per (head, score) in head-size units: the cost curve `attention_efficiency` scales by."""
    return head_dim + ATTN_HEAD_DIM0 + (ATTN_HEAD_DIM_PAD if head_dim > 64 else 0)


def attention_efficiency(s: int, head_dim: int) -> float:
    """Fraction of `attn_tflops` (long sequences, head size 128) that causal attention reaches at (s, hd)."""
    by_head = min(head_dim / attention_head_cost(head_dim) / (128 / attention_head_cost(128)), 1.0)
    return s / (s + ATTN_SEQ0) * by_head


@dataclass
class Calibration:
    """Achieved speeds of gpt3d's own kernels on one GPU (bf16, torch.compile).

    gemm_tflops: the transformer layer's matmuls (forward + backward) once `GEMM_OVERHEAD_S` per matmul is taken
    out; attn_tflops: fused causal attention, forward + backward, counted as 4·b·s²·heads·head_dim/2 forward and
    ATTN_BACKWARD_FACTOR x that backward, at long sequences and head size 128 (`attention_efficiency` gives other
    shapes); ew_gbps: everything else in a layer (norms, activations, residuals, rotary), as the bytes of the
    layer's saved activations times `EW_PASSES` per second; loss_gbps: the cross entropy over the logits (bytes of
    the logits times `LOSS_PASSES` per second); optimizer_ns_per_param: clipping + the AdamW step (which writes
    the bf16 parameter) per fp32 element of this rank's shard; grad_gbps: the per-parameter gradient hooks that
    copy (first micro-batch, 6 bytes per element) or add (10 bytes) each bf16 gradient into the fp32 buffer;
    host_layer_s and host_step_s: CPU time to launch one layer's forward + backward (with its gradient hooks) and a
    step's own work (clipping, optimizer, bookkeeping): a step never runs faster than the host can launch it,
    which is what bounds small models at small micro-batches. The host figures are the CPU's, not the GPU's:
    fitted to two runs of benchmarks/plan_check.py (125M, micro-batch 8 x 1024, 1 and 4 micro-batches) on the
    H200 machine's host (benchmarks/RESULTS.md 2026-12-02) and assumed for every preset.
    """
    gemm_tflops: float
    attn_tflops: float
    ew_gbps: float
    loss_gbps: float
    optimizer_ns_per_param: float
    source: str = "preset"
    grad_gbps: float = 1000.0
    host_layer_s: float = 1.18e-3
    host_step_s: float = 13.8e-3

    def scaled(self, compute: float, memory: float, source: str) -> Calibration:
        """The same kernels on another GPU: compute-bound parts scale with peak FLOPs, the rest with HBM."""
        return Calibration(self.gemm_tflops * compute, self.attn_tflops * compute, self.ew_gbps * memory,
                           self.loss_gbps * memory, self.optimizer_ns_per_param / memory, source,
                           self.grad_gbps * memory, self.host_layer_s, self.host_step_s)


EW_PASSES = 4      # elementwise traffic per layer ~ 4x its saved activations (write + read, forward + backward)
ATTN_BACKWARD_FACTOR = 2.5   # fused attention's backward takes 2.5x its forward (what attn_tflops counts)
# With quack-kernels' GeLU epilogues (model/quack_gemm.py: the GeLU, and GeLU' with fc1's bias sums, in the fc1
# GEMMs' epilogues, where model/build.gelu_epilogues says and quack-kernels is installed where the planner runs),
# the MLP intermediates' elementwise passes shrink to what the epilogues add (the forward's second output, the
# backward's read of the pre-activation): this share of them is charged. Fitted on one H100 against the bench
# shapes (benchmarks/RESULTS.md, 2026-12-07, session 41): all charged 125M -4.7%, 350M -7.4%, 1.3B -1.6%, 2.7B
# +0.5% off; none +6.7%, +3.8%, +6.5%, +6.8%; half between. cuBLASLt's epilogues alone are not modelled: charging
# all, the planner was within 5% of them (session 40).
GELU_EPILOGUE_EW_SHARE = 0.5

# Dropout (gpt3d/parallel/random.py). A residual dropout site makes its mask inside the kernel that applies it:
# the replicated stream's counter-based hash is ~26 int32 operations per element, taken as the time of moving
# DROPOUT_HASH_BYTES at the elementwise rate (Philox numbers for sequence-parallel shards cost about the same);
# the mask is written as 1 byte per element and read back by backward (modelled from the kernels' work; at 1.3B
# it predicts ~4 ms per step where hidden dropout alone measured +3.1 ms, benchmarks/RESULTS.md 2026-12-06).
# Fused attention draws its dropout mask inside the kernel, score by score, forward and again in backward: its
# cost is per attention score (b x heads x s x s, whatever the head size), measured on one H100 with cuDNN's
# kernel as the extra step time of attention dropout 0.1 over 0 (benchmarks/RESULTS.md 2026-12-06 session 28):
# 0.68 ps per score at 1.3B (head size 128), 0.73-0.91 at the Llama shape (64, GQA); at 125M (64) 0.75 from the
# attention kernels' own growth (session 23's kernel table, which gives 0.97-0.99 at the other two shapes).
# Other GPUs scale it with their calibrated attention speed against the H100's (h100_calibration).
DROPOUT_HASH_BYTES = 4.5
DROPOUT_MASK_BYTES = 2
# Gradient-accumulation fusion (model/grad_accumulation.py): a weight-gradient GEMM that adds into the fp32 buffer
# took 0.006-0.017 ms more than the bf16 GEMM at the Llama and 1.3B weights (one H100, benchmarks/RESULTS.md
# 2026-12-07 session 46), ~0.28 of what the hook's add took (10 bytes an element at grad_gbps): charged as 3 bytes
# an element at grad_gbps. Whole steps against the hooks: Llama bf16 4x4 +1.2% predicted (68,464 tok/s), level
# to +0.3% measured (65,289); 1.3B 8x2 +0.5% predicted (65,581), +0.5% measured (64,810).
FUSED_GEMM_BYTES = 3
ATTN_DROPOUT_S_PER_SCORE = 0.75e-12    # forward + backward
LOSS_PASSES = 3    # the fused loss reads the logits, its backward reads them and writes their gradient
# The vocab-parallel loss (TP > 1: ~5 fp32 passes of eager ops) was charged at the fused loss's calibrated rate
# until that loss got Triton kernels (2026-12-06, session 35: 1030.4 -> 2606.8 GB/s on the H100). Never measured
# itself, it keeps its old rate, as a fraction of the calibrated elementwise rate so other GPUs scale it.
VOCAB_PARALLEL_LOSS_OF_EW = 1030.4 / 2666.4

# FP8 (--fp8, tensorwise recipe; gpt3d/model/fp8.py). The layers' FP8 GEMMs ran FP8_GEMM_SPEEDUP times as fast
# as the same GEMMs in bf16 (one H100, 1.3B 8x1, same call: 161 -> 83 ms a step once the bf16 output head's
# ~13 ms is taken from both kernel sums; benchmarks/RESULTS.md 2026-12-06 session 30). What FP8 adds is the casts:
# each FP8 linear's input, weight and output gradient, counted as FP8_CAST_BYTES per element at the elementwise
# rate (a cast reads the tensor for its amax and again to write both FP8 layouts; fused kernels also take the
# activation's own bf16 work off). FP8_CAST_BYTES is fitted to one end-to-end step (1.3B 8x1, 2026-12-06
# session 34, with direct gradients) and checked at the Llama shape there (+2.4%). (Session 33's fit, 4.7, had
# the gradient hooks' copy in the step, charged at the default 1000 GB/s.) With the hooks at their measured rate
# (the H100 calibration's grad_gbps), a run that keeps the buffer: Llama FP8 4 micro-batches of 4, +3.7% (76,580 tok/s
# measured, session 45; at 1000 GB/s it was -4.3%), one micro-batch of 4 +3.9% there.
FP8_GEMM_SPEEDUP = 1.94
FP8_CAST_BYTES = 5.5

# The optimizer step (optimizer_ns_per_param) with direct gradients (optim/buckets.py): the norm and AdamW read
# bf16 gradients instead of fp32 ones, 30 bytes a parameter instead of 34, but the AdamW kernel reads them no
# faster. Measured at the 1.3B shape on one H100 (benchmarks/adamw_check.py, RESULTS.md 2026-12-06 session 34):
# AdamW 13.89 ms + norm 1.58 ms against 13.79 + 2.31 from the fp32 buffer.
DIRECT_OPTIMIZER_FACTOR = (13.89 + 1.58) / (13.79 + 2.31)


@dataclass
class Gpu:
    name: str
    tflops: float              # dense bf16 peak
    memory_gib: float          # what torch.cuda reports as total
    hbm_gbps: float
    nvlink_gbps: float         # per GPU, per direction, inside a node
    ib_gbps: float             # per GPU, per direction, between nodes
    calibration: Calibration = field(default=None)  # type: ignore[assignment]
    reserve_gib: float = 2.0   # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers: outside torch's allocator
    fragmentation: float = 0.05  # caching-allocator slack on top of the bytes torch allocates
    fp8: bool = True           # FP8 tensor cores (compute capability 8.9+), which --fp8 needs
    hopper: bool = True        # compute capability 9.0+: where quack-kernels' epilogues run (model/quack_gemm.py)

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gib * (1 - self.fragmentation) - self.reserve_gib) * GIB

    def describe(self) -> str:
        return (f"{self.name}: {self.tflops:g} TFLOP/s bf16, {self.memory_gib:g} GiB "
                f"(plans use {self.usable_bytes / GIB:.1f}), HBM {self.hbm_gbps:g} GB/s, NVLink {self.nvlink_gbps:g} "
                f"GB/s, InfiniBand {self.ib_gbps:g} GB/s per GPU; kernels: {self.calibration.source}")


# The H100's kernel speeds are the packaged calibration (calibration.json, below; benchmarks/RESULTS.md's last
# plan-calibration line): measured by benchmarks/plan_check.py at the 1.3B shape, micro-batch 8 (2026-11-25; the
# GEMM and attention rates restated for the cost curves above on 2026-12-08, as `--calibrate` computes them:
# 778.9 TFLOP/s measured -> 793.9 without 12 x GEMM_OVERHEAD_S, 347.5 / attention_efficiency(2048, 128) ->
# 517.2), the optimizer's 2026-12-06 (the flat AdamW step, optim/adamw.py, 15.9 ms over the 1.3B model's
# parameters as profile_step times it), the loss's 2026-12-06 session 35 (parallel/cross_entropy_triton.py, 1.897 ms
# over 16,384 x 50,304 bf16 logits), the gradient hooks' 2026-12-06 session 30 (bf16 -> fp32 copy 2.69 TB/s, add
# 2.83 TB/s; optim/accumulate_triton.py).


def h100_calibration() -> Calibration:
    """The H100 presets' calibration, and the reference other GPUs' figures are scaled from."""
    return measured_calibration()


_H100 = dict(tflops=989.0, hbm_gbps=3350.0)
PRESETS = {
    "h100-80gb": Gpu("h100-80gb", 989.0, 79.2, 3350.0, 450.0, 50.0),
    "h200-141gb": Gpu("h200-141gb", 989.0, 139.8, 4800.0, 450.0, 50.0),
    "a100-80gb": Gpu("a100-80gb", 312.0, 79.2, 2039.0, 300.0, 25.0, fp8=False, hopper=False),
    "a100-40gb": Gpu("a100-40gb", 312.0, 39.4, 1555.0, 300.0, 25.0, fp8=False, hopper=False),
    "v100-32gb": Gpu("v100-32gb", 125.0, 31.7, 900.0, 150.0, 12.5, fp8=False, hopper=False),
}
ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb", "v100": "v100-32gb"}


def _default_calibration(g: Gpu) -> Calibration:
    h100 = h100_calibration()
    if g.name.startswith("h100"):
        return h100
    return h100.scaled(g.tflops / _H100["tflops"], g.hbm_gbps / _H100["hbm_gbps"],
                       f"H100 figures scaled to {g.name} by peak FLOPs and HBM bandwidth")


def resolve_gpu(name: Optional[str] = "h100-80gb", *, tflops: Optional[float] = None,
                memory_gib: Optional[float] = None, hbm_gbps: Optional[float] = None,
                nvlink_gbps: Optional[float] = None, ib_gbps: Optional[float] = None,
                calibration: Optional[Calibration] = None, reserve_gib: Optional[float] = None) -> Gpu:
    """A preset by name (or alias), with any number overridden; `name=None` needs every number."""
    if name is not None:
        key = ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            raise ConfigError(f"unknown --gpu '{name}' (presets: {', '.join(PRESETS)}; or give --gpu custom "
                              "with --gpu-tflops, --gpu-memory-gib, --hbm-gbps, --nvlink-gbps, --ib-gbps)")
        g = dataclasses.replace(PRESETS[key])
    else:
        missing = [n for n, v in [("--gpu-tflops", tflops), ("--gpu-memory-gib", memory_gib),
                                  ("--hbm-gbps", hbm_gbps), ("--nvlink-gbps", nvlink_gbps), ("--ib-gbps", ib_gbps)]
                   if v is None]
        if missing:
            raise ConfigError(f"--gpu custom needs {', '.join(missing)}")
        g = Gpu("custom", tflops, memory_gib, hbm_gbps, nvlink_gbps, ib_gbps)
    for attr, v in [("tflops", tflops), ("memory_gib", memory_gib), ("hbm_gbps", hbm_gbps),
                    ("nvlink_gbps", nvlink_gbps), ("ib_gbps", ib_gbps), ("reserve_gib", reserve_gib)]:
        if v is not None:
            if v <= 0 and attr != "reserve_gib":
                raise ConfigError(f"GPU figure {attr} must be positive, got {v}")
            setattr(g, attr, float(v))
    g.calibration = calibration or _default_calibration(g)
    return g


def mfu_peak_tflops(given: Optional[float], device) -> float:
    """MFU's denominator: --peak-tflops where given, else the device's bf16 dense peak as these presets know it
    (`gpu_for_device`: H100 and H200 989, A100 312, V100 125; an unknown GPU and the CPU 989, the H100's), so
    that an A100's MFU is not reported against an H100's peak."""
    if given is not None:
        return given
    return gpu_for_device(device).tflops if device.type == "cuda" else PRESETS["h100-80gb"].tflops


def gpu_for_device(device) -> Gpu:
    """The preset matching a visible CUDA device (by name and memory), or an H100-speed custom GPU of that size."""
    import torch
    props = torch.cuda.get_device_properties(device)
    name, mem = props.name.lower(), props.total_memory / GIB
    g = next((resolve_gpu(key, memory_gib=mem) for key, p in PRESETS.items()
              if key.split("-")[0] in name and abs(p.memory_gib - mem) < 0.1 * p.memory_gib), None) \
        or resolve_gpu("h100-80gb", memory_gib=mem)
    g.fp8 = (props.major, props.minor) >= (8, 9)   # what the device has, whichever preset it resembles
    g.hopper = props.major >= 9
    return g


# ----- calibration files ------------------------------------------------------------------------------------
RESULTS_MARK = "plan-calibration"
# The latest calibration measured on a GPU (benchmarks/RESULTS.md's last plan-calibration line), shipped with the
# package so an installed gpt3d has it: `gpt3d plan --calibrate` uses it where no GPU is visible.
# benchmarks/update_calibration.py rewrites it from RESULTS.md; tests/end_to_end/test_plan_installed.py checks
# that the two agree.
CALIBRATION_DATA = "calibration.json"


def measured_calibration() -> Calibration:
    """The packaged calibration (gpt3d/plan/calibration.json): a copy of its own, read once a process."""
    return dataclasses.replace(_packaged_calibration())


@functools.cache
def _packaged_calibration() -> Calibration:
    from importlib import resources
    try:
        text = resources.files(__package__).joinpath(CALIBRATION_DATA).read_text()
        return calibration_from_dict(json.loads(text))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"the packaged calibration gpt3d/plan/{CALIBRATION_DATA} is unreadable ({e}); "
                          "reinstall gpt3d") from None


def calibration_to_json(c: Calibration) -> str:
    return json.dumps(dataclasses.asdict(c))


def calibration_from_dict(d: dict, source: Optional[str] = None) -> Calibration:
    names = [f.name for f in dataclasses.fields(Calibration)]
    try:
        c = Calibration(**{k: d[k] for k in names if k in d})
    except TypeError as e:
        raise ConfigError(f"calibration is missing a figure ({e})") from None
    if source:
        c.source = source
    return c


def load_calibration(path: str) -> Calibration:
    """A JSON file written by `gpt3d plan --calibrate`, or a markdown log holding `<!-- plan-calibration {...} -->`
    lines (benchmarks/RESULTS.md): the last such line wins."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"cannot read calibration {path}: {e.strerror}") from None
    if path.endswith(".md"):
        found = re.findall(r"<!--\s*" + RESULTS_MARK + r"\s+(\{.*?\})\s*-->", text)
        if not found:
            raise ConfigError(f"{path} holds no '<!-- {RESULTS_MARK} {{...}} -->' line")
        d = json.loads(found[-1])
        return calibration_from_dict(d, d.get("source") or f"{os.path.basename(path)}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a calibration JSON ({e.msg})") from None
    return calibration_from_dict(d)
