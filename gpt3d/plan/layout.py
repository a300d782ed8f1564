"""One candidate parallel layout, and every valid one for a model, batch and cluster.

Why a separate module: the memory and time models take a `Candidate`, the search
makes them. The layout arithmetic (DP, micro-batches, virtual stages, each stage's
layers) and its rules are the runtime's own, parallel/layout.py: a candidate is made by
`parallel.layout.resolve` from the config it stands for, and it is valid when
gpt3d's own `Config.validate` (the rule `gpt3d train` applies) accepts that config,
so the planner never proposes a layout training refuses, nor hides one it accepts.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional
from collections.abc import Iterable

from ..config import Config
from ..errors import ConfigError
from ..optim.buckets import effective_zero_stage
from ..parallel import layout as runtime

RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Candidate:
    """A layout the planner weighs: the runtime's layout (parallel/layout.py's `Layout` fixes TP, PP, DP, VP,
    micro-batching and SP; `runtime()` compares them) plus the choices that change memory and time but not the
    layout arithmetic (recompute, ZeRO stage, uneven split)."""
    tp: int
    pp: int
    dp: int
    mbs: int                   # micro-batch size
    num_micro: int             # micro-batches per step per DP rank
    vp: int = 1                # model chunks per pipeline stage (interleaved 1F1B when > 1)
    sp: bool = False
    recompute: Optional[str] = None   # None | "selective" | "full"
    zero: int = 1
    split: Optional[str] = None       # explicit --pipeline-model-parallel-split
    recompute_num_layers: Optional[int] = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        """Samples per step (parallel/layout.py's rule)."""
        return runtime.global_batch_size(self.mbs, self.num_micro, self.dp)

    def runtime(self) -> tuple:
        """What the runtime's layout (parallel/layout.py) fixes: TP, PP, DP, micro-batching, chunks, SP."""
        return self.tp, self.pp, self.dp, self.mbs, self.num_micro, self.vp, self.sp

    @property
    def zero_effective(self) -> int:
        return effective_zero_stage(self.zero, self.dp)

    def key(self) -> tuple:
        """What makes two candidates the same run: the runtime's layout and the choices on top, ZeRO as it takes
        effect (stage 1 at DP 1 is stage 0)."""
        return self.runtime() + (self.recompute, self.zero_effective, self.split,
                                 self.recompute_num_layers if self.recompute == "full" else None)

    def label(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}" + (f"x{self.vp}v" if self.vp > 1 else ""), f"DP{self.dp}",
                 f"mb{self.mbs}x{self.num_micro}"]
        if self.split:
            parts.append(f"split {self.split}")
        if self.sp:
            parts.append("SP")
        recompute = {None: "no-recompute", "selective": "selective", "full": "full-recompute"}[self.recompute]
        if self.recompute == "full" and self.recompute_num_layers:
            recompute += f"({self.recompute_num_layers})"
        parts.append(recompute)
        parts.append(f"ZeRO{self.zero_effective}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)

    def stage_chunks(self, num_layers: int, pp_rank: int) -> list[list[int]]:
        """Global layer ids of each model chunk on stage `pp_rank` (gpt3d's own assignment)."""
        per_chunk = runtime.layers_per_virtual_stage(num_layers, self.pp, self.vp)
        return runtime.stage_layers(num_layers, self.pp, pp_rank, self.split, per_chunk)


def layout_of(cfg: Config, world: int) -> Candidate:
    """The layout a config asks for at `world` GPUs (the runtime's `requested`: checked only for the world size;
    `is_valid` says whether gpt3d runs it)."""
    p, m = cfg.parallel, cfg.model
    tp, pp, dp, vp, mbs, num_micro = runtime.requested(cfg, world)
    return Candidate(tp=tp, pp=pp, dp=dp, mbs=mbs, num_micro=num_micro, vp=vp, sp=p.sequence_parallel and tp > 1,
                  recompute=m.recompute_granularity, zero=p.zero_stage, split=p.pipeline_model_parallel_split,
                  recompute_num_layers=m.recompute_num_layers)


def own_layout(cfg: Config, world: int) -> tuple[Optional[Candidate], Optional[str]]:
    """The config's own layout at `world` GPUs (None where the world size does not split into TP x PP x DP) and,
    where `gpt3d train` would refuse the config itself, the one-line reason (None where it runs that layout)."""
    try:
        own = layout_of(cfg, world)
    except ConfigError as e:
        return None, str(e)
    return own, _refusal(_plannable(cfg), own)


def _refusal(cfg: Config, lay: Candidate) -> Optional[str]:
    """Why `gpt3d train` would not run `cfg` as `lay` (its validation's or the runtime's error), or None."""
    try:
        cfg.validate(lay.world)
        r = runtime.resolve(cfg, lay.world)
    except ConfigError as e:
        return str(e)
    got = (r.tp, r.pp, r.dp, r.micro_batch_size, r.num_micro, r.vp, r.sequence_parallel)
    return None if got == lay.runtime() else f"the runtime resolves it to another layout {got}"


def _plannable(cfg: Config) -> Config:
    """A copy of `cfg` whose parallel, model, training and data sections may be changed (only those are copied:
    cheap, the search calls this per layout), with what a plan need not be given made irrelevant: the run's
    length (one iteration where none is given) and the data (mock: the plan reads no files)."""
    c = copy.copy(cfg)
    c.parallel, c.model, c.training, c.data = (copy.copy(s) for s in (cfg.parallel, cfg.model, cfg.training,
                                                                        cfg.data))
    t = c.training
    if t.train_iters is None and t.train_samples is None and t.train_tokens is None:
        t.train_iters = 1
    c.data.mock_data = True
    return c


def apply_layout(cfg: Config, lay: Candidate) -> Config:
    """A copy of `cfg` set to `lay` (`_plannable`)."""
    c = _plannable(cfg)
    p, m = c.parallel, c.model
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = lay.tp, lay.pp
    p.sequence_parallel, p.zero_stage, p.pipeline_model_parallel_split = lay.sp, lay.zero, lay.split
    p.num_layers_per_virtual_pipeline_stage = runtime.layers_per_virtual_stage(m.num_layers, lay.pp, lay.vp)
    m.recompute_granularity = lay.recompute
    m.recompute_num_layers = lay.recompute_num_layers if lay.recompute == "full" else None
    c.training.micro_batch_size = lay.mbs
    c.training.global_batch_size = lay.global_batch
    return c


def is_valid(cfg: Config, lay: Candidate) -> bool:
    """`gpt train` accepts `lay` (its config validates) and runs exactly `lay` (the runtime resolves that config
    back to it)."""
    return _refusal(apply_layout(cfg, lay), lay) is None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)   # the range the speed model was checked over (benchmarks/RESULTS.md)


