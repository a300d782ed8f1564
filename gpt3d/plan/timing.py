"""Step time of a layout: compute from FLOPs at measured kernel speeds, plus the communication gpt3d does.

Why its own module: the time model composes measured speeds (presets.Calibration)
with gpt3d's behaviour: TP/SP collectives are blocking (not overlapped), pipeline
point-to-point is blocking per micro-batch, the schedule's bubble comes from
schedule.pipeline_time, DP gradient reductions overlap the last micro-batch's
backward bucket by bucket (late buckets and the last one do not), and ZeRO-1
all-gathers the parameters after the optimizer step. With --fp8 the FP8 linears'
GEMMs run at a measured multiple of the bf16 rate and their casts are charged at
the elementwise rate (presets.FP8_*). The compute part is checked on one GPU
(benchmarks/plan_check.py); every communication term rests on the bandwidth
figures of presets.py alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..parallel.layout import padded_vocab_size
from ..model.fp8 import fp8_eligible
from ..model.fp8_weights import holds_casts
from ..perf.flops import layer_flops, layer_linears
from .layout import Candidate
from .memory import Persistent, Shape, layer_terms, shape_of
from .presets import (ATTN_BACKWARD_FACTOR, ATTN_DROPOUT_S_PER_SCORE, COMM_EFFICIENCY, COMM_LATENCY_S,
                      DIRECT_OPTIMIZER_FACTOR, DROPOUT_HASH_BYTES, DROPOUT_MASK_BYTES, EW_PASSES, FP8_CAST_BYTES,
                      FP8_GEMM_SPEEDUP, FUSED_GEMM_BYTES, GELU_EPILOGUE_EW_SHARE, GEMM_OVERHEAD_S, LOSS_PASSES,
                      VOCAB_PARALLEL_LOSS_OF_EW, Gpu, attention_efficiency, h100_calibration)
from .schedule import pipeline_time

# Eager execution runs each norm, activation and residual as its own kernels. Rough factor from
# benchmarks/RESULTS.md (125M: 357k tok/s eager vs 443k compiled, both cuDNN/flash attention); not re-measured.
EAGER_EW_FACTOR = 3.0


@dataclass
class Links:
    tp_gbps: float
    pp_gbps: float
    dp_gbps: float
    embedding_gbps: float


def links(lay: Candidate, gpu: Gpu, gpus_per_node: int) -> Links:
    """Megatron rank order (TP innermost, then DP, then PP): a group stays on NVLink while it fits in a node."""
    nv, ib = gpu.nvlink_gbps * COMM_EFFICIENCY, gpu.ib_gbps * COMM_EFFICIENCY

    def inside(span: int) -> float:
        return nv if span <= gpus_per_node else ib
    return Links(tp_gbps=inside(lay.tp), pp_gbps=inside(lay.tp * lay.dp * lay.pp),
                 dp_gbps=inside(lay.tp * lay.dp), embedding_gbps=inside(lay.world))


def _ring(nbytes: float, n: int, gbps: float, kind: str) -> float:
    """Ring collective time: all-reduce moves 2(n-1)/n of the buffer, all-gather / reduce-scatter (n-1)/n."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return factor * nbytes / (gbps * 1e9) + COMM_LATENCY_S


@dataclass
class LayerTime:
    forward: float
    backward: float
    recompute: float
    tp_comm_forward: float
    tp_comm_backward: float
    dropout: float = 0.0          # what dropout adds to forward + backward (and to a recompute of them)
    fp8_casts: float = 0.0        # what --fp8's casts add to forward + backward (and to a full recompute)


def dropout_site_time(m: ModelConfig, elements: int, gpu: Gpu, ew_factor: float = 1.0) -> tuple[float, float]:
    """(forward, backward) seconds of one residual dropout site over `elements`: make the mask and write it,
    read it back (presets.DROPOUT_HASH_BYTES, DROPOUT_MASK_BYTES)."""
    if m.hidden_dropout <= 0:
        return 0.0, 0.0
    rate = gpu.calibration.ew_gbps * 1e9 / ew_factor
    half = DROPOUT_MASK_BYTES / 2
    return elements * (DROPOUT_HASH_BYTES + half) / rate, elements * half / rate


