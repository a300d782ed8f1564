"""One candidate parallel layout, and every valid one for a model, batch and cluster.

Why a separate module: the memory and time models take a `Layout`, the search
makes them, and validity is decided by gpt3d's own `Config.validate` (the rule
`gpt3d train` applies), so the planner never proposes a layout training refuses.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from ..config import Config
from ..errors import ConfigError
from ..parallel.pipeline import stage_layers

RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Layout:
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
    def zero_effective(self) -> int:
        return self.zero if self.dp > 1 else 0

    def label(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}" + (f"x{self.vp}v" if self.vp > 1 else ""), f"DP{self.dp}",
                 f"mb{self.mbs}x{self.num_micro}"]
        if self.sp:
            parts.append("SP")
        parts.append({None: "no-recompute", "selective": "selective", "full": "full-recompute"}[self.recompute])
        parts.append(f"ZeRO{self.zero_effective}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)

    def stage_chunks(self, num_layers: int, pp_rank: int) -> list[list[int]]:
        """Global layer ids of each model chunk on stage `pp_rank` (gpt3d's own assignment)."""
        per_chunk = num_layers // (self.pp * self.vp) if self.vp > 1 else None
        return stage_layers(num_layers, self.pp, pp_rank, self.split, per_chunk)


def layout_of(cfg: Config, world: int) -> Layout:
    """The layout a config asks for at `world` GPUs."""
    p, t, m = cfg.parallel, cfg.training, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by TP x PP = {tp} x {pp}")
    dp = world // (tp * pp)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    vp = m.num_layers // (p.num_layers_per_virtual_pipeline_stage * pp) if p.num_layers_per_virtual_pipeline_stage \
        else 1
    return Layout(tp=tp, pp=pp, dp=dp, mbs=t.micro_batch_size, num_micro=max(1, gbs // (t.micro_batch_size * dp)),
                  vp=vp, sp=p.sequence_parallel and tp > 1, recompute=m.recompute_granularity, zero=p.zero_stage,
                  split=p.pipeline_model_parallel_split, recompute_num_layers=m.recompute_num_layers)


def apply_layout(cfg: Config, lay: Layout) -> Config:
    """A copy of `cfg` set to `lay` (data settings made irrelevant: the plan reads no files)."""
    c = copy.copy(cfg)   # only the sections changed here are copied (cheap: the search calls this per layout)
    c.parallel, c.model, c.training, c.data = (copy.copy(s) for s in (cfg.parallel, cfg.model, cfg.training,
                                                                        cfg.data))
    p, m = c.parallel, c.model
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = lay.tp, lay.pp
    p.sequence_parallel, p.zero_stage, p.pipeline_model_parallel_split = lay.sp, lay.zero, lay.split
    p.num_layers_per_virtual_pipeline_stage = m.num_layers // (lay.pp * lay.vp) if lay.vp > 1 else None
    m.recompute_granularity = lay.recompute
    m.recompute_num_layers = lay.recompute_num_layers if lay.recompute == "full" else None
    c.training.micro_batch_size = lay.mbs
    c.training.global_batch_size = lay.mbs * lay.num_micro * lay.dp
    if c.training.train_iters is None and c.training.train_tokens is None:
        c.training.train_iters = 1
    c.data.mock_data = True
    return c


def is_valid(cfg: Config, lay: Layout) -> bool:
    try:
        apply_layout(cfg, lay).validate(lay.world)
    except ConfigError:
        return False
    return True


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_micro_batch_sizes(per_replica: int) -> list[int]:
    """The micro-batch sizes the planner tries: powers of two up to 16 that divide the per-replica batch (the
    range its speed model was checked over, benchmarks/RESULTS.md)."""
    return [b for b in _divisors(per_replica) if b <= 16 and b & (b - 1) == 0]


def enumerate_layouts(cfg: Config, world: int, gpus_per_node: int, *, micro_batch_sizes: Optional[Iterable] = None,
                      max_virtual: int = 8) -> list[Layout]:
    """Every layout gpt3d accepts for this model and global batch on `world` GPUs: TP inside a node (a power of
    two dividing the heads), PP dividing the layers, interleaving, micro-batch sizes dividing the per-replica
    batch, SP, recompute none/selective/full, ZeRO 0/1."""
    m, gbs = cfg.model, cfg.training.global_batch_size
    if not gbs:
        raise ConfigError("the plan needs --global-batch-size (the batch the layouts must reproduce)")
    out = []
    for tp in [d for d in _divisors(min(world, gpus_per_node)) if d & (d - 1) == 0]:
        for pp in _divisors(world // tp):
            if m.num_layers % pp:
                continue
            dp = world // (tp * pp)
            if gbs % dp:
                continue
            per_replica = gbs // dp
            sizes = micro_batch_sizes or default_micro_batch_sizes(per_replica)
            vps = [1] + [v for v in range(2, max_virtual + 1) if pp > 1 and m.num_layers % (pp * v) == 0]
            for mbs in sizes:
                if per_replica % mbs:
                    continue
                num_micro = per_replica // mbs
                for vp in vps:
                    if vp > 1 and num_micro % pp:
                        continue
                    for sp in ([False, True] if tp > 1 else [False]):
                        for rc in RECOMPUTE:
                            for zero in ([1, 0] if dp > 1 else [1]):
                                lay = Layout(tp, pp, dp, mbs, num_micro, vp, sp, rc, zero)
                                if is_valid(cfg, lay):
                                    out.append(lay)
    return out
