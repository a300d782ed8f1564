"""Process layout: which rank holds which tensor/pipeline/data slice.

Built once and passed explicitly, so two models with different layouts can live
in one process (tests) and nothing hides in module globals. Rank order follows
Megatron with TP innermost: rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank,
so TP peers share a node and PP hops cross nodes. Joining the job and picking the device live here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from ..errors import ConfigError
from .layout import data_parallel_size


@dataclass
class ParallelState:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None      # tp x pp: everything holding one model replica
    embedding_group: Optional[dist.ProcessGroup] = None  # first and last stage: tied embedding grads
    pp_ranks: list = field(default_factory=lambda: [0])   # global ranks of this rank's pipeline, by stage

    @classmethod
    def single(cls, device: torch.device = torch.device("cpu")) -> ParallelState:
        """One process holding the whole model (eval, generate, export, tests)."""
        return cls(device=device)

    @classmethod
    def tp_rank_view(cls, tp: int, sequence_parallel: bool = False, tp_rank: int = 0,
                     device: torch.device = torch.device("meta")) -> ParallelState:
        """One tensor-parallel rank's view, without process groups: enough to build that rank's model chunks
        (their parameter shapes and metadata) but not to run collectives. The planner builds its parameter
        lists from models built so, on the meta device."""
        return cls(tp=tp, rank=tp_rank, sequence_parallel=sequence_parallel, device=device)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Last stage, first TP and DP rank: the one rank that sees the loss."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp}" + (" SP" if self.sp else "")

    def barrier(self) -> None:
        """Wait for every rank of the job (a no-op in one process)."""
        if self.distributed:
            dist.barrier()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU if there is one, else the CPU; `cuda` without a GPU is a ConfigError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is visible")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, srun + torchrun) told this process through the environment."""
    world: int
    rank: int
    local_rank: int


def launch_env(environ=os.environ) -> LaunchEnv:
    """WORLD_SIZE / RANK / LOCAL_RANK, checked: a ConfigError (one line) for values that are not a job's (where
    int() or joining would end in a traceback)."""
    def number(name: str, default: str) -> int:
        text = environ.get(name, default)
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not a whole number") from None
    world, rank, local = number("WORLD_SIZE", "1"), number("RANK", "0"), number("LOCAL_RANK", "0")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local} do not describe a job (need "
                          "WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE); unset them for one process")
    return LaunchEnv(world, rank, local)


def refuse_a_job_without_rendezvous(env: LaunchEnv, environ=os.environ) -> None:
    """Joining a job of several processes needs torchrun's MASTER_ADDR/MASTER_PORT: one line if they are absent."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if env.world > 1 and missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"WORLD_SIZE={env.world} is set but {' and '.join(missing)} {verb} not: start the job "
                          f"with torchrun (e.g. torchrun --nproc_per_node {env.world} -m gpt3d train ...), or unset "
                          "WORLD_SIZE to train in one process")


def init_distributed(backend: str = "auto", timeout_minutes: float = 10.0,
                     device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun job (if any) and pick this rank's device.

    NCCL on GPU and gloo on CPU by default. The timeout is every collective's deadline (the groups of
    `build_parallel_state` get it too): a stopped or dead rank brings the others down with an error instead
    of a hang (gloo raises in the waiting call; NCCL's watchdog ends the process).
    """
    env = launch_env()
    refuse_a_job_without_rendezvous(env)
    dev = pick_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kw: dict = {"device_id": dev} if backend == "nccl" else {}
        timeout = timedelta(minutes=timeout_minutes)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            kw.update(store=_attempt_store(timeout), rank=env.rank, world_size=env.world)
        dist.init_process_group(backend, timeout=timeout, **kw)
    return env.world, env.rank, dev


def _attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's store, under a prefix of its own for each attempt of the job.

    torchrun keeps one store across the restarts of `--max-restarts`, and torch names process groups the
    same way in every attempt (default_pg/1/, ...), so a restarted job's new_group can read the addresses
    (gloo) or ids (NCCL) its predecessor left there and fail to connect. A prefix per attempt keeps them apart."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"gpt3d/attempt/{attempt}", store)


def build_parallel_state(cfg: ParallelConfig, world_size: int, rank: int, device: torch.device) -> ParallelState:
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)
    ps = ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, sequence_parallel=cfg.sequence_parallel, device=device)
    if world_size == 1:
        return ps

    def rank_of(t: int, d: int, p: int) -> int:
        return p * dp * tp + d * tp + t

    # Every group gets the job's deadline: new_group's own default is torch's (30 minutes on gloo), not the
    # default group's, so without it a stopped peer would keep a DP or pipeline wait going that long.
    timeout = timedelta(minutes=cfg.distributed_timeout_minutes)

    def group(all_ranks: list) -> Optional[dist.ProcessGroup]:
        """Create every group of one kind (all ranks, same order) and return the one holding this rank."""
        mine = None
        for ranks in all_ranks:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine = g
        return mine

    pipelines = [[rank_of(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    ps.tp_group = group([[rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    ps.dp_group = group([[rank_of(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)])
    ps.pp_group = group(pipelines)
    ps.embedding_group = group([sorted({r[0], r[-1]}) for r in pipelines])   # first and last stage
    ps.mp_group = group([[rank_of(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    ps.pp_ranks = next(r for r in pipelines if rank in r)
    return ps
