"""The schedules' interface: one forward_step, the loss reduced once, no_sync around all but the last backward.

Every pipelined layout is checked against one process in tests/distributed/test_layouts.py; this is the one-process
contract.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from gpt3d.parallel.pipeline import forward_backward
from gpt3d.parallel.state import ParallelState


def _setup():
    torch.manual_seed(0)
    chunk = nn.Linear(4, 1)
    mbs = [{"x": torch.randn(3, 4)} for _ in range(4)]
    return chunk, mbs


def _step(chunk, micro_batch, x):
    assert x is None   # no pipelining: nothing comes from a previous stage
    return None, chunk(micro_batch["x"]).pow(2).mean()


def test_forward_backward_gives_the_mean_loss_and_its_scaled_gradient():
    chunk, mbs = _setup()
    held = []

    @contextlib.contextmanager
    def no_sync():
        held.append(len(held))
        yield

    loss = forward_backward([chunk], mbs, ParallelState.single(), forward_step=_step, forward_only=False,
                            loss_scale=torch.tensor([8.0]), no_sync=no_sync)
    assert len(held) == 3            # every micro-batch's backward but the last one's
    ref, mbs_ref = _setup()
    ref_loss = torch.stack([_step(ref, mb, None)[1] for mb in mbs_ref]).mean()
    (ref_loss * 8.0).backward()
    assert torch.equal(loss, ref_loss.detach())
    torch.testing.assert_close(chunk.weight.grad, ref.weight.grad)


def test_forward_only_gives_the_mean_loss_and_no_gradients():
    chunk, mbs = _setup()
    with torch.no_grad():
        ref = torch.stack([_step(chunk, mb, None)[1] for mb in mbs]).mean()
    loss = forward_backward([chunk], mbs, ParallelState.single(), forward_step=_step, forward_only=True)
    assert torch.equal(loss, ref) and chunk.weight.grad is None
