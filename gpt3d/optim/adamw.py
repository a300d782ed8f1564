"""AdamW over a rank's whole optimizer shard as flat buffers, in one pass that also writes the half-precision
parameters.

Why not torch's fused AdamW: it steps a list of tensors and, given a gradient scale (gpt3d's clip and fp16
loss scale ride in it), writes every unscaled gradient back; copying the fp32 masters into the bf16 parameters
is then a pass of its own. At 1.3B on one H100 the optimizer took ~21.6 ms a step (benchmarks/RESULTS.md,
2026-12-06), ~9% of an FP8 step, where the bytes a step must move (read gradient, master and both moments;
write master, moments and the bf16 parameter) take ~13 ms. Here masters and moments are flat buffers in
piece order and one kernel (gpt3d/optim/adamw_triton.py, on CUDA) steps every piece in fixed-size blocks,
reading the gradient from the gradient buffer (or, with direct gradients, from each piece's own gradient) and
writing the parameter straight into the parameter buffer.

`reference_step` is the specification and the implementation wherever Triton is absent (CPU: the tests).
It is torch's fused AdamW's arithmetic: divide the gradient by the scale; decoupled decay p -= lr * wd * p
(or Adam's L2 penalty g += wd * p); m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps); the bias corrections from each piece's own step count, the
decay, the moments and the denominator in float64 as torch's CUDA kernel has them, each rounded to the
masters' precision; a step with `found_inf` set changes nothing, counts included, without a host sync. Each
operation is rounded on its own (the Triton kernel fuses no multiply-adds), so kernel and reference agree bit
for bit; torch's kernel, compiled with contractions, differs from both in the last place of a few percent of
the elements. Unlike torch's, it leaves the gradients as they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..triton_kernels import triton_kernels


Grads = Union[torch.Tensor, list[torch.Tensor]]   # a gradient buffer, or one flat gradient per piece


@dataclass(frozen=True)
class Piece:
    """One parameter range this rank steps: its gradient (and parameter) buffer offset, its place in the flat
    optimizer buffers, its length and whether weight decay applies."""
    offset: int
    flat: int
    numel: int
    decay: bool


class FlatAdamW:
    """Masters, moments and step counts of `pieces` (in buffer order), stepped from a gradient buffer or from
    one gradient per piece.

    With `separate_master` (half-precision parameters) the fp32 masters are a flat buffer of their own and a
    step writes the rounded parameters into `param_data`; otherwise the parameters in `param_data` are the
    masters."""

    def __init__(self, pieces: list[Piece], param_data: torch.Tensor, state_dtype: torch.dtype,
                 separate_master: bool, betas: tuple[float, float], eps: float, weight_decay: float,
                 decoupled_weight_decay: bool):
        if weight_decay == 0:   # no decay anywhere: the kernel then skips it as the reference does
            pieces = [Piece(p.offset, p.flat, p.numel, False) for p in pieces]
        self.pieces, self.param_data, self.separate_master = pieces, param_data, separate_master
        self.betas, self.eps, self.weight_decay, self.decoupled = betas, eps, weight_decay, decoupled_weight_decay
        n, dev = sum(p.numel for p in pieces), param_data.device
        self.master = torch.empty(n if separate_master else 0, dtype=state_dtype, device=dev)
        for p in pieces:
            if separate_master:
                self.master[p.flat:p.flat + p.numel].copy_(param_data[p.offset:p.offset + p.numel])
        self.exp_avg = torch.zeros(n, dtype=state_dtype, device=dev)
        self.exp_avg_sq = torch.zeros(n, dtype=state_dtype, device=dev)
        self.steps = torch.zeros(len(pieces), dtype=torch.float32, device=dev)   # torch's per-tensor counts
        self.consts = torch.tensor([*betas, eps, weight_decay], dtype=torch.float64, device=dev)   # the kernel's
        self._kernel = _triton_step(dev, state_dtype)
        self._blocks: Optional[tuple] = None

    def master_view(self, i: int) -> torch.Tensor:
        p = self.pieces[i]
        return (self.master[p.flat:p.flat + p.numel] if self.separate_master
                else self.param_data[p.offset:p.offset + p.numel])

    def moments(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pieces[i]
        return self.exp_avg[p.flat:p.flat + p.numel], self.exp_avg_sq[p.flat:p.flat + p.numel]

    def step(self, grads: Grads, lr: float, grad_scale: Optional[torch.Tensor], found_inf: torch.Tensor) -> None:
        """One AdamW step of every piece from its gradient divided by `grad_scale` (a 0-d float32 tensor, or
        None); nothing changes where `found_inf` (0-d float32) is 1. `grads`: the gradient buffer, read at each
        piece's offset, or one flat gradient per piece in any float dtype (direct gradients, grad_buffer.py),
        converted to the masters' precision as they are read."""
        if not self.pieces:
            return
        if self._kernel is not None:
            if self._blocks is None:
                self._blocks = tuple(t.to(self.param_data.device) for t in block_table(self.pieces, self._kernel.BLOCK))
            self._kernel.step(self, self._blocks, grads, lr, grad_scale, found_inf)
        else:
            reference_step(self, grads, lr, grad_scale, found_inf)
        self.steps.add_(1.0 - found_inf)

    def state_bytes(self) -> int:
        """Bytes of the masters (if separate) and the Adam moments (the step counts aside)."""
        return sum(t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq))