def attention_dropout_time(m: ModelConfig, scores: int, gpu: Gpu) -> tuple[float, float]:
    """(forward, backward) seconds that attention dropout adds to one fused attention over `scores` (b x heads
    x s x s) scores: ATTN_DROPOUT_S_PER_SCORE at the H100's measured attention rate. Only forward + backward
    was measured; the split (backward ATTN_BACKWARD_FACTOR x forward, as attention's own time) is assumed, and
    decides what a recompute of the attention adds."""
    if m.attention_dropout <= 0:
        return 0.0, 0.0
    total = scores * ATTN_DROPOUT_S_PER_SCORE * h100_calibration().attn_tflops / gpu.calibration.attn_tflops
    share = total / (1 + ATTN_BACKWARD_FACTOR)
    return share, ATTN_BACKWARD_FACTOR * share


def fp8_layer(m: ModelConfig, lay: Candidate, sh: Shape) -> tuple[float, float, float, float]:
    """With --fp8 (tensorwise): (forward matmul FLOPs that run in FP8, elements the forward casts, elements a
    full recompute's replay of it casts, elements the backward casts) for one layer, one micro-batch, one TP
    rank. A linear runs FP8 where fp8_eligible says so (gpt3d/model/fp8.py); its forward casts its input (the
    whole sequence: sequence parallelism gathers it first) and its weight, which backward reuses; its backward
    casts the output gradient.
    Where a step would cast a weight more than once (fp8_weights.holds_casts) it casts it once for the step:
    per micro-batch, 1/num_micro of it, and a full recompute's replay casts only the inputs."""
    flops = inputs = weights = bwd = 0.0
    for i, o in layer_linears(m, lay.tp):
        if fp8_eligible(o, i):
            flops += 2 * sh.tokens * i * o
            inputs += sh.tokens * i
            weights += i * o
            bwd += sh.tokens * o
    if holds_casts(lay.num_micro, lay.recompute):
        return flops, inputs + weights / lay.num_micro, inputs, bwd
    return flops, inputs + weights, inputs + weights, bwd


