"""The distributed optimizer's step equals torch's AdamW after clip_grad_norm_ (one process, fp32 and bf16)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gpt3d.config import OptimizerConfig
from gpt3d.optim.zero1 import DistributedOptimizer
from gpt3d.parallel.state import ParallelState


def _model(dtype) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8))
    for p in m.parameters():
        p.tp_split_dim = None
    return m.to(dtype)


@pytest.mark.parametrize("clip", [0.05, 100.0, 0.0])   # clipping active, inactive, disabled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_torch_adamw_with_clipping(clip, dtype):
    cfg = OptimizerConfig(weight_decay=0.1, clip_grad=clip)
    ours, ref = _model(dtype), _model(torch.float32)
    opt = DistributedOptimizer([ours], cfg, ParallelState())
    decay = [p for p in ref.parameters() if p.ndim > 1]
    no_decay = [p for p in ref.parameters() if p.ndim <= 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for step in range(4):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        ours(x.to(dtype)).float().pow(2).mean().backward()
        opt.finish_grad_sync()
        norm = opt.clip_and_step(1e-2)
        ref_opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip > 0 else float("inf"))
        ref_opt.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=tol, abs=tol)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    if dtype == torch.float32 and clip == 0.05:   # clipping really bound: the norm exceeded the threshold
        assert float(norm) > clip
