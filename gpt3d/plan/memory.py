"""Bytes per GPU of a layout: what gpt3d allocates, term by term, for the busiest pipeline stage.

Why its own module: it is the half of the plan that can be checked exactly.
Persistent memory mirrors gpt3d's allocations (GPTModel's parameters in their
registration order, with their metadata, read from the model itself built on the
meta device; GradBuffer's contiguous parameter and gradient buffers and buckets
from its own bucket layout; ZeroOptimizer's masters and Adam moments for this
rank's shard) and
is compared byte for byte with real ranks in tests/distributed/test_plan_memory.py.
Activation memory is a list of named per-tensor terms (what autograd and the
compiled graphs keep per layer and per micro-batch), so a kernel change (FP8,
fused cross entropy) edits one line.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional

from ..config import ModelConfig
from ..optim.buckets import bucket_layout, direct_gradients, late_reduction, local_pieces
from ..model.build import build_meta_chunk, compile_granularity
from ..model.gpt import layer_prefix
from ..parallel.layout import padded_vocab_size
from ..parallel.cross_entropy import CHUNK_BYTES
from ..parallel.param_meta import ParamMeta, param_meta
from .layout import Candidate
from .schedule import peak_in_flight


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of one TP rank, read from the model the runtime builds: its global name, local element
    count and metadata (split dim, sequence-parallel, tied copy, shared embedding: parallel/param_meta.py)."""
    name: str
    numel: int
    meta: ParamMeta = ParamMeta()


_TEMPLATE_LAYER = 0   # the one layer a template chunk is built with; a layer's parameters do not depend on its id


def _model_key(m: ModelConfig) -> tuple:
    """ModelConfig's field values: hashable (the dataclass is mutable), so the caches below can key on them."""
    return tuple(getattr(m, f.name) for f in dataclasses.fields(m))


@functools.lru_cache(maxsize=256)
def _chunk_template(model: tuple, vocab_size: int, tp: int, sp: bool, pre: bool,
                    post: bool) -> tuple[ParamInfo, ...]:
    """The parameters of a chunk with one layer, built on the meta device (so `gpt3d plan`'s thousands of
    layouts build a handful of models)."""
    m = ModelConfig(**dict(zip((f.name for f in dataclasses.fields(ModelConfig)), model)))
    chunk = build_meta_chunk(m, vocab_size, tp, sp, [_TEMPLATE_LAYER], pre, post)
    return tuple(ParamInfo(n, p.numel(), param_meta(p)) for n, p in chunk.named_parameters())


@functools.lru_cache(maxsize=4096)
def _chunk_params(model: tuple, vocab_size: int, tp: int, sp: bool, layer_ids: tuple, pre: bool,
                  post: bool) -> tuple[ParamInfo, ...]:
    """chunk_params, cached per chunk (the search meets each chunk of a model in many layouts)."""
    template = _chunk_template(model, vocab_size, tp, sp, pre, post)
    prefix = layer_prefix(_TEMPLATE_LAYER)
    at = [i for i, p in enumerate(template) if p.name.startswith(prefix)]
    lo, hi = (at[0], at[-1] + 1) if at else (len(template), len(template))
    out = list(template[:lo])
    for i in layer_ids:
        out += [ParamInfo(layer_prefix(i) + p.name[len(prefix):], p.numel, p.meta) for p in template[lo:hi]]
    return tuple(out + list(template[hi:]))


def chunk_params(m: ModelConfig, vocab_size: int, tp: int, sp: bool, layer_ids: list[int], pre: bool,
                 post: bool) -> list[ParamInfo]:
    """GPTModel's parameters on one TP rank, in `named_parameters()` order (the optimizer's bucket order): a
    meta-device chunk of one layer, whose layer is repeated under each of `layer_ids`' names."""
    return list(_chunk_params(_model_key(m), vocab_size, tp, sp, tuple(layer_ids), pre, post))


def stage_params(m: ModelConfig, vocab_size: int, lay: Candidate, pp_rank: int) -> list[list[ParamInfo]]:
    """Each model chunk's parameters on stage `pp_rank`."""
    chunks = lay.stage_chunks(m.num_layers, pp_rank)
    return [chunk_params(m, vocab_size, lay.tp, lay.sp, ids, pp_rank == 0 and v == 0,
                         pp_rank == lay.pp - 1 and v == len(chunks) - 1) for v, ids in enumerate(chunks)]