def block_table(pieces: list[Piece], block: int) -> tuple[torch.Tensor, ...]:
    """The kernel's work list, one row per block of at most `block` elements of one piece (pieces cut in
    order): (buffer offset, flat offset) of its first element, its length, its piece's index, its decay flag,
    and its first element's offset within the piece (where a direct gradient is read)."""
    numel = torch.tensor([pc.numel for pc in pieces], dtype=torch.int64)
    count = (numel + block - 1) // block
    piece = torch.repeat_interleave(torch.arange(len(pieces)), count)
    start = (torch.arange(int(count.sum())) - torch.repeat_interleave(count.cumsum(0) - count, count)) * block
    offset = torch.tensor([pc.offset for pc in pieces], dtype=torch.int64)[piece] + start
    flat = torch.tensor([pc.flat for pc in pieces], dtype=torch.int64)[piece] + start
    n = torch.clamp(numel[piece] - start, max=block)
    decay = torch.tensor([int(pc.decay) for pc in pieces], dtype=torch.int32)[piece]
    return offset, flat, n.to(torch.int32), piece.to(torch.int32), decay, start


def bias_corrections(steps: torch.Tensor, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - b1^t, sqrt(1 - b2^t)) in float64 for each piece's next step t."""
    t = steps.double() + 1
    return 1 - betas[0] ** t, (1 - betas[1] ** t).sqrt()


def reference_step(opt: FlatAdamW, grads: Grads, lr: float, grad_scale: Optional[torch.Tensor],
                   found_inf: torch.Tensor) -> None:
    """The step, piece by piece with torch operations: torch's fused CUDA AdamW, which computes the decay,
    the moments and the denominator in float64 and rounds each to the masters' precision."""
    b1, b2 = opt.betas
    bc1, bc2_sqrt = bias_corrections(opt.steps, opt.betas)
    skip = found_inf.reshape(()) != 0
    for i, pc in enumerate(opt.pieces):
        p, (m, v) = opt.master_view(i), opt.moments(i)
        dt = p.dtype
        g = (grads[i] if isinstance(grads, list) else grads[pc.offset:pc.offset + pc.numel]).to(dt)
        if grad_scale is not None:
            g = g / grad_scale.to(dt)
        q = p
        if pc.decay:
            if opt.decoupled:
                q = (q.double() - lr * opt.weight_decay * q.double()).to(dt)
            else:
                g = (g.double() + q.double() * opt.weight_decay).to(dt)
        g64 = g.double()
        m_new = (b1 * m.double() + (1 - b1) * g64).to(dt)
        v_new = (b2 * v.double() + (1 - b2) * g64 * g64).to(dt)
        step_size = (lr / bc1[i].to(dt).double()).to(dt)
        denom = ((v_new.sqrt() / bc2_sqrt[i].to(dt)).double() + opt.eps).to(dt)
        q = q - step_size * m_new / denom
        for t, new in ((p, q), (m, m_new), (v, v_new)):
            t.copy_(torch.where(skip, t, new))
        if opt.separate_master:
            out = opt.param_data[pc.offset:pc.offset + pc.numel]
            out.copy_(torch.where(skip, out, q.to(out.dtype)))


def _triton_step(device: torch.device, dtype: torch.dtype):
    """The Triton kernel's module where it serves (CUDA, fp32 state, Triton installed); else None."""
    if device.type != "cuda" or dtype != torch.float32:
        return None
    return triton_kernels(".adamw_triton", __package__)
