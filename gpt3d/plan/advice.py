"""Advice before a run: does the same optimisation run faster another way that fits?

Why its own module: `gpt3d train` asks it once at start (on a GPU) and `--auto-tune-layout` applies its answer,
so what counts as "the same optimisation" is decided here, once. Only two knobs move, both invisible to what
is learned:

- **activation recompute** (none / selective / full): recompute replays the forward's dropout masks exactly
  (parallel/random.py), so the gradients are those of the run without it;
- **micro-batch size**, with the global batch held fixed (so fewer, larger micro-batches): the samples of
  every global batch and their order are the data sampler's, independent of how a step cuts them into
  micro-batches (docs/parallelism.md), and the step's loss and gradient are means over the same tokens.

Tensor, pipeline and data parallel sizes, sequence parallelism, interleaving and ZeRO stay as asked. What can
differ is float rounding, not the optimisation: gradient accumulation sums the micro-batches' gradients in
another grouping, a larger matmul may reduce in another order, and dropout draws other (equally random) masks,
since the masks follow the micro-batch's position in the step and in the tensor. A suggestion needs a
predicted gain of `MIN_GAIN` or more (the planner's tokens/s error on one GPU was -4.1% to +5.7%) and must be
predicted to fit in memory with `HEADROOM` to spare.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config import Config
from ..errors import ConfigError
from ..parallel.layout import resolve
from .layout import MICRO_BATCH_SIZES, RECOMPUTE, Candidate, apply_layout, is_valid, layout_of
from .presets import GIB, Gpu
from .search import Prediction, noted, predict_layout

MIN_GAIN = 1.05     # predicted tokens/s over the config's own layout before anything is suggested
HEADROOM = 0.95     # and a suggested layout's predicted peak within 95% of the usable memory (the planner's
                    # peak was -3.3% to +1.2% off on the H200 check): advice must not run out of memory


@dataclass
class Advice:
    current: Prediction
    better: Prediction
    flags: list            # the command-line flags that turn the current layout into the better one

    @property
    def gain(self) -> float:
        return self.better.tokens_per_s / self.current.tokens_per_s

    def line(self) -> str:
        b = self.better
        return (f"gpt3d plan: {' '.join(self.flags)} is predicted {self.gain:.2f}x faster "
                f"({b.tokens_per_s:,.0f} instead of {self.current.tokens_per_s:,.0f} tokens/s, "
                f"{b.peak_bytes / GIB:.1f} of {b.usable_bytes / GIB:.1f} GiB) with the same global batch, "
                "sample order and math; --auto-tune-layout applies it" + noted(self.current))

    def apply(self, cfg: Config) -> Config:
        """A copy of `cfg` with the better layout's recompute and micro-batch size (global batch kept)."""
        c = copy.deepcopy(cfg)
        lay, t = self.better.layout, c.training
        t.global_batch_size = self.current.layout.global_batch
        t.micro_batch_size = lay.mbs
        c.model.recompute_granularity = lay.recompute
        if lay.recompute != "full":
            c.model.recompute_num_layers = None
        return c


def candidates(cfg: Config, own: Candidate) -> list[Candidate]:
    """`own` with every recompute setting and each micro-batch size the planner tries (`gpt3d plan`'s)."""
    out = []
    for mbs in sorted(set(MICRO_BATCH_SIZES) | {own.mbs}):
        c = apply_layout(cfg, own)
        c.training.micro_batch_size = mbs   # the same global batch in micro-batches of `mbs`, if the runtime can
        try:
            num_micro = resolve(c, own.world).num_micro
        except ConfigError:
            continue
        for rc in RECOMPUTE:
            lay = dataclasses.replace(own, mbs=mbs, num_micro=num_micro, recompute=rc,
                                      recompute_num_layers=own.recompute_num_layers if rc == "full" else None)
            if lay != own and is_valid(cfg, lay):
                out.append(lay)
    return out


def _flags(cfg: Config, own: Candidate, lay: Candidate) -> list:
    flags = []
    if lay.recompute != own.recompute:
        flags += ["--recompute-granularity", lay.recompute or "none"]
    if lay.mbs != own.mbs:
        flags += ["--micro-batch-size", str(lay.mbs)]
        if not cfg.training.global_batch_size:   # the global batch followed the micro-batch size: pin it
            flags += ["--global-batch-size", str(own.global_batch)]
    return flags


def advise(cfg: Config, world: int, gpu: Gpu, gpus_per_node: int = 8, *,
           vocab_size: Optional[int] = None) -> Optional[Advice]:
    """The fastest layout of `candidates` that fits, when it beats the config's own by `MIN_GAIN`."""
    own = layout_of(cfg, world)
    if not is_valid(cfg, own):
        return None
    cache: dict = {}
    current = predict_layout(cfg, own, gpu, gpus_per_node, cache=cache, vocab_size=vocab_size)
    best: Optional[Prediction] = None
    for lay in candidates(cfg, own):
        p = predict_layout(cfg, lay, gpu, gpus_per_node, cache=cache, vocab_size=vocab_size)
        if p.peak_bytes <= HEADROOM * p.usable_bytes and (best is None or p.tokens_per_s > best.tokens_per_s):
            best = p
    if best is None or best.tokens_per_s < MIN_GAIN * current.tokens_per_s:
        return None
    return Advice(current, best, _flags(cfg, own, best.layout))
