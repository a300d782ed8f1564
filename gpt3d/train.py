"""The training loop: build everything from the config, then step, log, evaluate, save.

`Trainer.train_step` is the one step used by `train` and by `bench`, so the
benchmark measures exactly what training runs.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data.indexed import DataError
from .data.sampler import MockGPTDataset, build_data_loader
from .data.tokenizer import TokenizerError
from .metrics import MetricsLogger, Throughput, fmt_duration, warn
from .model.attention import sdpa_backend_context
from .model.gpt import GPTModel, count_parameters
from .optim.grad_scaler import DynamicLossScaler
from .optim.schedule import LRSchedule
from .optim.zero1 import DistributedOptimizer
from .parallel.pipeline import forward_backward, stage_layers
from .parallel.random import seed_everything
from .parallel.state import ParallelState, build_parallel_state, init_distributed

MOCK_VOCAB = 50257


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the message names the iteration."""


def parse_fault(spec: Optional[str], rank: int) -> Optional[tuple[int, str]]:
    """GPT3D_FAULT_INJECT=RANK:ITERATION[:raise|nan], a test hook: (iteration, kind) if it targets this rank.

    `raise` throws on that rank at the start of that iteration; `nan` poisons its
    gradients from that iteration on."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("raise", "nan")):
        raise ConfigError(f"GPT3D_FAULT_INJECT={spec!r}: expected RANK:ITERATION[:raise|nan]")
    return (int(parts[1]), parts[2] if len(parts) == 3 else "raise") if int(parts[0]) == rank else None


def param_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.precision.bf16 else torch.float16 if cfg.precision.fp16 else torch.float32


def build_model_chunks(cfg: Config, ps: ParallelState, tp_rng, vocab_size: int) -> list[GPTModel]:
    """This rank's pipeline stage: one chunk, or several with the interleaved schedule."""
    p = cfg.parallel
    chunks = []
    layer_groups = stage_layers(cfg.model.num_layers, ps.pp, ps.pp_rank, p.pipeline_model_parallel_split,
                                p.num_layers_per_virtual_pipeline_stage)
    for v, ids in enumerate(layer_groups):
        first = ps.is_first_stage and v == 0
        last = ps.is_last_stage and v == len(layer_groups) - 1
        m = GPTModel(cfg.model, ps, tp_rng, vocab_size=vocab_size, layer_ids=ids, pre_process=first,
                     post_process=last)
        m.init_weights(cfg.training.seed)
        chunks.append(m.cast_parameters(param_dtype(cfg)))
    return chunks