@dataclass
class Persistent:
    """One rank's parameter, gradient and optimizer bytes (steady state, after the first step)."""
    params: int               # contiguous parameter buffer, in the parameter dtype (bucket padding included)
    grads: int                # contiguous fp32 gradient buffer (same layout); 0 with direct gradients
    masters: int              # fp32 master weights of this rank's shard (0 when parameters are fp32)
    adam_moments: int         # exp_avg + exp_avg_sq, fp32, this rank's shard
    adam_steps: int           # one fp32 step counter per shard piece (optim/adamw.py, as torch's per tensor)
    elements: int             # buffer elements, padding included
    param_elements: int
    shard_elements: int       # parameter elements this rank's optimizer owns
    buckets: int
    late_elements: int        # buffer elements reduced after backward (SP norms, tied embedding)
    largest_param: int = 0    # elements
    direct: bool = False      # the optimizer reads autograd's gradients (optim/buckets.py direct_gradients)
    fused_elements: int = 0   # parameter elements whose backward adds into the buffer (gradient-accumulation
                              # fusion, without FP8: model/grad_accumulation.py); the hooks move the others

    @property
    def optimizer(self) -> int:
        return self.masters + self.adam_moments + self.adam_steps

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def persistent_bytes(params: list[ParamInfo], lay: Candidate, *, dp_rank: int = 0, param_bytes: int = 2,
                     bucket_size_mb: float = 40.0) -> Persistent:
    """GradBuffer's and ZeroOptimizer's bytes for `params` (all chunks of a stage, in order) on DP rank
    `dp_rank`, from GradBuffer's own bucket layout (gpt3d/optim/buckets.py)."""
    zero, dp = lay.zero_effective, lay.dp
    numels = [p.numel for p in params]
    late = [late_reduction(p.meta.sequence_parallel, p.meta.tied_across_stages, lay.tp, lay.pp) for p in params]
    buckets = bucket_layout(numels, late, bucket_size_mb=bucket_size_mb, dp=dp, zero=zero)
    start = buckets[-1].end if buckets else 0
    late_elements = sum(b.end - b.start for b in buckets if b.late)
    pieces = list(local_pieces(buckets, numels, dp, dp_rank, zero))
    shard = sum(hi - lo for _, lo, hi, _ in pieces)
    direct = direct_gradients(dp, lay.num_micro, late)
    return Persistent(params=start * param_bytes, grads=0 if direct else start * 4,
                      masters=shard * 4 if param_bytes != 4 else 0,
                      adam_moments=8 * shard, adam_steps=4 * len(pieces), elements=start,
                      param_elements=sum(p.numel for p in params), shard_elements=shard, buckets=len(buckets),
                      late_elements=late_elements, largest_param=max((p.numel for p in params), default=0),
                      direct=direct, fused_elements=0 if direct else sum(p.numel for p in params
                                                                          if p.meta.fuses_wgrad))


# ----- activations ------------------------------------------------------------------------------------------
@dataclass
class Terms:
    """Named byte counts; `scaled` multiplies them (per micro-batch -> micro-batches in flight)."""
    items: dict = field(default_factory=dict)

    def add(self, name: str, nbytes: float) -> None:
        if nbytes:
            self.items[name] = self.items.get(name, 0) + nbytes

    @property
    def total(self) -> float:
        return float(sum(self.items.values()))


@dataclass(frozen=True)
class Shape:
    """Per-rank tensor sizes of one micro-batch."""
    b: int
    s: int
    h: int
    tokens: int          # b*s
    seq_tokens: int      # residual-stream tokens on this rank (b*s/tp with SP)
    e: int               # activation element bytes