def layer_time(m: ModelConfig, lay: Candidate, gpu: Gpu, link: Links, sh: Shape, recompute,
               ew_factor: float = 1.0, fp8: bool = False, gelu_epilogues: bool = False) -> LayerTime:
    """`ew_factor` > 1 for eager execution (unfused norms, activations and residuals); `fp8`: --fp8 with the
    tensorwise recipe (FP8 GEMMs and their casts, presets.FP8_GEMM_SPEEDUP and FP8_CAST_BYTES); `gelu_epilogues`:
    quack's GeLU epilogues in the fc1 GEMMs (presets.GELU_EPILOGUE_EW_SHARE)."""
    cal = gpu.calibration
    gemm, attn = layer_flops(m, lay, sh)
    fp8_flops, cast_f, recast, cast_b = fp8_layer(m, lay, sh) if fp8 else (0.0, 0.0, 0.0, 0.0)
    gemm -= fp8_flops * (1 - 1 / FP8_GEMM_SPEEDUP)
    cast_rate = cal.ew_gbps * 1e9 / (FP8_CAST_BYTES * ew_factor)
    cast_f, recast, cast_b = cast_f / cast_rate, recast / cast_rate, cast_b / cast_rate
    matmuls = 5 if m.swiglu else 4
    gemm_s = gemm / (cal.gemm_tflops * 1e12) + matmuls * GEMM_OVERHEAD_S          # forward; backward is twice it
    attn_s = attn / (cal.attn_tflops * 1e12 * attention_efficiency(sh.s, m.head_dim))
    kept = layer_terms(m, lay, sh, True, None)
    ew_bytes = kept.total - kept.items.get("dropout masks", 0)
    if gelu_epilogues:
        ew_bytes -= (1 - GELU_EPILOGUE_EW_SHARE) * kept.items.get("MLP intermediates", 0)
    ew = EW_PASSES * ew_bytes / (cal.ew_gbps * 1e9) * ew_factor
    fwd = gemm_s + attn_s + ew / 3
    bwd = 2 * gemm_s + ATTN_BACKWARD_FACTOR * attn_s + 2 * ew / 3
    # dropout: two residual sites, and the fused attention's own mask (forward, and again in backward)
    site_f, site_b = dropout_site_time(m, sh.seq_tokens * sh.h, gpu, ew_factor)
    attn_drop_f, attn_drop_b = attention_dropout_time(m, sh.b * (m.num_attention_heads // lay.tp) * sh.s ** 2, gpu)
    drop_f, drop_b = 2 * site_f + attn_drop_f, 2 * site_b + attn_drop_b
    # two all-reduces (or all-gather + reduce-scatter pairs with SP) of the residual stream each way
    stream = sh.e * sh.tokens * sh.h
    kinds = ("all_gather", "reduce_scatter") if lay.sp else ("all_reduce",)
    comm = 2 * sum(_ring(stream, lay.tp, link.tp_gbps, k) for k in kinds)
    if lay.sp and m.swiglu:   # gate and fc1 each all-gather the MLP input (and reduce-scatter its gradient)
        comm += _ring(stream, lay.tp, link.tp_gbps, "all_gather")
    rc = fwd + drop_f + recast if recompute == "full" else attn_s + attn_drop_f if recompute == "selective" else 0.0
    return LayerTime(fwd, bwd, rc, comm, comm, drop_f + drop_b, cast_f + cast_b)


@dataclass
class StepTime:
    seconds: float
    tokens_per_s: float
    parts: dict = field(default_factory=dict)     # seconds by cause (the slowest stage's view)
    stage_seconds: list = field(default_factory=list)   # forward+backward per micro-batch, per stage


def step_time(m: ModelConfig, vocab_size: int, lay: Candidate, gpu: Gpu, gpus_per_node: int,
              persistent: list[Persistent], *, param_bytes: int = 2, overlap_grad_reduce: bool = True,
              fused_loss: bool = True, compiled: bool = True, fp8: bool = False, fp8_linears: bool = False,
              gelu_epilogues: bool = False) -> StepTime:
    """`persistent`: each stage's optimizer layout (from memory.stage_memory), for bucket sizes and shards;
    `fp8`: the layers' linears run FP8 GEMMs (tensorwise), the output head stays bf16; `fp8_linears`: --fp8 with
    any recipe, whose FP8 linears' weight gradients the hooks add (no gradient-accumulation fusion for them);
    `gelu_epilogues`: as layer_time's."""
    cal, link = gpu.calibration, links(lay, gpu, gpus_per_node)
    ew_factor = 1.0 if compiled else EAGER_EW_FACTOR
    sh = shape_of(m, lay, param_bytes)
    t, T, h = lay.tp, sh.tokens, sh.h
    pv = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, t)
    n_rc = lay.recompute_num_layers if lay.recompute == "full" and lay.recompute_num_layers else None
    p2p_bytes = sh.e * sh.seq_tokens * h
    p2p = (p2p_bytes / (link.pp_gbps * 1e9) + COMM_LATENCY_S) if lay.pp > 1 else 0.0
    stage_times, per_stage_parts, host_micro = [], [], []
    # a layer's weight elements on FP8 GEMMs (one rank): marked for the fusion as the meta chunk is, yet hooked
    fp8_weights = sum(i * o for i, o in layer_linears(m, t) if fp8_eligible(o, i)) if fp8 or fp8_linears else 0
    per_mode = {rc: layer_time(m, lay, gpu, link, sh, rc, ew_factor, fp8, gelu_epilogues)
                for rc in {None, lay.recompute}}
    for r in range(lay.pp):
        chunks = lay.stage_chunks(m.num_layers, r)
        parts = {"layers (compute)": 0.0, "recompute": 0.0, "dropout": 0.0, "FP8 casts": 0.0, "TP communication": 0.0,
                 "embedding": 0.0, "output layer + loss": 0.0, "pipeline send/receive": 0.0}
        for v, ids in enumerate(chunks):
            for i, _ in enumerate(ids):
                rc = lay.recompute if lay.recompute != "full" or n_rc is None or i < n_rc else None
                lt = per_mode[rc]
                parts["layers (compute)"] += lt.forward + lt.backward
                parts["recompute"] += lt.recompute
                parts["dropout"] += lt.dropout
                parts["FP8 casts"] += lt.fp8_casts
                parts["TP communication"] += lt.tp_comm_forward * (2 if rc == "full" else 1) + lt.tp_comm_backward
            if r == 0 and v == 0:
                parts["embedding"] += (sh.e * pv // t * h + 4 * sh.e * T * h) / (cal.ew_gbps * 1e9) * ew_factor + \
                    2 * _ring(sh.e * T * h, t, link.tp_gbps, "all_reduce")
                parts["dropout"] += sum(dropout_site_time(m, sh.seq_tokens * h, gpu, ew_factor))
            if r == lay.pp - 1 and v == len(chunks) - 1:
                gemm = 6 * T * h * pv / t / (cal.gemm_tflops * 1e12) + 3 * GEMM_OVERHEAD_S
                # fused: bf16 logits read/written LOSS_PASSES times; vocab-parallel: ~5 fp32 passes
                loss_bytes = (LOSS_PASSES * sh.e if fused_loss else 5 * 4) * T * pv / t
                rate = cal.loss_gbps if fused_loss else cal.ew_gbps * VOCAB_PARALLEL_LOSS_OF_EW / ew_factor
                loss = loss_bytes / (rate * 1e9)
                parts["output layer + loss"] += gemm + loss + 2 * _ring(sh.e * T * h, t, link.tp_gbps, "all_reduce")
            if lay.pp > 1:
                parts["pipeline send/receive"] += 2 * p2p
        # each parameter's hook copies (first micro-batch) or adds (the rest) its bf16 gradient into fp32;
        # with direct gradients there is no buffer to move them into. Where weights' GEMMs add into it
        # themselves (gradient-accumulation fusion, not FP8's), the buffer is zeroed once a step, the hooks
        # add the other gradients every micro-batch (optim/grad_buffer.py zero_grad), and each fused GEMM's
        # fp32 output costs what FUSED_GEMM_BYTES would at the hooks' rate
        pers, n = persistent[r], lay.num_micro
        layers_here = sum(len(ids) for ids in chunks)
        fused = max(0, pers.fused_elements - layers_here * fp8_weights)
        unfused = pers.param_elements - fused
        moved = 0 if pers.direct else (unfused * (6 + 10 * (n - 1)) if not fused else
                                       4 * pers.param_elements + (unfused * 10 + fused * FUSED_GEMM_BYTES) * n) / n
        parts["gradient accumulation"] = moved / (cal.grad_gbps * 1e9)
        host_micro.append(layers_here * cal.host_layer_s *
                          (4 / 3 if lay.recompute == "full" else 1.0))
        stage_times.append(sum(parts.values()))
        per_stage_parts.append(parts)
    pipe = pipeline_time(stage_times, lay.num_micro, lay.vp)
    slowest = max(range(lay.pp), key=lambda r: stage_times[r])
    parts = {k: v * lay.num_micro for k, v in per_stage_parts[slowest].items()}
    parts["pipeline bubble"] = pipe - lay.num_micro * stage_times[slowest]
    tail = []
    for r, pers in enumerate(persistent):
        grad_bytes = 4 * pers.elements
        late = 4 * pers.late_elements
        kind = "reduce_scatter" if lay.zero_effective else "all_reduce"
        early_comm = _ring(grad_bytes - late, lay.dp, link.dp_gbps, kind)
        late_comm = _ring(late, lay.dp, link.dp_gbps, kind)
        backward_last = stage_times[r] * 2 / 3
        n_early = max(1, pers.buckets - (1 if pers.late_elements else 0))
        exposed = early_comm if not overlap_grad_reduce else \
            max(early_comm / n_early, early_comm - backward_last * (n_early - 1) / n_early)
        tied = 0.0
        if lay.pp > 1 and not m.untie_embeddings_and_output_weights and r in (0, lay.pp - 1):
            tied = _ring(4 * pv // t * h, 2, link.embedding_gbps, "all_reduce")
        direct_half = pers.direct and param_bytes == 2   # fp32 gradients read directly are no smaller
        opt = pers.shard_elements * cal.optimizer_ns_per_param * 1e-9 * (DIRECT_OPTIMIZER_FACTOR if direct_half
                                                                       else 1.0)
        gather = _ring(param_bytes * pers.elements, lay.dp, link.dp_gbps, "all_gather") if lay.zero_effective \
            else 0.0
        tail.append({"DP gradient reduction (exposed)": exposed + late_comm, "tied embedding all-reduce": tied,
                     "optimizer step": opt, "ZeRO-1 parameter all-gather": gather})
    worst = max(tail, key=lambda d: sum(d.values()))
    parts.update(worst)
    seconds = pipe + sum(worst.values())
    # the host launches every micro-batch and the step's own work; when that takes longer, the GPU waits
    host = lay.num_micro * max(host_micro) + cal.host_step_s
    if host > seconds:
        parts["host launch (GPU idle)"] = host - seconds
        seconds = host
    tokens = lay.global_batch * m.seq_length
    return StepTime(seconds, tokens / seconds, {k: v for k, v in parts.items() if v}, stage_times)