class Trainer:
    def __init__(self, cfg: Config, ps: Optional[ParallelState] = None):
        t = cfg.training
        if ps is None:   # validate before joining the job, so a bad layout fails without waiting for peers
            cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
            world, rank, device = init_distributed(cfg.parallel.distributed_backend,
                                                   cfg.parallel.distributed_timeout_minutes, t.device)
            ps = build_parallel_state(cfg.parallel, world, rank, device)
        else:
            cfg.validate(ps.world_size)
        self.cfg, self.ps = cfg, ps
        self.tp_rng = seed_everything(t.seed, ps)
        self.vocab_size, self.tokenizer = self._vocab()
        self.plan = self._plan()   # before allocating: --check-memory refuses a layout predicted not to fit
        self.chunks = build_model_chunks(cfg, ps, self.tp_rng, self.vocab_size)
        self.padded_vocab = self.chunks[0].padded_vocab
        self.global_batch = t.global_batch_size or t.micro_batch_size * ps.dp
        self.num_micro = self.global_batch // (t.micro_batch_size * ps.dp)
        self.tokens_per_iter = self.global_batch * cfg.model.seq_length
        self.train_iters = t.train_iters if t.train_iters is not None else \
            math.ceil(t.train_tokens / self.tokens_per_iter)
        if t.compile:
            self._compile()
        self.optimizer = DistributedOptimizer(self.chunks, cfg.optimizer, ps, zero_stage=cfg.parallel.zero_stage,
                                              bucket_size_mb=cfg.parallel.bucket_size_mb,
                                              overlap=cfg.parallel.overlap_grad_reduce)
        self.schedule = LRSchedule(cfg.scheduler, train_iters=self.train_iters, tokens_per_iter=self.tokens_per_iter)
        self.scaler = DynamicLossScaler(cfg.precision, ps.device) if cfg.precision.fp16 else None
        self.iteration, self.consumed_samples = 0, 0
        self.throughput = Throughput(cfg.model, self.vocab_size, self.padded_vocab, self.global_batch,
                                     ps.world_size, t.peak_tflops)
        self.log = MetricsLogger(ps.is_logging_rank, t.log_file, t.tensorboard_dir)
        self.stop_requested = False
        # consecutive non-finite steps, kept on the device; read once per step together with the stop flag
        self.bad_streak = torch.zeros(1, device=ps.device)
        self.last_checkpoint: Optional[str] = None
        self.fault = parse_fault(os.environ.get("GPT3D_FAULT_INJECT"), ps.rank)

    # ----- setup --------------------------------------------------------------------------------------------
    def _compile(self) -> None:
        """torch.compile in place (`Module.compile`), so parameter names and checkpoints stay the same.

        With no tensor or data parallelism the whole chunk, embedding to loss, is one graph: the fusions span
        layer boundaries and the loss (measured 10% faster at 125M, benchmarks/RESULTS.md). Otherwise each
        layer is its own graph: TP collectives stay outside compiled code, and gradients become ready layer
        by layer, so the DP bucket reductions overlap the rest of backward (a whole-chunk graph would hand
        every gradient over at its very end)."""
        for c in self.chunks:
            if self.ps.tp == 1 and self.ps.dp == 1:
                c.compile()
            else:
                for layer in c.layers.values():
                    layer.compile()

    def _plan(self):
        """`gpt3d plan`'s prediction for this layout on this GPU (None on CPU)."""
        if self.ps.device.type != "cuda":
            return None
        from .plan import check_memory, predict
        from .plan.presets import gpu_for_device
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
        fn = check_memory if self.cfg.training.check_memory else predict
        return fn(self.cfg, self.ps.world_size, gpu_for_device(self.ps.device), per_node, vocab_size=self.vocab_size)

    def _vocab(self):
        d, m = self.cfg.data, self.cfg.model
        if d.mock_data:
            return m.vocab_size or MOCK_VOCAB, None
        from .data.tokenizer import build_tokenizer
        tok = build_tokenizer(d.vocab_file, d.merge_file)
        return m.vocab_size or tok.vocab_size, tok

    def build_datasets(self):
        d, t, m = self.cfg.data, self.cfg.training, self.cfg.model
        eval_samples = t.eval_iters * self.global_batch
        n = (self.train_iters * self.global_batch, eval_samples, eval_samples)
        if d.mock_data:
            return tuple(MockGPTDataset(k, m.seq_length, self.vocab_size, t.seed + i) if k else None
                         for i, k in enumerate(n))
        from .data.gpt_dataset import build_train_valid_test_datasets
        return build_train_valid_test_datasets(d.data_path, d.split, n, m.seq_length, t.seed,
                                               is_builder=self.ps.rank == 0, barrier=self._barrier)

    def _barrier(self) -> None:
        if self.ps.distributed:
            dist.barrier()

    def microbatches(self, it: Iterator) -> list[dict]:
        out = []
        for _ in range(self.num_micro):
            text = next(it)["text"].to(self.ps.device, non_blocking=True)
            out.append({"tokens": text[:, :-1], "labels": text[:, 1:]})
        return out

    # ----- one step -----------------------------------------------------------------------------------------
    def _hidden_shape(self) -> tuple:
        t, m = self.cfg.training, self.cfg.model
        s = m.seq_length // self.ps.tp if self.ps.sp else m.seq_length
        return (t.micro_batch_size, s, m.hidden_size)

    def _attention_kernels(self):
        """SDPA kernel choice, entered outside any compiled region so the trace bakes it in."""
        return sdpa_backend_context(self.cfg.model.attention_backend, self.ps.device)

    def _set_last(self, last: bool) -> None:
        self.optimizer.last_microbatch = last

    def train_step(self, microbatches: list[dict]) -> tuple[Optional[torch.Tensor], torch.Tensor, bool]:
        """Forward/backward all micro-batches, sync grads, clip, step. No host sync except fp16's skip check.

        Returns (mean loss on the last stage or None, grad norm, skipped-or-None-known)."""
        for c in self.chunks:
            c.train()
        if self.fault and self.fault[1] == "raise" and self.iteration + 1 == self.fault[0]:
            raise RuntimeError(f"injected fault on rank {self.ps.rank} at iteration {self.iteration + 1}")
        self.optimizer.zero_grad()
        scale = self.scaler.scale if self.scaler else None
        with self._attention_kernels():
            losses = forward_backward(self.chunks, microbatches, self.ps, forward_only=False, loss_scale=scale,
                                      set_last_microbatch=self._set_last, hidden_shape=self._hidden_shape(),
                                      dtype=param_dtype(self.cfg))
        self.optimizer.finish_grad_sync()
        if self.fault and self.fault[1] == "nan" and self.iteration + 1 >= self.fault[0]:
            for m in self.optimizer.masters[:1]:
                m.grad.fill_(float("nan"))
        lr = self.schedule.lr(self.iteration, self.consumed_samples * self.cfg.model.seq_length)
        norm = self.optimizer.clip_and_step(lr, scale)
        loss = torch.stack(losses).mean() if losses else None
        self._count_bad_step(loss, scale)
        skipped = self.scaler.update(self.optimizer.found_inf) if self.scaler else False
        self.iteration += 1
        self.consumed_samples += self.global_batch
        return loss, norm, skipped

    def _count_bad_step(self, loss: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> None:
        """Extend or reset the streak of non-finite steps, on the device (no host sync).

        The optimizer already skipped such a step on every rank. fp16 overflows are
        routine while the scale settles, so they count only at the minimum scale."""
        bad = self.optimizer.found_inf.reshape(1).float()
        if scale is not None:
            bad = bad * (scale <= self.cfg.precision.min_loss_scale).float()
        elif loss is not None:
            bad = torch.maximum(bad, (~torch.isfinite(loss.detach().float())).float().reshape(1))
        self.bad_streak = (self.bad_streak + bad) * bad

    @torch.no_grad()
    def evaluate(self, dataset) -> Optional[float]:
        """Mean loss over the first eval-iters global batches of `dataset` (a fixed window, so curves compare)."""
        if dataset is None or self.cfg.training.eval_iters == 0:
            return None
        for c in self.chunks:
            c.eval()
        loader = iter(build_data_loader(dataset, 0, self.cfg.training.micro_batch_size, self.ps.dp_rank,
                                        self.ps.dp))
        total = torch.zeros(1, device=self.ps.device)
        with self._attention_kernels():
            for _ in range(self.cfg.training.eval_iters):
                losses = forward_backward(self.chunks, self.microbatches(loader), self.ps, forward_only=True,
                                          loss_scale=None, set_last_microbatch=self._set_last,
                                          hidden_shape=self._hidden_shape(), dtype=param_dtype(self.cfg))
                if losses:
                    total += torch.stack(losses).mean()
        return self._dp_mean(total / self.cfg.training.eval_iters)

    def _dp_mean(self, value: torch.Tensor) -> Optional[float]:
        """Average a last-stage scalar over DP; None on other stages."""
        if not self.ps.is_last_stage:
            return None
        if self.ps.dp > 1:
            dist.all_reduce(value, group=self.ps.dp_group)
            value = value / self.ps.dp
        return float(value.item())

    # ----- the loop -----------------------------------------------------------------------------------------
    def _install_signal_handler(self) -> dict:
        """Returns the previous handlers, restored when `run` returns."""
        def handler(signum, frame):
            self.stop_requested = True
        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _check(self, start: float) -> tuple[Optional[str], int]:
        """(why to stop now or None, consecutive non-finite steps): one host sync, one all-reduce per step."""
        t = self.cfg.training
        timed_out = t.exit_duration_in_mins is not None and time.time() - start > t.exit_duration_in_mins * 60
        flags = torch.cat([torch.tensor([float(self.stop_requested), float(timed_out)], device=self.ps.device),
                           self.bad_streak])
        if self.ps.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, timed_out, streak = flags.tolist()
        why = "stop signal received" if stop else \
            f"--exit-duration-in-mins {t.exit_duration_in_mins} reached" if timed_out else None
        return why, int(streak)

    def _max_bad_steps(self) -> int:
        t = self.cfg.training
        return 1 if t.check_for_nan_in_loss_and_grad and not self.cfg.precision.fp16 else t.max_skipped_steps

    def save(self) -> None:
        c = self.cfg.checkpoint
        if c.save:
            self.last_checkpoint = ckpt.save_checkpoint(c.save, self, keep_last=c.keep_last)
            self.log.console(f"saved checkpoint at iteration {self.iteration} to {c.save}")

    def run(self) -> int:
        cfg, t, ps = self.cfg, self.cfg.training, self.ps
        train_ds, valid_ds, _ = self.build_datasets()
        if cfg.checkpoint.load:
            self.last_checkpoint = ckpt.load_checkpoint(cfg.checkpoint.load, self)
        n_params = count_parameters(cfg.model, self.vocab_size)
        self.log.console(f"gpt3d: {ps.describe()} | {n_params['total'] / 1e6:.2f}M parameters | "
                         f"global batch {self.global_batch} ({self.num_micro} micro-batches of "
                         f"{t.micro_batch_size}) | {self.train_iters} iterations | device {ps.device}")
        if self.plan is not None:
            from .plan.search import startup_line
            self.log.console(startup_line(self.plan))
        previous = self._install_signal_handler() if t.exit_signal_handler else {}
        try:
            return self._loop(train_ds, valid_ds)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _loop(self, train_ds, valid_ds) -> int:
        cfg, t, ps = self.cfg, self.cfg.training, self.ps
        loader = iter(build_data_loader(train_ds, self.consumed_samples, t.micro_batch_size, ps.dp_rank, ps.dp,
                                        num_workers=cfg.data.num_workers))
        loss_sum, loss_n, skipped_total = torch.zeros(1, device=ps.device), 0, 0
        start = time.time()
        last_log, last_log_it = time.perf_counter(), self.iteration
        batch = None
        while self.iteration < self.train_iters:
            if t.train_tokens is not None and self.consumed_samples * cfg.model.seq_length >= t.train_tokens:
                break
            loss, norm, skipped = self.train_step(batch or self.microbatches(loader))
            # Read the next batch while the device still runs this step: the checks below wait for it.
            batch = self.microbatches(loader) if self.iteration < self.train_iters else None
            if loss is not None:
                loss_sum += loss
                loss_n += 1
            if skipped:
                skipped_total += 1
            if self.iteration % t.log_interval == 0 or self.iteration == self.train_iters:
                if ps.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                per_iter = (now - last_log) / max(1, self.iteration - last_log_it)
                last_log, last_log_it = now, self.iteration
                mean_loss = self._dp_mean(loss_sum / max(loss_n, 1))
                loss_sum.zero_()
                loss_n = 0
                self._log_train(mean_loss, float(norm.item()), per_iter)
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self._log_eval(self.evaluate(valid_ds))
                last_log, last_log_it = time.perf_counter(), self.iteration   # time training steps only
            why, streak = self._check(start)
            if streak and streak >= self._max_bad_steps() > 0:
                first = self.iteration - streak + 1
                where = f"iteration {first}" if streak == 1 else f"iterations {first}-{self.iteration}"
                raise TrainingError(f"non-finite loss or gradients at {where} ({streak} consecutive skipped "
                                    f"steps); stopped without saving, last good checkpoint: "
                                    f"{self.last_checkpoint or 'none'}")
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0 and not streak:
                self.save()
                last_log, last_log_it = time.perf_counter(), self.iteration
            if why:
                self.log.console(f"{why} at iteration {self.iteration}: saving and exiting")
                self.save()
                self.log.close()
                self._plot()
                return 0
        if self.iteration % t.eval_interval != 0:
            self._log_eval(self.evaluate(valid_ds))
        if cfg.checkpoint.save and (not cfg.checkpoint.save_interval or
                                    self.iteration % cfg.checkpoint.save_interval != 0):
            self.save()
        self.log.close()
        self._plot()
        return 0

    def _plot(self) -> None:
        """`<log-file stem>.png` beside the metrics: a plotting problem warns, it never fails a finished run."""
        log_file = self.cfg.training.log_file
        if not (self.log.enabled and log_file):
            return
        try:
            from .plot import plot_runs
            plot_runs([log_file], os.path.splitext(log_file)[0] + ".png")
        except Exception as e:  # noqa: BLE001 - matplotlib, fonts, disk: none of it may cost the run
            warn(f"could not plot {log_file}: {e}")

    def _log_train(self, loss: Optional[float], grad_norm: float, per_iter: float) -> None:
        if not self.log.enabled:
            return
        lr = self.schedule.lr(self.iteration - 1, (self.consumed_samples - self.global_batch) *
                              self.cfg.model.seq_length)
        tp = self.throughput.report(per_iter)
        eta = (self.train_iters - self.iteration) * per_iter
        row = {"iteration": self.iteration, "tokens": self.consumed_samples * self.cfg.model.seq_length,
               "loss": loss, "lr": lr, "grad_norm": grad_norm, **tp, "seconds_per_iter": per_iter}
        if self.scaler:
            row["loss_scale"] = float(self.scaler.scale.item())
        self.log.record(row)
        self.lines_logged = getattr(self, "lines_logged", 0) + 1
        if self.plan is not None and self.lines_logged == 2:   # the second log line of this run: past compilation
            from .plan.search import measured_line
            self.log.console(measured_line(self.plan, tp["tokens_per_s"], torch.cuda.max_memory_allocated()))
        self.log.console(
            f"iter {self.iteration:>6}/{self.train_iters} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad norm {grad_norm:.3f} | {tp['tokens_per_s']:,.0f} tok/s | "
            f"{tp['tflops_per_gpu']:.1f} TFLOPs/GPU (6N: {tp['tflops_per_gpu_6n']:.1f}) | MFU {tp['mfu']:.1%} | "
            f"{per_iter * 1000:.0f} ms/it | ETA {fmt_duration(eta)}"
            + (f" | loss scale {row['loss_scale']:.0f}" if self.scaler else ""))

    def _log_eval(self, val: Optional[float]) -> None:
        if val is None or not self.log.enabled:
            return
        ppl = math.exp(min(val, 30.0))
        self.log.record({"iteration": self.iteration, "tokens": self.consumed_samples * self.cfg.model.seq_length,
                         "val_loss": val, "val_ppl": ppl})
        self.log.console(f"validation at iteration {self.iteration} | loss {val:.4f} | ppl {ppl:.2f}")


@record   # under torchrun, a rank's uncaught exception goes to its error file and the job's failure summary
def main(cfg: Config) -> int:
    try:
        trainer = Trainer(cfg)
        return trainer.run()
    except (ConfigError, DataError, TokenizerError, ckpt.CheckpointError) as e:
        print(f"gpt3d: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"gpt3d: error: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
