"""The training loop: build everything from the config, then step, log, evaluate, save, until told to stop.

The loop only sequences; each decision lives with an object that owns it: the step and its counters
(step.py), when to stop (stop.py), what to print and record (report.py), when a rank is hung (watchdog.py:
the loop reports its progress), the model and its compile
policy (model/build.py), gradient sync and the optimizer (optim/), what a checkpoint holds (the parts
named in `checkpoint_parts`, written by checkpoint/). `Trainer.train_step` is the one step used by `train`
and by `bench`, so the benchmark measures exactly what training runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Optional
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .. import checkpoint as ckpt
from . import determinism
from ..checkpoint import megatron_deepspeed
from ..config import Config
from ..data import stream
from ..data.sampler import MockGPTDataset, build_data_loader
from ..data.sizing import train_iterations, train_valid_test_num_samples
from ..errors import CheckpointError, DataError, Gpt3dError, warn
from ..perf.throughput import Throughput
from ..model.build import build_model_chunks, compile_enabled
from ..model.gpt import count_parameters
from ..optim.grad_buffer import GradBuffer
from ..optim.grad_scaler import DynamicLossScaler
from ..optim.lr_schedule import LRSchedule
from ..optim.zero import ZeroOptimizer, describe_zero
from ..parallel.layout import resolve
from ..parallel.random import seed_everything
from ..parallel.state import ParallelState, build_parallel_state, init_distributed, launch_env
from ..plan.advice import advise
from ..plan.fits import refuse_what_cannot_fit
from ..plan.presets import mfu_peak_tflops
from ..plan.search import for_run as plan_for_run
from ..plan.search import run_gpu
from ..console.progress import Activity
from . import faults
from .report import Reporter, dp_mean
from .step import StepResult, TrainState, TrainStep
from .stop import StopPolicy, divergence_error
from .watchdog import SLOW_PHASE_EXTRA_S, Watchdog


def legacy_data_fingerprint(cfg: Config) -> str:
    """The data hash checkpoints recorded before `data_state` (meta.json "data_fingerprint")."""
    d = cfg.data
    key = {"mock_data": d.mock_data, "data_path": d.data_path, "split": d.split,
           "seq_length": cfg.model.seq_length, "seed": cfg.training.seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class Trainer:
    def __init__(self, cfg: Config, ps: Optional[ParallelState] = None):
        # validate before joining the job, so a bad layout fails without waiting for peers
        cfg.validate(launch_env().world if ps is None else ps.world_size)
        self.restore_determinism = determinism.apply(cfg.training.deterministic_mode)   # before CUDA and NCCL
        try:
            self._build(cfg, ps)
        except BaseException:   # refused (or failed) here: the process' settings are as they were
            self.restore_determinism()
            raise

    def _build(self, cfg: Config, ps: Optional[ParallelState]) -> None:
        t = cfg.training
        if ps is None:
            world, rank, device = init_distributed(cfg.parallel.distributed_backend,
                                                   cfg.parallel.distributed_timeout_minutes, t.device)
            ps = build_parallel_state(cfg.parallel, world, rank, device)
        self.cfg, self.ps = cfg, ps
        self.tp_rng = seed_everything(t.seed, ps)
        self.vocab_size, self.tokenizer = self._vocab()
        # `gpt3d plan` on the GPU this runs on (none on the CPU), before allocating: a faster layout of the same
        # optimisation is advised (--auto-tune-layout takes it), then the prediction; --check-memory refuses here
        gpu = self.plan_gpu(ps)
        self.advice = advise(cfg, ps.world_size, *gpu, vocab_size=self.vocab_size) if gpu else None
        if self.advice is not None and t.auto_tune_layout:
            cfg = self.advice.apply(cfg)
            cfg.validate(ps.world_size)
            self.cfg, t = cfg, cfg.training
        self.layout = resolve(cfg, ps.world_size, self.vocab_size)   # checked by cfg.validate above
        self.global_batch, self.num_micro = self.layout.global_batch, self.layout.num_micro
        tokens_per_iter = self.global_batch * cfg.model.seq_length
        self.train_iters = train_iterations(t.train_iters, t.train_samples, t.train_tokens, self.global_batch,
                                            cfg.model.seq_length)
        # before allocating: sizes no memory holds are refused; `gpt3d plan`'s prediction for this layout (GPU
        # only), which --check-memory compares with the usable memory
        refuse_what_cannot_fit(cfg, ps, self.vocab_size, None if cfg.data.mock_data else sum(self._num_samples()))
        self.plan = plan_for_run(cfg, ps, self.vocab_size, gpu)
        self.model = build_model_chunks(cfg, ps, self.tp_rng, self.vocab_size)
        self.grads = GradBuffer(self.model, ps, zero_stage=cfg.parallel.zero_stage,
                                bucket_size_mb=cfg.parallel.bucket_size_mb, overlap=cfg.parallel.overlap_grad_reduce,
                                micro_batches=self.num_micro)
        self.optimizer = ZeroOptimizer(self.grads, cfg.optimizer, ps)
        self.schedule = LRSchedule(cfg.scheduler, train_iters=self.train_iters, tokens_per_iter=tokens_per_iter)
        self.scaler = DynamicLossScaler(cfg.precision, ps.device) if cfg.precision.fp16 else None
        self.state = TrainState(cfg.model.seq_length, data_state=stream.data_state(cfg, self.global_batch))
        self.step = TrainStep(cfg, ps, self.model, self.grads, self.optimizer, self.schedule, self.scaler,
                              self.state, self.global_batch)
        throughput = Throughput(cfg.model, self.vocab_size, self.model.padded_vocab, self.global_batch,
                                ps.world_size, mfu_peak_tflops(t.peak_tflops, ps.device))
        self.report = Reporter(t, ps, throughput, self.train_iters, self.global_batch, optimizer=self.optimizer,
                               sharded_state=cfg.parallel.zero_stage == 1 and ps.dp > 1, plan=self.plan)
        self.last_checkpoint: Optional[str] = None
        self.saved_iteration: Optional[int] = None   # the iteration this run last saved (one save each)
        self.watchdog = Watchdog.for_run(cfg.parallel.distributed_timeout_minutes, ps.rank, ps.world_size,
                                         compile=compile_enabled(t, ps.device))   # running only inside `run`
        faults.install(self)   # a test hook, installed only when GPT3D_FAULT_INJECT names this rank

    # ----- setup --------------------------------------------------------------------------------------------
    def plan_gpu(self, ps: ParallelState):
        """The GPU the start-up plan is made for (None on the CPU: no prediction, no advice)."""
        return run_gpu(ps)

    def _vocab(self):
        d, m = self.cfg.data, self.cfg.model
        from ..tokenizers.factory import model_vocab_size, tokenizer_from_config
        tok = None if d.mock_data else tokenizer_from_config(d, m.vocab_size, quiet=self.ps.rank != 0)
        return model_vocab_size(tok, m.vocab_size, m.padded_vocab_size), tok

    def _num_samples(self) -> tuple[int, int, int]:
        """Megatron-DeepSpeed's (train, valid, test) sample counts: they fix the sample order."""
        t = self.cfg.training
        return train_valid_test_num_samples(self.train_iters, t.train_samples, self.global_batch, t.eval_interval,
                                            t.eval_iters)

    def build_datasets(self):
        d, t, m = self.cfg.data, self.cfg.training, self.cfg.model
        n = self._num_samples()
        if d.mock_data:
            return tuple(MockGPTDataset(k, m.seq_length, self.vocab_size, t.seed + i) if k else None
                         for i, k in enumerate(n))
        from ..data.gpt_dataset import build_train_valid_test_datasets
        return build_train_valid_test_datasets(d.data_path, d.split, n, m.seq_length, t.seed,
                                               is_builder=self.ps.rank == 0, barrier=self.ps.barrier,
                                               vocab_size=self.vocab_size)

    def microbatches(self, it: Iterator) -> list[dict]:
        out = []
        for _ in range(self.num_micro):
            text = next(it)["text"].to(self.ps.device, non_blocking=True)
            out.append({"tokens": text[:, :-1], "labels": text[:, 1:]})
        return out

    # ----- step, evaluation, checkpoints --------------------------------------------------------------------
    def train_step(self, microbatches: list[dict]) -> StepResult:
        return self.step(microbatches)

    def evaluate(self, dataset) -> Optional[float]:
        """Mean loss over the first eval-iters global batches of `dataset` (a fixed window, so curves compare)."""
        t = self.cfg.training
        if dataset is None or t.eval_iters == 0:
            return None
        loader = iter(build_data_loader(dataset, 0, t.micro_batch_size, self.ps.dp_rank, self.ps.dp))

        def batches() -> Iterator[list[dict]]:
            for i in range(t.eval_iters):
                if i:
                    self.watchdog.progress(f"validation batch {i} of {t.eval_iters}")
                yield self.microbatches(loader)
        loss = self.step.evaluate(batches(), forwards=t.eval_iters * self.num_micro)
        return dp_mean(loss, self.ps) if loss is not None else None

    def checkpoint_parts(self) -> dict:
        """Everything a checkpoint holds, by part name (see gpt3d/checkpoint)."""
        return ckpt.training_parts(self.cfg, self.ps, model=self.model, optimizer=self.optimizer,
                                   scaler=self.scaler, tp_rng=self.tp_rng, state=self.state,
                                   tokenizer=self.tokenizer)

    def save(self) -> None:
        """Save this iteration's checkpoint, once: a second request for the same iteration (the save interval
        and a stop signal, or the end of the run, at one step) is a no-op."""
        c = self.cfg.checkpoint
        if c.save and self.saved_iteration != self.state.iteration:
            with self.watchdog.allow(f"saving iteration {self.state.iteration}", SLOW_PHASE_EXTRA_S):
                path = ckpt.save(c.save, self.checkpoint_parts(), self.ps, self.state.iteration,
                                 keep_last=c.keep_last)
            self.saved_iteration = self.state.iteration
            if ckpt.structure_problem(path) is None:   # checksummed as written; not if it holds non-finite values
                self.last_checkpoint = path
            self.report.console(f"saved checkpoint at iteration {self.state.iteration} to {c.save}")

    def load(self, root: str, check_data: bool = True):
        """Resume from the newest good checkpoint under `root`; its Loaded. `check_data=False`: the caller
        checks the data stream itself once the datasets are built (`check_data_stream`) and only then says
        `loaded_line` (a refused resume never says "loaded")."""
        c = self.cfg.checkpoint
        loaded = ckpt.load(root, self.checkpoint_parts(), self.ps, skip=ckpt.skipped_parts(c))
        if "optimizer" not in loaded.parts:   # weights only (--finetune, --no-load-optim, import-hf)
            self.optimizer.reload_masters_from_params()
        if check_data:
            self.check_data_stream(loaded)
            self.report.console(self.loaded_line(loaded))
        self.last_checkpoint = loaded.path
        return loaded

    @staticmethod
    def loaded_line(loaded) -> str:
        lay, how = loaded.meta["layout"], "" if "train" in loaded.parts else ", weights only: a new run"
        return (f"loaded checkpoint {loaded.path} (iteration {loaded.meta['iteration']}, saved at "
                f"TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}{how})")

    def check_data_stream(self, loaded) -> None:
        """A resume that would change the data stream is refused, naming what changed, unless
        --override-data-state; then the counters carry over (TrainState: tokens never go backwards)."""
        if "train" not in loaded.parts:   # --finetune: a fresh position in whatever stream this run reads
            return
        saved, state = loaded.meta.get("data_state"), self.state
        if saved is not None:
            diffs = stream.changes(saved, state.data_state)
        elif loaded.meta.get("data_fingerprint") not in (None, legacy_data_fingerprint(self.cfg)):
            diffs = ["the data path, split, seq length or seed (this checkpoint records only a hash of them)"]
        else:
            diffs = []
        if not diffs:
            return
        what = "; ".join(diffs)
        if not self.cfg.checkpoint.override_data_state:
            raise CheckpointError(
                f"resuming from {loaded.path} would change the data stream: {what}. Pass --override-data-state to "
                f"continue anyway (sample position {state.consumed_samples:,} and {state.tokens:,} tokens carry over)")
        if self.ps.rank == 0:
            warn(f"--override-data-state: the data stream changed ({what}); continuing at sample "
                 f"{state.consumed_samples:,} of the new order with {state.tokens:,} tokens trained so far")

    def header(self, run_dir: Optional[str], train_ds) -> list[str]:
        """The start-up lines: layout (ZeRO as configured, and what it means at this DP), size, batch, device;
        the data; where the run writes (run directory, metrics, curves, TensorBoard, W&B, checkpoints)."""
        cfg, t, ps = self.cfg, self.cfg.training, self.ps
        n_params = count_parameters(cfg.model, self.vocab_size)
        zero = describe_zero(cfg.parallel.zero_stage, ps.dp)
        lines = [f"gpt3d: {ps.describe()} {zero} | {n_params['total'] / 1e6:.2f}M parameters | global batch "
                 f"{self.global_batch} ({self.num_micro} micro-batches of {t.micro_batch_size}) | "
                 f"{self.train_iters} iterations | device {ps.device}"]
        tok = f" | tokenizer {self.tokenizer.type_name}: {self.tokenizer.describe()}" if self.tokenizer else ""
        lines.append(f"gpt3d: data: {stream.describe(cfg, train_ds)}{tok}")
        c = cfg.checkpoint
        saves = (f"checkpoints: {c.save}" + (f" every {c.save_interval} iterations" if c.save_interval else
                                             " at the end") if c.save else "checkpoints: none (--save)")
        lines.append(f"run directory: {run_dir or 'none (every output has its own flag)'} | {saves}")
        lines.append(self.report.outputs())
        return lines

    # ----- the loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to the end (or a stop). The run owns its --save directory meanwhile (checkpoint/lock.py): a
        second run saving there fails here, before it touches anything."""
        save, load = self.cfg.checkpoint.save, self.cfg.checkpoint.load
        if load and megatron_deepspeed.is_checkpoint(load):   # before the lock writes into --save
            megatron_deepspeed.check_save_dir(save, megatron_deepspeed.Checkpoint(load))
        lock = ckpt.lock_save_dir(save, self.ps) if save else None
        try:
            with self.watchdog:
                try:
                    return self._run()
                except Gpt3dError:
                    raise
                except Exception:
                    # e.g. a collective's own timeout: say which peers went silent, if any (the traceback follows)
                    silent = self.watchdog.report_silent_peers() if self.ps.distributed else None
                    if silent:
                        warn(silent)
                    raise
        finally:
            if lock is not None:
                lock.release()
            self.restore_determinism()

    def _run(self) -> int:
        cfg, t, ps = self.cfg, self.cfg.training, self.ps
        loaded = None   # the checkpoint first: its own checks (shape, tokenizer) say more than the data's
        if cfg.checkpoint.load and megatron_deepspeed.is_checkpoint(cfg.checkpoint.load):
            # converted into --save as a gpt3d checkpoint, then loaded like one
            loaded = self.load(megatron_deepspeed.import_for_run(self), check_data=False)
        elif cfg.checkpoint.load and ckpt.holds_no_checkpoint(cfg.checkpoint.load):
            if ps.rank == 0:
                warn(f"--load {cfg.checkpoint.load} holds no checkpoint yet: starting from scratch (as Megatron does)")
        elif cfg.checkpoint.load:
            with self.watchdog.allow("loading the checkpoint", SLOW_PHASE_EXTRA_S):
                loaded = self.load(cfg.checkpoint.load, check_data=False)
        with self.watchdog.allow("building the datasets and their index", SLOW_PHASE_EXTRA_S):
            train_ds, valid_ds, _ = self.build_datasets()
        if train_ds is None:
            raise DataError(f"--split {cfg.data.split} leaves no document of --data-path "
                            f"{' '.join(cfg.data.data_path)} for training")
        self.state.data_state = stream.data_state(cfg, self.global_batch, train_ds)
        if loaded is not None:
            self.check_data_stream(loaded)
            need = self.state.consumed_samples + (self.train_iters - self.state.iteration) * self.global_batch
            if self.state.iteration < self.train_iters and need > len(train_ds):
                raise CheckpointError(
                    f"{loaded.path} resumes at sample {self.state.consumed_samples:,} (iteration "
                    f"{self.state.iteration:,}): {self.train_iters:,} iterations would need {need:,} samples of a "
                    f"data stream of {len(train_ds):,}")
        resumed = loaded.meta["config"].get("training") if loaded is not None and "train" in loaded.parts else None
        # accepted: only now are the run directory and the metrics files created
        run_dir = self.report.run_start(self.state, cfg.non_defaults(), resumed)
        for line in self.header(run_dir, train_ds):
            self.report.console(line)
        if loaded is not None:
            self.report.console(self.loaded_line(loaded))
        last = self.train_iters if t.train_tokens is None else \
            min(self.train_iters, -(-t.train_tokens // (self.global_batch * cfg.model.seq_length)))
        warmup = self.schedule.warmup_beyond(last)
        if warmup and ps.rank == 0:
            warn(warmup)
        self.report.prediction()
        if self.advice is not None:
            self.report.console(("gpt3d plan: applied (--auto-tune-layout) " if t.auto_tune_layout else "")
                                + self.advice.line())
        elif t.auto_tune_layout:   # asked for, nothing to apply: say so rather than stay silent
            self.report.console("gpt3d plan: --auto-tune-layout: " + (
                "no faster recompute setting or micro-batch size is predicted for this run; it runs as given"
                if self.plan is not None else "no GPU to plan for; the run keeps its layout"))
        stop = StopPolicy(t, ps, fp16=cfg.precision.fp16)
        with stop.signals() if t.exit_signal_handler else contextlib.nullcontext():
            self._loop(train_ds, valid_ds, stop)
        self.report.close()
        return 0

    def _loop(self, train_ds, valid_ds, stop: StopPolicy) -> None:
        cfg, t, ps, state, report = self.cfg, self.cfg.training, self.ps, self.state, self.report
        loader = iter(build_data_loader(train_ds, state.consumed_samples, t.micro_batch_size, ps.dp_rank, ps.dp,
                                        num_workers=cfg.data.num_workers))
        save_interval = cfg.checkpoint.save_interval
        report.start(state.iteration)
        batch = None
        # the first step (and the first validation) may compile and set up communicators: more time for them
        wd, first_extra = self.watchdog, self.watchdog.first_extra_s
        wd.progress("set-up", next_extra_s=first_extra)
        validated = False
        compiling = compile_enabled(t, ps.device)
        if compiling:
            report.console("torch.compile: the first step compiles the model first (often 30 s or more)")
        while state.iteration < self.train_iters:
            if t.train_tokens is not None and state.tokens >= t.train_tokens:
                break
            if compiling:   # a line every ~10 s while torch.compile works, then the time it took
                with Activity("torch.compile: compiling the first step", enabled=ps.is_logging_rank) as work:
                    result = self.train_step(batch or self.microbatches(loader))
                report.console(f"torch.compile: first step compiled and run in {work.elapsed():.1f} s")
            else:
                result = self.train_step(batch or self.microbatches(loader))
            wd.progress(f"iteration {state.iteration}")
            # Read the next batch while the device still runs this step: the checks below wait for it.
            batch = self.microbatches(loader) if state.iteration < self.train_iters else None
            stop.observe(result)
            late = stop.settle()   # the previous step's stop check, if it was left unread
            if late is not None and late.diverged:
                raise divergence_error(late, self.last_checkpoint)
            report.step(result, state)
            if compiling:   # later log lines' tokens/s and ETA leave the compilation out
                report.start(state.iteration)
                compiling = False
            it = state.iteration
            evaluating = bool(t.eval_interval) and it % t.eval_interval == 0
            saving = bool(save_interval) and it % save_interval == 0
            if evaluating:
                with report.untimed(state), \
                        wd.allow(f"validation at iteration {it}", 0 if validated else first_extra):
                    report.validation(self.evaluate(valid_ds), state)
                validated = True
            # Read the verdict now where it decides something or the host has synced anyway (log line,
            # validation, save, last step); elsewhere at the next step, so the host never waits here.
            last = it >= self.train_iters or (t.train_tokens is not None and state.tokens >= t.train_tokens)
            verdict = stop.check(it, exact=it % t.log_interval == 0 or evaluating or saving or last)
            if verdict is None:
                continue
            if verdict.diverged:
                raise divergence_error(verdict, self.last_checkpoint)
            if saving and not verdict.streak:
                with report.untimed(state):
                    self.save()
            if verdict.reason:
                report.console(f"{verdict.reason} at iteration {it}: saving and exiting")
                self.save()
                return
        late = stop.settle()   # none is left unread by the last step; kept so no verdict can be lost
        if late is not None and late.diverged:
            raise divergence_error(late, self.last_checkpoint)
        if state.iteration % t.eval_interval != 0:
            with wd.allow(f"validation at iteration {state.iteration}", 0 if validated else first_extra):
                report.validation(self.evaluate(valid_ds), state)
        if cfg.checkpoint.save and (not save_interval or state.iteration % save_interval != 0):
            self.save()


@record   # under torchrun, a crash goes to this rank's error file and the job's failure summary
def _train(cfg: Config):
    try:
        return Trainer(cfg).run()
    except Gpt3dError as e:   # the user's to fix, not a crash: returned past @record, so no crash report
        return e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: Config) -> int:
    """Train; a Gpt3dError (bad input, diverged run) is raised for the CLI to print as one line."""
    outcome = _train(cfg)
    if isinstance(outcome, Gpt3dError):
        raise outcome
    return outcome
