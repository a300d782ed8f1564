"""What a training run tells the user: log lines, metrics files, TensorBoard, the plot at the end.

The `Reporter` owns the timing window (throughput and ETA time training steps only), the running loss of
the window (averaged over DP when printed), and the sinks, which write on the logging rank only (last
stage, first TP/DP rank). It reads step results as they come; nothing here decides how training goes.

Megatron-DeepSpeed's optional TensorBoard scalars (--log-timers/batch-size/validation-ppl/optimizer-states-
to-tensorboard) are extra tags under Megatron's names, so dashboards built for its runs read gpt3d runs too.
The optimizer-state statistics are a collective over the ranks holding optimizer state, so they are computed
in `Reporter.step`, which every rank calls; only the logging rank writes them.

A step's device tensors (loss, grad norm, fp16 loss scale) are brought to the host only for a log line,
so the steps in between never wait for the device.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import FileError, warn
from ..metrics import Throughput
from ..parallel.state import ParallelState
from ..plan.search import Prediction, measured_line, startup_line
from .step import StepResult, TrainState


def dp_mean(value: torch.Tensor, ps: ParallelState) -> Optional[float]:
    """A last-stage scalar averaged over DP (a collective of the last stage's DP group); None elsewhere."""
    if not ps.is_last_stage:
        return None
    if ps.dp > 1:
        dist.all_reduce(value, group=ps.dp_group)
        value = value / ps.dp
    return float(value.item())


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def refuse_unwritable(flag: str, path: str, directory: bool = False) -> None:
    """Raise FileError now if `path` clearly cannot be created (a file in the way, a file where a directory
    should be, a read-only parent), creating nothing: a run fails at start rather than after loading."""
    p = os.path.abspath(path)
    if os.path.exists(p):
        if os.path.isdir(p) != directory:
            raise FileError(f"{flag} {path} is {'not ' if directory else ''}a directory")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FileError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"{flag} {path}: {parent} is not writable")