def shape_of(m: ModelConfig, lay: Candidate, e: int) -> Shape:
    t = lay.mbs * m.seq_length
    return Shape(lay.mbs, m.seq_length, m.hidden_size, t, t // lay.tp if lay.sp else t, e)


def _norm_input(out: Terms, m: ModelConfig, sh: Shape, compiled: bool, name: str) -> None:
    """A norm keeps its input and statistics; eager RMSNorm keeps two fp32 copies of the input instead."""
    Ts, h = sh.seq_tokens, sh.h
    rms = m.normalization == "rmsnorm"
    if rms and not compiled:
        out.add(f"{name}: RMSNorm fp32 copies (eager)", 2 * 4 * Ts * h)
    else:
        out.add(name, sh.e * Ts * h)
    out.add("norm statistics", 4 * Ts if rms else 2 * sh.e * Ts)


def dropout_mask_bytes(lay: Candidate, e: int, device: str) -> int:
    """Bytes per element of a residual dropout mask kept for backward: bool, but for the CPU's native dropout
    kernel (sequence-parallel shards), which keeps it in the activation dtype (gpt3d/parallel/random.py)."""
    return e if lay.sp and device == "cpu" else 1


def layer_terms(m: ModelConfig, lay: Candidate, sh: Shape, compiled: bool, recompute: Optional[str],
                device: str = "cuda") -> Terms:
    """What one transformer layer keeps for backward, one micro-batch, one TP rank.

    Compiled (Inductor's partition: census on CPU, measured on an H100): the layer input and the residual after
    attention (norm inputs) with norm statistics, the normalised inputs of the QKV and MLP matmuls (whole
    sequence: with SP they are all-gathered), the QKV output, the attention output and its log-sum-exp (fused
    SDPA keeps no s x s scores), and the MLP's intermediates. Eager (exact on CPU,
    tests/distributed/test_plan_activations.py): RMSNorm keeps fp32 copies, SwiGLU also silu(gate). Full recompute keeps
    the layer input; selective recompute of the attention core drops the log-sum-exp and the rotated copies,
    and compiled also the attention output (measured on an H200: 1.3B kept 24.17 GiB, 1.49 less than without)."""
    t, e, T, Ts, h = lay.tp, sh.e, sh.tokens, sh.seq_tokens, sh.h
    hd, nh, nkv, f = m.head_dim, m.num_attention_heads, m.kv_heads, m.ffn_size
    out = Terms()
    rng = 5056 if device == "cpu" else 0   # torch.utils.checkpoint keeps the CPU generator's state
    if recompute == "full":
        out.add("layer input (kept by full recompute)", e * Ts * h)
        out.add("RNG state kept by recompute", rng)
        return out
    for name in ("layer input", "residual after attention"):
        _norm_input(out, m, sh, compiled, name)
        out.add("normalised matmul inputs (whole sequence)", e * T * h)
    if lay.sp and m.swiglu:   # the gate and fc1 projections each all-gather the MLP input
        out.add("second all-gathered MLP input (SP + SwiGLU)", e * T * h)
    # q, k and v are views of the QKV output, which stays alive whole. q is a copy when RoPE rotates it (outside
    # a selectively recomputed core) or when GQA regroups more than one KV head per rank; RoPE also keeps a
    # rotated copy of k (eager on CPU, and compiled on the H100; CPU Inductor keeps the view instead).
    rope, selective = m.use_rotary_position_embeddings, recompute == "selective"
    out.add("QKV output (q, k, v)", e * T * (nh + 2 * nkv) * hd // t)
    regroup = nkv != nh and nkv // t > 1
    if (rope and not selective) or regroup:
        out.add("q copy (RoPE / GQA)", e * T * nh * hd // t)
    if rope and not selective:
        out.add("rotated k", e * T * nkv * hd // t)
    # CPU's flash kernel takes no dropout: with attention dropout SDPA's math path keeps the s x s probabilities,
    # the dropout mask and the dropped probabilities instead of a log-sum-exp (measured on CPU, torch 2.13: 12
    # bytes per score in fp32, 16 in bf16). Exact for GPT blocks; with RoPE or GQA the math path keeps other
    # q/k/v copies than the fused kernels (not modelled)
    math_sdpa = m.attention_dropout > 0 and device == "cpu"
    if selective:
        out.add("RNG state kept by recompute", rng)
    elif math_sdpa:
        out.add("attention scores (math SDPA: attention dropout on CPU)",
                (12 if e == 4 else 16) * sh.b * (nh // t) * sh.s * sh.s)
    else:
        out.add("attention log-sum-exp (fp32)", 4 * sh.b * (nh // t) * sh.s)
    if not (selective and compiled):   # compiled, the partition recomputes it for the projection's backward
        out.add("attention output", e * T * nh * hd // t)
    # GeLU: fc1 output and GeLU output; SwiGLU: gate and fc1 outputs and their product (+ silu(gate) eager)
    out.add("MLP intermediates", e * T * f // t * ((3 if compiled else 4) if m.swiglu else 2))
    if m.hidden_dropout > 0:
        out.add("dropout masks", 2 * Ts * h * dropout_mask_bytes(lay, e, device))
    return out


@dataclass
class StageMemory:
    """Predicted peak bytes of one pipeline stage's rank, by term."""
    pp_rank: int
    persistent: Persistent
    per_microbatch: Terms        # activations of one micro-batch on this stage (all chunks)
    in_flight: float             # micro-batches' worth of activations alive at the peak
    other: Terms                 # inputs, loss transients, gradients before accumulation, comm buffers
    peak: float = 0.0

    def breakdown(self) -> dict:
        p = self.persistent
        return {"parameters": p.params, "gradient buffer": p.grads, "fp32 masters": p.masters,
                "Adam moments": p.adam_moments + p.adam_steps,
                "activations": self.per_microbatch.total * self.in_flight, **self.other.items}


def _stage_persistent(m: ModelConfig, vocab_size: int, lay: Candidate, pp_rank: int, param_bytes: int,
                      bucket_size_mb: float, cache: Optional[dict]) -> tuple[list[ParamInfo], Persistent]:
    """The stage's parameters and its largest DP shard (the last DP rank holds the bucket padding's shard, the
    first the most parameter elements: ZeRO-1 is reported for the first)."""
    key = (lay.tp, lay.pp, lay.vp, lay.dp, lay.zero_effective, lay.sp, lay.split, pp_rank, param_bytes,
           bucket_size_mb, lay.num_micro == 1)
    if cache is not None and key in cache:
        return cache[key]
    params = [p for c in stage_params(m, vocab_size, lay, pp_rank) for p in c]
    out = params, persistent_bytes(params, lay, dp_rank=0, param_bytes=param_bytes, bucket_size_mb=bucket_size_mb)
    if cache is not None:
        cache[key] = out
    return out


def stage_memory(m: ModelConfig, vocab_size: int, lay: Candidate, pp_rank: int, *, param_bytes: int = 2,
                 bucket_size_mb: float = 40.0, compiled: bool = True, fused_loss: bool = True,
                 device: str = "cuda", cache: Optional[dict] = None, granularity: str = "auto",
                 fp8: bool = False) -> StageMemory:
    """Peak of stage `pp_rank` = persistent + activations of the micro-batches in flight + the largest transient.

    `fused_loss`: TP=1 on GPU, the compiled cross entropy keeps the bf16 logits; otherwise the vocab-parallel
    loss keeps fp32 softmax. With `--cross-entropy-loss-fusion` (`linear_loss`) neither: the logits never exist
    whole, and the output layer's input and fp32 weight gradients, computed in forward, are kept instead.
    `granularity` (--compile-granularity) and `fp8` (--fp8) decide, as training does, whether a compiled chunk is
    one graph. `cache` (a dict) reuses the persistent layout across layouts that share it."""
    e = param_bytes
    linear_loss = m.cross_entropy_loss_fusion
    sh = shape_of(m, lay, e)
    params, pers = _stage_persistent(m, vocab_size, lay, pp_rank, param_bytes, bucket_size_mb, cache)
    first, last = pp_rank == 0, pp_rank == lay.pp - 1
    layer_ids = lay.stage_chunks(m.num_layers, pp_rank)
    n_recompute = lay.recompute_num_layers if lay.recompute == "full" and lay.recompute_num_layers else None
    t, T, Ts, h = lay.tp, sh.tokens, sh.seq_tokens, sh.h
    pv = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, t)
    chunk_act, layer_full = [], layer_terms(m, lay, sh, compiled, None, device)
    per_mode = {rc: layer_terms(m, lay, sh, compiled, rc, device) for rc in {None, lay.recompute}}
    for v, ids in enumerate(layer_ids):
        c = Terms()
        for i, _ in enumerate(ids):
            rc = lay.recompute if lay.recompute != "full" or n_recompute is None or i < n_recompute else None
            for k, nbytes in per_mode[rc].items.items():
                c.add(k, nbytes)
        if first and v == 0:
            c.add("embedding inputs", (8 * sh.s if m.learned_positions else 0) + (9 * T if t > 1 else 0))
            c.add("dropout masks", Ts * h * dropout_mask_bytes(lay, e, device) if m.hidden_dropout > 0 else 0)
        if last and v == len(layer_ids) - 1:
            _norm_input(c, m, sh, compiled, "final norm input")
            c.add("loss value", 4)
            if linear_loss:   # parallel/cross_entropy.py: the head's gradients are made in forward and kept
                c.add("input gradient (fused linear + loss)", e * T * h)
                c.add("fp32 weight gradient (fused linear + loss)", 4 * pv // t * h)
            elif fused_loss:
                c.add("normalised matmul inputs (whole sequence)", e * T * h)
                c.add("logits (kept by the fused loss)", e * T * pv // t)
                c.add("loss statistics", 8 * T)
            else:
                c.add("normalised matmul inputs (whole sequence)", e * T * h)
                c.add("fp32 softmax (kept by the vocab-parallel loss)", 4 * T * pv // t)
                c.add("loss targets", 9 * T)
        else:
            c.add("stage output kept for backward", e * Ts * h)
        chunk_act.append(c)
    total = Terms()
    for c in chunk_act:
        for k, nbytes in c.items.items():
            total.add(k, nbytes)
    in_flight_bytes = peak_in_flight(lay.pp, pp_rank, lay.vp, lay.num_micro, [c.total for c in chunk_act])
    in_flight = in_flight_bytes / total.total if total.total else 0.0
    other = Terms()
    other.add("token batches (this step and the next)", 2 * lay.num_micro * lay.mbs * (m.seq_length + 1) * 8)
    # Backward's largest transient on top of the saved activations (measured on an H100 for the whole-chunk
    # graph, benchmarks/RESULTS.md): a layer's weight gradients in the parameter dtype plus a residual-stream
    # gradient, or the output layer's weight gradient; with full recompute, one layer's recomputed activations
    # plus its MLP backward's gradients. Per-layer graphs and eager also hold that MLP workspace.
    # one graph for the whole chunk or one per layer: the rule training compiles by (model/build.py)
    deepest = max((len(ids) for ids in layer_ids), default=0)
    whole_graph = compiled and compile_granularity(granularity, lay.tp, lay.dp, deepest, m.hidden_dropout > 0
                                                   or m.attention_dropout > 0, fp8) == "chunk"
    f_t = m.ffn_size // t
    first_layer = layer_ids[0][0] if layer_ids and layer_ids[0] else None
    layer_params = sum(p.numel for p in params if p.name.startswith(layer_prefix(first_layer))) \
        if first_layer is not None else 0
    workspace = 0 if whole_graph else 2 * e * T * f_t
    transients = {"one layer's weight gradients + backward workspace": layer_params * e + e * T * h + workspace}
    if last:
        transients["output-layer weight gradient"] = e * pv // t * h
    if lay.recompute == "full":
        transients["one layer recomputed in backward + its MLP gradients"] = layer_full.total + 2 * e * T * f_t
    if last and linear_loss:   # forward: one chunk of logits and their gradient (CHUNK_BYTES of logits each)
        rows = max(256, CHUNK_BYTES // (pv // t * e) // 256 * 256)
        transients["fused linear + loss: a chunk's logits and their gradient"] = 2 * e * min(rows, T) * pv // t
    elif last and not fused_loss:   # the fused loss's backward writes the logits' gradient over them
        transients["vocab-parallel loss temporaries"] = 6 * T * pv // t
    if lay.pp > 1:
        other.add("pipeline send/receive buffers", 2 * e * Ts * h)
    if pers.direct:   # kept until the optimizer step, while backward frees the activations they outgrow
        other.add("gradients kept for the optimizer (direct)", max(0.0, e * pers.param_elements - in_flight_bytes))
    for k, nbytes in transients.items():   # they happen one at a time: count the largest
        if nbytes == max(transients.values()):
            other.add(k, nbytes)
            break
    sm = StageMemory(pp_rank, pers, total, in_flight, other)
    sm.peak = pers.total + in_flight_bytes + other.total
    return sm


def plan_memory(m: ModelConfig, vocab_size: int, lay: Candidate, **kw) -> list[StageMemory]:
    """Every stage's prediction; the plan reports the largest."""
    return [stage_memory(m, vocab_size, lay, r, **kw) for r in range(lay.pp)]
