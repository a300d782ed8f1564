"""What a training run tells the user: log lines, metrics files, TensorBoard, W&B, the plot at the end.

The `Reporter` owns the timing window (throughput and ETA time training steps only), the running loss of
the window (averaged over DP when printed), and the sinks, which write on the logging rank only (last
stage, first TP/DP rank). It reads step results as they come; nothing here decides how training goes.

Megatron-DeepSpeed's optional TensorBoard scalars (--log-timers/batch-size/validation-ppl/optimizer-states-
to-tensorboard) are extra tags under Megatron's names, so dashboards built for its runs read gpt3d runs too.
The optimizer-state statistics are a collective over the ranks holding optimizer state, so they are computed
in `Reporter.step`, which every rank calls; only the logging rank writes them.

Where things go: the metrics file is the run directory's metrics.jsonl unless --log-file names one (the
directory is claimed when the run is accepted, see rundir.py), with its curves drawn beside it at the end;
TensorBoard and Weights & Biases get the same scalars from one place (`MetricsLogger._scalars`). CPU runs'
console lines leave out TFLOPs/GPU and MFU (figures of a GPU's peak); the JSON lines keep every field.

A step's device tensors (loss, grad norm, fp16 loss scale) are brought to the host only for a log line,
so the steps in between never wait for the device.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import time
from typing import IO, Any, Optional
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..config import TrainingConfig
from ..errors import ConfigError, FileError, warn
from ..perf.throughput import Throughput
from ..parallel.state import ParallelState
from ..plan.search import Prediction, measured_line, startup_line
from ..console.progress import fmt_duration
from ..console.quiet import quiet_imports
from . import rundir
from .step import StepResult, TrainState


def dp_mean(value: torch.Tensor, ps: ParallelState) -> Optional[float]:
    """A last-stage scalar averaged over DP (a collective of the last stage's DP group); None elsewhere."""
    if not ps.is_last_stage:
        return None
    if ps.dp > 1:
        dist.all_reduce(value, group=ps.dp_group)
        value = value / ps.dp
    return float(value.item())


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


class WandbSink:
    """Weights & Biases beside TensorBoard (Megatron-LM's --wandb-project/--wandb-exp-name/--wandb-save-dir):
    the same scalars under the same tags, at the same iteration; `loss_vs_tokens` (TensorBoard's x axis is
    tokens there) is logged with a `tokens` value and W&B told to plot it against that. An optional extra:
    without wandb installed the flag is one error line naming the extra, before any work."""

    MISSING = "--wandb-project needs Weights & Biases: pip install -e \".[wandb]\""
    FORBIDDEN = "/\\#?%:"   # characters W&B refuses in a project name

    def __init__(self, t: TrainingConfig):
        bad = sorted(set(t.wandb_project or "") & set(self.FORBIDDEN))
        if bad or not (t.wandb_project or "").strip():
            raise ConfigError(f"--wandb-project {t.wandb_project!r}: a W&B project name is not empty and holds none "
                              f"of {' '.join(self.FORBIDDEN)}")
        try:
            with quiet_imports():
                import wandb
        except ImportError:
            raise ConfigError(self.MISSING) from None
        self.wandb, self.t = wandb, t
        self.run: Any = None

    @classmethod
    def check_installed(cls) -> None:
        """On the ranks that do not log: the same verdict as the logging rank's import, without importing it."""
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(cls.MISSING)

    def open(self, run_dir: Optional[str], settings: dict) -> None:
        t = self.t
        save_dir = t.wandb_save_dir or run_dir or "."
        os.makedirs(save_dir, exist_ok=True)
        try:
            self.run = self.wandb.init(project=t.wandb_project, name=t.wandb_exp_name or os.path.basename(
                os.path.abspath(run_dir or save_dir)), dir=save_dir, config=settings,
                settings=self.wandb.Settings(console="off"))
        except self.wandb.errors.Error as e:   # e.g. no API key: `wandb login`, or WANDB_MODE=offline
            raise ConfigError(f"W&B could not start a run: {str(e).splitlines()[0]} (`wandb login`, or "
                              "WANDB_MODE=offline to keep the run on disk)") from None
        self.run.define_metric("tokens")
        self.run.define_metric("loss_vs_tokens", step_metric="tokens")

    def log(self, scalars: list) -> None:
        """(tag, value, iteration, tokens or None) as MetricsLogger._scalars gets them: W&B's step is the
        iteration, and a tag TensorBoard plots against tokens carries its `tokens`."""
        rows: dict = {}
        for tag, value, iteration, tokens in scalars:
            row = rows.setdefault(iteration, {})
            row[tag] = value
            if tokens is not None:
                row["tokens"] = tokens
        for step, row in rows.items():
            self.run.log(row, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MetricsLogger:
    """Console, JSON lines, TensorBoard and W&B; writes only on the logging rank, a no-op elsewhere.

    The files are opened by `open`, once the run is accepted (its --save lock taken, the checkpoint and data
    stream checked): a refused run creates no metrics file, run directory, TensorBoard directory or W&B run.
    Their paths are checked here, creating nothing."""

    def __init__(self, enabled: bool, t: TrainingConfig):
        self.enabled, self.t = enabled, t
        self.fh: Optional[IO[str]] = None
        self.tb: Any = None
        self.wandb: Optional[WandbSink] = None
        self.log_file: str = t.log_file or ""
        self.run_dir: Optional[str] = None
        if enabled and t.log_file:
            refuse_unwritable("--log-file", t.log_file)
        if enabled and t.tensorboard_dir:
            refuse_unwritable("--tensorboard-dir", t.tensorboard_dir, directory=True)
        root = rundir.planned_root(t)
        if enabled and root:
            refuse_unwritable("--run-dir" if t.run_dir else f"the runs directory (--run-dir, ${rundir.RUNS_ENV})",
                              root, directory=True)
        if t.wandb_project:   # every rank: a missing extra fails the whole job at start, not one rank of it
            if enabled:
                self.wandb = WandbSink(t)
            else:
                WandbSink.check_installed()

    def open(self, run_dir: Optional[str], settings: dict) -> None:
        """Open (create) the metrics file in `run_dir` (unless --log-file names one), TensorBoard, W&B; idempotent."""
        if not self.enabled or self.fh is not None:
            return
        self.run_dir = run_dir
        self.log_file = self.t.log_file or os.path.join(run_dir or ".", "metrics.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
        self.fh = open(self.log_file, "a", buffering=1)
        if self.t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.t.tensorboard_dir, max_queue=self.t.tensorboard_queue_size)
        if self.wandb is not None:
            self.wandb.open(run_dir, settings)

    def outputs(self) -> str:
        """Where this run's records go, for the start-up header."""
        png, w, tb = os.path.splitext(self.log_file)[0] + ".png", self.wandb, self.t.tensorboard_dir
        return " | ".join([f"metrics: {self.log_file}", f"curves: {png} (at the end)",
                           f"TensorBoard: {tb}" if self.tb else "TensorBoard: off (--tensorboard-dir)",
                           f"W&B: project {self.t.wandb_project}, files in {w.run.dir}" if w and w.run else
                           "W&B: off (--wandb-project)"])

    def start_run(self, iteration: int, tokens: int, settings: dict, run_dir: Optional[str]) -> None:
        """Mark where this run's rows begin, so a reused --log-file keeps its runs apart (`gpt3d plot` draws the
        last run: a fresh start hides the rows before it, a resume keeps the history up to its checkpoint)."""
        self.open(run_dir, settings)
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
        it = row.get("iteration", 0)
        scalars = [(k, v, it, None) for k, v in row.items()
                   if isinstance(v, (int, float)) and k not in ("iteration", "tokens")]
        if "loss" in row:
            scalars.append(("loss_vs_tokens", row["loss"], it, row.get("tokens", it)))
        self._scalars(scalars)

    def scalars(self, values: dict, step: int) -> None:
        """TensorBoard and W&B only, under the given tags (Megatron's optional scalars)."""
        if self.enabled:
            self._scalars([(tag, v, step, None) for tag, v in values.items()])

    def _scalars(self, scalars: list) -> None:
        """(tag, value, iteration, tokens) to TensorBoard and W&B, the one place both get their scalars: a tag
        with tokens is plotted against them, the others against the iteration."""
        if self.tb:
            for tag, v, it, tokens in scalars:
                self.tb.add_scalar(tag, v, it if tokens is None else tokens)
        if self.wandb is not None and self.wandb.run is not None and scalars:
            self.wandb.log(scalars)

    def close(self) -> None:
        if self.fh:
            self.fh.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


_SUMS = ("variance_l2", "variance_sqrt_l2", "momentum_l2", "weight_l2",
         "variance_l1", "variance_sqrt_l1", "momentum_l1", "weight_l1")
_MAXES = ("variance_abs_max", "variance_sqrt_abs_max", "momentum_abs_max", "weight_abs_max")


def optimizer_state_stats(pieces: dict, ps: ParallelState, sharded: bool) -> dict:
    """L2/L1 norms and max |x| of Adam's exp_avg_sq, its sqrt, exp_avg and the fp32 weights, over the model.

    `pieces` is ZeroOptimizer.state_dict()["pieces"] of this rank. Summed as Megatron-DeepSpeed sums
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
        """`optimizer` (anything with state_dict() as ZeroOptimizer's) is read only for
        --log-optimizer-states-to-tensorboard; `sharded_state`: ZeRO splits its state over all ranks;
        `plan`: `gpt3d plan`'s prediction for this run (GPU runs), printed beside the measured figures."""
        self.cfg, self.ps, self.throughput, self.train_iters = cfg, ps, throughput, train_iters
        self.global_batch, self.optimizer, self.sharded_state = global_batch, optimizer, sharded_state
        self.plan, self.lines = plan, 0            # train log lines written by this run
        self.log = MetricsLogger(ps.is_logging_rank, cfg)
        self.loss_sum, self.loss_n = torch.zeros(1, device=ps.device), 0
        self.window = (time.perf_counter(), 0)     # (start time, iteration) of the timing window

    def console(self, text: str) -> None:
        self.log.console(text)

    def run_start(self, state: TrainState, settings: dict, resumed: Optional[dict] = None) -> Optional[str]:
        """The run is accepted: claim its run directory (rundir.py; rank 0 makes it, every rank learns it and
        records it in `cfg.run_dir`, so checkpoints name it), open the sinks and write the metrics file's marker
        for a run starting (or resuming) at `state` with these non-default settings. `resumed`: the training
        settings of the checkpoint a resume restored. Returns the run directory (None: nothing goes in one)."""
        found: tuple[Optional[str], Optional[str]] = (None, None)
        if self.ps.rank == 0:
            try:
                found = (rundir.claim(self.cfg, resumed), None)
            except OSError as e:
                found = (None, f"could not create the run directory: {e}")
        if self.ps.distributed:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        run_dir, err = found
        if err:
            raise FileError(err)
        if run_dir:
            self.cfg.run_dir = run_dir
        self.log.start_run(state.iteration, state.tokens, settings, run_dir)
        return run_dir

    def outputs(self) -> str:
        """Where the metrics, curves, TensorBoard events and W&B run go (after run_start; the logging rank)."""
        return self.log.outputs() if self.log.enabled and self.log.fh else ""

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
        gpu = (f"{tp['tflops_per_gpu']:.1f} TFLOPs/GPU (6N: {tp['tflops_per_gpu_6n']:.1f}) | MFU {tp['mfu']:.1%} | "
               if self.ps.device.type == "cuda" else "")   # a GPU's figures (MFU: of --peak-tflops)
        self.log.console(
            f"iter {state.iteration:>6}/{self.train_iters} | loss {loss:.4f} | lr {result.lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tp['tokens_per_s']:,.0f} tok/s | {gpu}"
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
        log_file = self.log.log_file
        if not (self.log.enabled and log_file):
            return
        try:
            from ..console.plot import plot_runs
            plot_runs([log_file], os.path.splitext(log_file)[0] + ".png")
        except Exception as e:  # noqa: BLE001 - matplotlib, fonts, disk: none of it may cost the run
            warn(f"could not plot {log_file}: {e}")
