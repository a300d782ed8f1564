"""Advice before the run (gpt3d/plan/advice.py): the same optimisation, faster, and applied only when asked.

The advice path needs a GPU to plan for; on the CPU the test hands `gpt3d train`'s Trainer the planner's H100
preset (`plan_gpu`), so what a GPU run prints and applies is exercised here, then trained on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.plan.advice import HEADROOM, MIN_GAIN, advise
from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import resolve_gpu
from gpt3d.train import Trainer

from tests.support.curves import run_curve, tiny_config

H100 = resolve_gpu("h100-80gb")


@fuzz(25)
@given(mbs=st.sampled_from([1, 2, 4]), micro=st.sampled_from([1, 2, 4, 8]),
       recompute=st.sampled_from([None, "selective", "full"]), layers=st.sampled_from([2, 4]))
def test_advice_keeps_the_optimisation(mbs, micro, recompute, layers):
    """Whatever it suggests: the same global batch and parallel layout, only recompute and micro-batch size
    moved, predicted to fit with headroom and at least MIN_GAIN faster; applying it gives exactly that config."""
    cfg = tiny_config(micro_batch_size=mbs, global_batch_size=mbs * micro, recompute_granularity=recompute,
                      num_layers=layers)
    a = advise(cfg, 1, H100, 8, vocab_size=256)
    if a is None:
        return
    own, new = a.current.layout, a.better.layout
    assert (new.tp, new.pp, new.dp, new.vp, new.sp, new.zero) == (own.tp, own.pp, own.dp, own.vp, own.sp, own.zero)
    assert new.mbs * new.num_micro == own.mbs * own.num_micro
    assert a.gain >= MIN_GAIN and a.better.peak_bytes <= HEADROOM * a.better.usable_bytes
    assert layout_of(a.apply(cfg), 1) == new
    assert " ".join(a.flags) in a.line()


def _trainer(cfg, gpu):
    class OnGpu(Trainer):
        def plan_gpu(self, ps):
            return gpu
    return OnGpu(cfg)


@pytest.mark.parametrize("tune", [False, True])
def test_train_prints_the_advice_and_applies_it_only_when_asked(tune, capsys, tmp_path):
    """A host-bound tiny model at 8 micro-batches of 1 with full recompute: the H100 plan says 1 micro-batch of
    8 without recompute. Printed at start; --auto-tune-layout runs it, and the curve is the same (fp32, no
    dropout: the regrouped micro-batches sum the same per-sample gradients)."""
    base = dict(micro_batch_size=1, global_batch_size=8, recompute_granularity="full", train_iters=4,
                eval_interval=1000, eval_iters=1, log_file=str(tmp_path / "m.jsonl"))
    t = _trainer(tiny_config(auto_tune_layout=tune, **base), (H100, 8))
    t.run()
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "--recompute-granularity none --micro-batch-size 8" in x]
    assert len(line) == 1 and ("applied (--auto-tune-layout)" in line[0]) is tune, out
    assert (t.cfg.training.micro_batch_size, t.cfg.model.recompute_granularity, t.num_micro) == \
        ((8, None, 1) if tune else (1, "full", 8))
    if tune:   # the same optimisation: the curve of the run as configured
        tuned_trainer = _trainer(tiny_config(auto_tune_layout=True, **base), (H100, 8))
        tuned = run_curve(tuned_trainer.cfg, trainer=tuned_trainer, iters=4)
        plain = run_curve(tiny_config(**base), iters=4)
        assert torch.allclose(torch.tensor(tuned["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=0)


def test_no_advice_off_the_gpu(capsys, tmp_path):
    """On the CPU nothing is planned: --auto-tune-layout says it keeps the layout, and does."""
    t = Trainer(tiny_config(micro_batch_size=1, global_batch_size=8, recompute_granularity="full",
                            auto_tune_layout=True, train_iters=1, eval_iters=1, log_file=str(tmp_path / "m.jsonl")))
    assert t.advice is None and t.plan is None and t.num_micro == 8
    t.run()
    assert "--auto-tune-layout: no GPU to plan for; the run keeps its layout" in capsys.readouterr().out
