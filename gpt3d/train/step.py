"""One training step and one evaluation pass, and the counters they advance.

`TrainStep` is what `train` and `bench` run: forward/backward of every micro-batch through the pipeline
schedule, gradient sync, clip and optimizer step, with no host synchronisation: a step with
non-finite gradients is skipped by the AdamW step from the device flag `found_inf`, and fp16's loss scale
is updated from the same flag on the device (optim/grad_scaler.py).
It hands its outcome back as a `StepResult` (device tensors, read when the loop chooses to) instead of
deciding anything itself: when to stop and what to print belong to stop.py and report.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..config import Config
from ..model.attention import sdpa_backend_context
from ..model.build import ModelChunks, compile_enabled, param_dtype
from ..model.fp8_weights import fp8_weights, held_casts, holds_casts, weight_caster
from ..optim.grad_buffer import GradBuffer
from ..optim.grad_scaler import DynamicLossScaler
from ..optim.lr_schedule import LRSchedule
from ..optim.zero import ZeroOptimizer
from ..parallel.pipeline import forward_backward
from ..parallel.precision import upcast
from ..parallel.state import ParallelState


@dataclass
class TrainState:
    """Where training stands: what a resumed run continues from.

    `consumed_samples` is the position in the data stream's sample order; `tokens` counts every token trained
    on since the start. They are separate counters: a resume that changes the stream (--override-data-state,
    e.g. another --seq-length) keeps both, so the token count never goes backwards."""
    seq_length: int
    iteration: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    data_state: Optional[dict] = None   # the settings the samples are drawn with (gpt3d/data/stream.py)

    def advance(self, global_batch: int) -> None:
        self.iteration += 1
        self.consumed_samples += global_batch
        self.tokens += global_batch * self.seq_length

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples, "tokens": self.tokens,
                "data_state": self.data_state}

    def load_state_dict(self, state: dict) -> None:
        """The counters; the run's own data_state stays (the trainer compares the saved one with it)."""
        self.iteration, self.consumed_samples = state["iteration"], state["consumed_samples"]
        self.tokens = state.get("tokens", self.consumed_samples * self.seq_length)


@dataclass
class StepResult:
    """One optimizer step's outcome; tensors stay on the device until someone reads them."""
    loss: Optional[torch.Tensor]         # mean loss over the micro-batches (last stage; None elsewhere)
    grad_norm: torch.Tensor              # [1] global gradient norm before clipping
    lr: float                            # the learning rate the step used
    skipped: torch.Tensor                # [1] 1.0: non-finite gradients somewhere, no rank updated
    non_finite: torch.Tensor             # [1] 1.0: a non-finite step that counts toward stopping the run
                                         #     (fp16: only once the loss scale is at its minimum)
    loss_scale: Optional[torch.Tensor]   # fp16: the loss scale after this step's update


def gpt_forward_step(chunk: nn.Module, micro_batch: dict, x: Optional[torch.Tensor]):
    """The pipeline's view of a GPT chunk: the first reads tokens, the last returns the mean token loss."""
    out = chunk(micro_batch["tokens"] if chunk.pre_process else None,
                micro_batch["labels"] if chunk.post_process else None, hidden=x)
    return (None, upcast(out).mean()) if chunk.post_process else (out, None)


class TrainStep:
    def __init__(self, cfg: Config, ps: ParallelState, model: ModelChunks, grads: GradBuffer,
                 optimizer: ZeroOptimizer, schedule: LRSchedule, scaler: Optional[DynamicLossScaler],
                 state: TrainState, global_batch: int):
        self.cfg, self.ps, self.model, self.grads, self.optimizer = cfg, ps, model, grads, optimizer
        self.schedule, self.scaler, self.state, self.global_batch = schedule, scaler, state, global_batch
        m = cfg.model
        s = m.seq_length // ps.tp if ps.sp else m.seq_length
        self.hidden_shape = (cfg.training.micro_batch_size, s, m.hidden_size)   # sent between stages
        self.dtype = param_dtype(cfg.precision)
        self.chunks = list(model)
        self.fp8_weights = fp8_weights(mod for c in self.chunks for mod in c.modules())
        self.fp8_cast = weight_caster(compile_enabled(cfg.training, ps.device))

    def _attention_kernels(self):
        """The SDPA kernel choice, entered outside any compiled region so the trace bakes it in."""
        return sdpa_backend_context(self.cfg.model.attention_backend, self.ps.device)

    def _fp8_weights_once(self, forwards: int, recompute: Optional[str], training: bool = True):
        """The FP8 weights cast once for all `forwards` inside where that saves casts (model/fp8_weights.py;
        `training`: with the transposed copies backward reads); nothing to do without tensorwise FP8."""
        if not self.fp8_weights or not holds_casts(forwards, recompute):
            return contextlib.nullcontext()
        return held_casts(self.fp8_weights, self.fp8_cast, transposes=training)

    def _forward_backward(self, microbatches: list[dict], forward_only: bool,
                          loss_scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        return forward_backward(self.chunks, microbatches, self.ps, forward_step=gpt_forward_step,
                                forward_only=forward_only, loss_scale=loss_scale, no_sync=self.grads.no_sync,
                                hidden_shape=self.hidden_shape, dtype=self.dtype,
                                sum_gradients=self.cfg.optimizer.micro_batch_gradients == "sum")

    def __call__(self, microbatches: list[dict]) -> StepResult:
        """Forward/backward all micro-batches, sync grads, clip, step; advances the TrainState."""
        self.model.train()
        self.grads.zero_grad()
        scale = self.scaler.scale if self.scaler else None
        with self._attention_kernels(), self._fp8_weights_once(len(microbatches),
                                                               self.cfg.model.recompute_granularity):
            loss = self._forward_backward(microbatches, forward_only=False, loss_scale=scale)
        self.grads.finish_grad_sync()
        lr = self.schedule.lr(self.state.iteration, self.state.tokens)
        norm, found_inf = self.optimizer.step(lr, scale)
        non_finite = self._non_finite(loss, scale, found_inf)
        if self.scaler:
            self.scaler.update(found_inf)   # on the device: the scale is read only when logged or saved
        self.state.advance(self.global_batch)
        return StepResult(loss, norm, lr, found_inf, non_finite, self.scaler.scale if self.scaler else None)

    def _non_finite(self, loss: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    found_inf: torch.Tensor) -> torch.Tensor:
        """On the device (no host sync). fp16 overflows are routine while the scale settles, so they count
        only at the minimum scale; otherwise a non-finite loss counts too."""
        bad = found_inf.reshape(1).float()
        if scale is not None:
            bad = bad * (scale <= self.cfg.precision.min_loss_scale).float()
        elif loss is not None:
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach().float())).float().reshape(1))
        return bad

    @torch.no_grad()
    def evaluate(self, batches: Iterable[list[dict]], forwards: int = 1) -> Optional[torch.Tensor]:
        """Mean loss over `batches` (each a global batch's micro-batches; `forwards` of them in all) on the last
        stage, None elsewhere."""
        self.model.train(False)
        total, n = torch.zeros(1, device=self.ps.device), 0
        with self._attention_kernels(), self._fp8_weights_once(forwards, None, training=False):
            for microbatches in batches:
                loss = self._forward_backward(microbatches, forward_only=True)
                if loss is not None:
                    total += loss
                n += 1
        return total / n if self.ps.is_last_stage else None
