"""What gpt3d knows about each parameter beyond its tensor: how tensor parallelism splits it, how it is
initialised, whether its gradient is partial per TP rank, whether it is (a copy of) the tied embedding, and
whether backward adds its gradient into the gradient buffer itself.

Why its own module: init, gradient sync, clipping, the optimizer's shards and checkpoints all read this, so it
is one typed record (`ParamMeta`) set when the layer creates the parameter and read through one accessor
(`param_meta`), instead of loose attributes probed with getattr/hasattr. A parameter nobody described (a plain
torch module in a test) reads as replicated, with no flags and no declared init.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, TypeVar

import torch

_ATTR = "gpt3d_meta"


@dataclass(frozen=True)
class ParamMeta:
    split_dim: Optional[int] = None       # the dimension tensor parallelism splits; None: replicated across TP
    init: Optional[tuple] = None          # ("normal", std) | ("zeros",) | ("ones",), applied to the full tensor;
                                          # None: undeclared, which init_parameters refuses (never a silent zero)
    sequence_parallel: bool = False       # gradient partial per TP rank (saw only its tokens): summed over TP
    tied_to: Optional[str] = None         # the last stage's copy of this global parameter (the tied embedding)
    shared_embedding: bool = False        # the word embedding that the output head reuses (tied models)
    fuses_wgrad: bool = False             # its linear's backward adds its gradient into `main_grad` itself, where
                                          # it has one (model/grad_accumulation.py)

    @property
    def tied_across_stages(self) -> bool:
        """The first stage's embedding or the last stage's copy of it: summed over the pipeline's ends."""
        return self.shared_embedding or self.tied_to is not None


_PLAIN = ParamMeta()


def param_meta(p: torch.Tensor) -> ParamMeta:
    """The parameter's metadata (replicated and unflagged if none was set)."""
    return getattr(p, _ATTR, _PLAIN)


T = TypeVar("T", bound=torch.Tensor)


def set_meta(p: T, **fields) -> T:
    """Set some of `p`'s metadata fields (the others keep their values); returns `p`."""
    setattr(p, _ATTR, dataclasses.replace(param_meta(p), **fields))
    return p
