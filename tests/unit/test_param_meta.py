"""Per-parameter metadata is one typed record (gpt3d/parallel/param_meta.py) read through one accessor: every
parameter gpt3d builds carries a ParamMeta and no loose attributes, and what reads it (init, the checkpoint
layout, the gradient buffer's late buckets) sees the same facts."""
from __future__ import annotations

import torch
import torch.nn as nn

from gpt3d.model.build import ModelChunks
from gpt3d.model.gpt import EMBEDDING, OUTPUT_LAYER, GPTModel
from gpt3d.optim.grad_buffer import GradBuffer
from gpt3d.parallel.param_meta import ParamMeta, param_meta, set_meta
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState

from tests.support.curves import tiny_config

LOOSE = {"tp_split_dim", "init", "sequence_parallel", "tied_to", "shared_embedding"}


def _stages(ps):
    cfg = tiny_config(num_layers=2).model
    first = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=50, layer_ids=[0], pre_process=True,
                     post_process=False)
    last = GPTModel(cfg, ps, seed_everything(1, ps), vocab_size=50, layer_ids=[1], pre_process=False,
                    post_process=True)
    return first, last


def test_every_parameter_has_typed_metadata_and_no_loose_attributes():
    ps = ParallelState(tp=1, pp=2, rank=0)
    first, last = _stages(ps)
    for m in (first, last):
        for name, p in m.named_parameters():
            assert isinstance(param_meta(p), ParamMeta) and "gpt3d_meta" in p.__dict__, name
            assert not LOOSE & set(p.__dict__), (name, LOOSE & set(p.__dict__))
    emb, head = dict(first.named_parameters())[EMBEDDING], dict(last.named_parameters())[OUTPUT_LAYER]
    assert param_meta(emb).shared_embedding and param_meta(emb).split_dim == 0
    assert param_meta(head).tied_to == EMBEDDING and param_meta(head).tied_across_stages
    first.init_weights(3)
    last.init_weights(3)
    assert torch.equal(emb, head)            # the tied copy is initialised like its original
    assert ModelChunks([last]).layout()[OUTPUT_LAYER]["tied_to"] == EMBEDDING
    late = {p for b in GradBuffer([last], ps).buckets if b.late for p in b.params}
    assert late == {head}                    # reduced with the first stage's embedding after backward


def test_a_plain_parameter_reads_as_replicated_and_set_meta_keeps_other_fields():
    p = nn.Parameter(torch.zeros(3))
    assert param_meta(p) == ParamMeta()
    set_meta(p, split_dim=1, init=("ones",))
    set_meta(p, sequence_parallel=True)
    assert param_meta(p) == ParamMeta(split_dim=1, init=("ones",), sequence_parallel=True)


def test_a_parameter_without_a_declared_init_is_refused_not_zeroed():
    """A layer that forgets `mark()` is a bug: init refuses it by name instead of silently zeroing the weight."""
    import pytest

    from gpt3d.parallel.layers import init_parameters

    model = nn.Linear(3, 2)
    set_meta(model.bias, init=("zeros",))
    with pytest.raises(RuntimeError, match="weight has no declared init"):
        init_parameters(model, 0, ParallelState.tp_rank_view(1, False, device=torch.device("cpu")))
    assert param_meta(model.weight).init is None