def candidate(cfg: Config, world: int, tp: int, pp: int, vp: int, mbs: int) -> Optional[Candidate]:
    """The layout of `cfg` set to TP, PP, VP chunks per stage and micro-batch size `mbs` (global batch kept,
    no SP, recompute and ZeRO as in `cfg`) as the runtime resolves it, None when the runtime refuses it."""
    c = copy.copy(cfg)
    c.parallel, c.training = copy.copy(cfg.parallel), copy.copy(cfg.training)
    p = c.parallel
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel = tp, pp, False
    p.pipeline_model_parallel_split = None
    p.num_layers_per_virtual_pipeline_stage = (max(1, runtime.layers_per_virtual_stage(cfg.model.num_layers, pp, vp))
                                               if vp > 1 else None)
    c.training.micro_batch_size = mbs
    try:
        r = runtime.resolve(c, world)
    except ConfigError:
        return None
    return layout_of(c, world) if r.vp == vp else None


def enumerate_layouts(cfg: Config, world: int, gpus_per_node: int, *, micro_batch_sizes: Optional[Iterable] = None,
                      max_virtual: int = 8) -> list[Candidate]:
    """Every layout gpt3d accepts for this model and global batch on `world` GPUs among those the planner tries:
    TP a power of two inside a node, PP, 1 to `max_virtual` chunks per stage, micro-batch sizes
    (`MICRO_BATCH_SIZES` unless given), SP, recompute none/selective/full, ZeRO 0/1. Which of them gpt3d
    accepts is the runtime's verdict (`candidate`, `is_valid`)."""
    if not cfg.training.global_batch_size:
        raise ConfigError("the plan needs --global-batch-size (the batch the layouts must reproduce)")
    out = []
    for tp in [d for d in _divisors(min(world, gpus_per_node)) if d & (d - 1) == 0]:
        for pp in _divisors(world // tp):
            for mbs in micro_batch_sizes or MICRO_BATCH_SIZES:
                for vp in range(1, max_virtual + 1):
                    base = candidate(cfg, world, tp, pp, vp, mbs)
                    if base is None:
                        continue
                    for sp in ([False, True] if tp > 1 else [False]):
                        for rc in RECOMPUTE:
                            for zero in ([1, 0] if base.dp > 1 else [1]):
                                lay = Candidate(tp, pp, base.dp, mbs, base.num_micro, vp, sp, rc, zero)
                                if is_valid(cfg, lay):
                                    out.append(lay)
    return out
