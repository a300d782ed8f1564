"""--deterministic-mode: the same command on the same GPU(s) gives the same losses, bit for bit.

Without it a GPU run diverged from the identical run at iteration 5: cuBLAS may split reductions differently
with a larger workspace, attention backward kernels accumulate dQ with atomics, and cuDNN/Inductor may
benchmark and pick different kernels per run. In this mode, as Megatron's --deterministic-mode does:

* CUBLAS_WORKSPACE_CONFIG=:4096:8 (cuBLAS' reproducible workspace) and NCCL_ALGO=Ring (a reduction order
  fixed by the topology), set before CUDA or NCCL start; a launcher's own value must be one of those known
  to be deterministic, else the run is refused;
* torch.use_deterministic_algorithms(True): PyTorch's flash attention runs its deterministic backward, and
  an operation without a deterministic kernel raises instead of silently varying;
* cuDNN deterministic, no cuDNN benchmarking; Inductor's deterministic mode (no on-device autotuning);
* attention: SDPA's flash kernel (then math); the cuDNN and memory-efficient kernels are not used (their
  backward is not deterministic) and asking for them is a config error; the flash-attn package gets its
  `deterministic=True` backward.

`apply` is called once at start-up, before the process group and any CUDA work, and returns what restores
the previous settings (for in-process callers such as the tests).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..errors import ConfigError

# variable -> (value to set if unset, values accepted if the launcher set it)
ENV = {"CUBLAS_WORKSPACE_CONFIG": (":4096:8", (":4096:8", ":16:8")),
       "NCCL_ALGO": ("Ring", ("Ring", "Tree", "^NVLS", "Ring,Tree", "Tree,Ring"))}


def apply(enabled: bool) -> Callable[[], None]:
    """Switch deterministic mode on (nothing happens when `enabled` is False); returns the undo."""
    if not enabled:
        return lambda: None
    for var, (default, accepted) in ENV.items():
        if os.environ.get(var, default) not in accepted:
            raise ConfigError(f"--deterministic-mode needs {var} in {list(accepted)} (or unset), "
                              f"got {os.environ[var]!r}")
    added = [var for var in ENV if var not in os.environ]
    for var in added:
        os.environ[var] = ENV[var][0]
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark, _inductor_deterministic(None))
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    _inductor_deterministic(True)

    def restore() -> None:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]
        _inductor_deterministic(before[4])
        for var in added:
            os.environ.pop(var, None)
    return restore


def _inductor_deterministic(value):
    """Read (value None) or set Inductor's `deterministic` switch, where this torch has one."""
    try:
        from torch._inductor import config
    except ImportError:   # a torch without Inductor
        return None
    if not hasattr(config, "deterministic"):
        return None
    if value is not None:
        config.deterministic = value
    return config.deterministic


def enabled() -> bool:
    """Whether this process runs in deterministic mode (read by the attention kernels' choice)."""
    return torch.are_deterministic_algorithms_enabled()