class MetricsLogger:
    """Console, JSON lines and TensorBoard; writes only on the logging rank, a no-op elsewhere.

    The files are opened by `open`, once the run is accepted (its --save lock taken, the checkpoint and data
    stream checked): a refused run creates no metrics file or TensorBoard directory. Their paths are checked
    here, creating nothing."""

    def __init__(self, enabled: bool, log_file: Optional[str], tensorboard_dir: Optional[str],
                 tensorboard_queue_size: int = 10):
        self.enabled = enabled
        self.fh = None
        self.tb = None
        self._paths = (log_file, tensorboard_dir, tensorboard_queue_size)
        if enabled and log_file:
            refuse_unwritable("--log-file", log_file)
        if enabled and tensorboard_dir:
            refuse_unwritable("--tensorboard-dir", tensorboard_dir, directory=True)

    def open(self) -> None:
        """Open (create) the metrics file and TensorBoard directory; idempotent."""
        log_file, tensorboard_dir, queue = self._paths
        if not self.enabled:
            return
        if log_file and self.fh is None:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            self.fh = open(log_file, "a", buffering=1)
        if tensorboard_dir and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(tensorboard_dir, max_queue=queue)

    def start_run(self, iteration: int, tokens: int, settings: dict) -> None:
        """Mark where this run's rows begin, so a reused --log-file keeps its runs apart (`gpt3d plot` draws the
        last run: a fresh start hides the rows before it, a resume keeps the history up to its checkpoint)."""
        self.open()
        if self.fh:
            self.fh.write(json.dumps({"run_start": datetime.datetime.now().isoformat(timespec="seconds"),
                                      "iteration": iteration, "tokens": tokens, "settings": settings}) + "\n")

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.fh:
            self.fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.tb:
            step = row.get("tokens", row.get("iteration", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "tokens"):
                    self.tb.add_scalar(k, v, row.get("iteration", 0))
            if "loss" in row:
                self.tb.add_scalar("loss_vs_tokens", row["loss"], step)

    def scalars(self, values: dict, step: int) -> None:
        """TensorBoard only, under the given tags (Megatron's optional scalars)."""
        if self.enabled and self.tb:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


_SUMS = ("variance_l2", "variance_sqrt_l2", "momentum_l2", "weight_l2",
         "variance_l1", "variance_sqrt_l1", "momentum_l1", "weight_l1")
_MAXES = ("variance_abs_max", "variance_sqrt_abs_max", "momentum_abs_max", "weight_abs_max")


def optimizer_state_stats(pieces: dict, ps: ParallelState, sharded: bool) -> dict:
    """L2/L1 norms and max |x| of Adam's exp_avg_sq, its sqrt, exp_avg and the fp32 weights, over the model.

    `pieces` is ShardedOptimizer.state_dict()["pieces"] of this rank. Summed as Megatron-DeepSpeed sums
    them: over every rank when ZeRO shards the state (`sharded`), else over the tensor/pipeline ranks (DP
    replicas hold copies). A parameter replicated across tensor ranks (norms, row-parallel biases) counts
    once per rank there too. A collective: call on every rank."""
    sums = torch.zeros(8, dtype=torch.float64, device=ps.device)
    maxes = torch.zeros(4, dtype=torch.float64, device=ps.device)
    for entry in pieces.values():
        v, m, w = entry["exp_avg_sq"].float(), entry["exp_avg"].float(), entry["master"].float()
        for j, x in enumerate((v, v.sqrt(), m, w)):
            sums[j] += x.pow(2).sum().double()
            sums[4 + j] += x.abs().sum().double()
            if x.numel():
                maxes[j] = torch.maximum(maxes[j], x.abs().max().double())
    if ps.distributed and (sharded or ps.tp * ps.pp > 1):
        group = None if sharded else ps.mp_group
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sums[:4] = sums[:4].sqrt()
    out = {f"optimizer/{k}": float(x) for k, x in zip(_SUMS, sums.tolist())}
    out.update({f"optimizer/{k}": float(x) for k, x in zip(_MAXES, maxes.tolist())})
    return out


class Reporter:
    def __init__(self, cfg: TrainingConfig, ps: ParallelState, throughput: Throughput, train_iters: int,
                 global_batch: int, optimizer=None, sharded_state: bool = False,
                 plan: Optional[Prediction] = None):
        """`optimizer` (anything with state_dict() as ShardedOptimizer's) is read only for
        --log-optimizer-states-to-tensorboard; `sharded_state`: ZeRO splits its state over all ranks;
        `plan`: `gpt3d plan`'s prediction for this run (GPU runs), printed beside the measured figures."""
        self.cfg, self.ps, self.throughput, self.train_iters = cfg, ps, throughput, train_iters
        self.global_batch, self.optimizer, self.sharded_state = global_batch, optimizer, sharded_state
        self.plan, self.lines = plan, 0            # train log lines written by this run
        self.log = MetricsLogger(ps.is_logging_rank, cfg.log_file, cfg.tensorboard_dir, cfg.tensorboard_queue_size)
        self.loss_sum, self.loss_n = torch.zeros(1, device=ps.device), 0
        self.window = (time.perf_counter(), 0)     # (start time, iteration) of the timing window

    def console(self, text: str) -> None:
        self.log.console(text)

    def run_start(self, state: TrainState, settings: dict) -> None:
        """The run is accepted: open the sinks and write the metrics file's marker for a run starting (or
        resuming) at `state` with these non-default settings."""
        self.log.start_run(state.iteration, state.tokens, settings)

    def prediction(self) -> None:
        """The planner's memory and speed for this layout, printed before the first step (GPU runs)."""
        if self.plan is not None:
            self.log.console(startup_line(self.plan))

    def start(self, iteration: int) -> None:
        """Open the timing window at `iteration`."""
        self.window = (time.perf_counter(), iteration)

    @contextlib.contextmanager
    def untimed(self, state: TrainState) -> Iterator[None]:
        """Validation and checkpoint saves inside are left out of the throughput: the window restarts after
        them (the steps since the last log line go too, as their device work may still be in flight)."""
        try:
            yield
        finally:
            self.start(state.iteration)

    def step(self, result: StepResult, state: TrainState) -> None:
        """Count a finished step; every --log-interval iterations (and at the last) print and record it.
        Every rank calls this: the log line costs a device sync and the loss a DP all-reduce."""
        if result.loss is not None:
            self.loss_sum += result.loss
            self.loss_n += 1
        it = state.iteration
        if it % self.cfg.log_interval and it != self.train_iters:
            return
        if self.ps.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        per_iter = (now - self.window[0]) / max(1, it - self.window[1])
        self.window = (now, it)
        loss = dp_mean(self.loss_sum / max(self.loss_n, 1), self.ps)
        self.loss_sum.zero_()
        self.loss_n = 0
        self._train_row(result, state, loss, float(result.grad_norm.item()), per_iter)
        self.log.scalars(self._extra_scalars(per_iter), it)

    def _extra_scalars(self, per_iter: float) -> dict:
        """Megatron's optional TensorBoard tags for a log step; collective when optimizer states are asked for."""
        out = {}
        if self.cfg.log_timers_to_tensorboard:
            out["iteration-time/iteration-time"] = per_iter
        if self.cfg.log_batch_size_to_tensorboard:
            out["batch-size/batch-size"] = float(self.global_batch)
        if self.cfg.log_optimizer_states_to_tensorboard and self.optimizer is not None:
            out.update(optimizer_state_stats(self.optimizer.state_dict()["pieces"], self.ps, self.sharded_state))
        return out

    def _train_row(self, result: StepResult, state: TrainState, loss: Optional[float], grad_norm: float,
                   per_iter: float) -> None:
        if not self.log.enabled:
            return
        tp = self.throughput.report(per_iter)
        eta = (self.train_iters - state.iteration) * per_iter
        row = {"iteration": state.iteration, "tokens": state.tokens, "loss": loss, "lr": result.lr,
               "grad_norm": grad_norm, **tp, "seconds_per_iter": per_iter}
        if result.loss_scale is not None:
            row["loss_scale"] = float(result.loss_scale.item())
        self.log.record(row)
        self.lines += 1
        if self.plan is not None and self.lines == 2:   # this run's second log line: past compilation
            peak = torch.cuda.max_memory_allocated(self.ps.device)
            self.log.console(measured_line(self.plan, tp["tokens_per_s"], peak))
        self.log.console(
            f"iter {state.iteration:>6}/{self.train_iters} | loss {loss:.4f} | lr {result.lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tp['tokens_per_s']:,.0f} tok/s | "
            f"{tp['tflops_per_gpu']:.1f} TFLOPs/GPU (6N: {tp['tflops_per_gpu_6n']:.1f}) | MFU {tp['mfu']:.1%} | "
            f"{per_iter * 1000:.0f} ms/it | ETA {fmt_duration(eta)}"
            + (f" | loss scale {row['loss_scale']:.0f}" if "loss_scale" in row else ""))

    def validation(self, val: Optional[float], state: TrainState) -> None:
        if val is None or not self.log.enabled:
            return
        ppl = math.exp(min(val, 30.0))
        self.log.record({"iteration": state.iteration, "tokens": state.tokens, "val_loss": val, "val_ppl": ppl})
        self.log.console(f"validation at iteration {state.iteration} | loss {val:.4f} | ppl {ppl:.2f}")
        if self.cfg.log_validation_ppl_to_tensorboard:
            self.log.scalars({"lm-loss-validation/lm loss validation ppl": ppl}, state.iteration)

    def close(self) -> None:
        """Close the sinks and draw `<log-file stem>.png` beside the metrics: a plotting problem warns, it never
        fails a finished run."""
        self.log.close()
        log_file = self.cfg.log_file
        if not (self.log.enabled and log_file):
            return
        try:
            from ..plot import plot_runs
            plot_runs([log_file], os.path.splitext(log_file)[0] + ".png")
        except Exception as e:  # noqa: BLE001 - matplotlib, fonts, disk: none of it may cost the run
            warn(f"could not plot {log_file}: {e}")
