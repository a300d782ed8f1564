"""Each tensor-parallel layer equals its dense twin: outputs, input grads and weight grads (gloo, CPU)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt3d.config import ModelConfig, ParallelConfig
from gpt3d.model.gpt import GPTModel
from gpt3d.parallel.cross_entropy import vocab_parallel_cross_entropy
from gpt3d.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from gpt3d.parallel.param_meta import param_meta
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState, build_parallel_state

from tests.support import distributed

TOL = dict(atol=1e-5, rtol=1e-4)


def _ps(tp: int, sp: bool = False) -> ParallelState:
    world, rank = dist.get_world_size(), dist.get_rank()
    return build_parallel_state(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp), world, rank,
                                torch.device("cpu"))


def _close(a, b) -> float:
    return float((a - b).abs().max())


def _layer_cases(rank: int, world: int) -> dict:
    """Max abs differences between sharded and dense layers; the parent asserts they are ~0."""
    out = {}
    ps = _ps(world)
    torch.manual_seed(0)
    b, s, h, f, v = 2, 8, 16, 32, 40
    x = torch.randn(b, s, h)
    w1, b1 = torch.randn(f, h), torch.randn(f)
    w2, b2 = torch.randn(h, f), torch.randn(h)
    gy = torch.randn(b, s, h)

    # Column -> Row (Megatron MLP) vs dense.
    xd = x.clone().requires_grad_()
    yd = F.linear(F.gelu(F.linear(xd, w1, b1)), w2, b2)
    yd.backward(gy)
    col = ColumnParallelLinear(h, f, ps)
    row = RowParallelLinear(f, h, ps)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(world, 0)[ps.tp_rank])
        col.bias.copy_(b1.chunk(world, 0)[ps.tp_rank])
        row.weight.copy_(w2.chunk(world, 1)[ps.tp_rank])
        row.bias.copy_(b2)
    xt = x.clone().requires_grad_()
    yt = row(F.gelu(col(xt)))
    yt.backward(gy)
    out["mlp_out"] = _close(yt, yd)
    out["mlp_dx"] = _close(xt.grad, xd.grad)
    gw1, gw2 = _dense_weight_grads(x, w1, b1, w2, b2, gy)
    out["col_dw"] = _close(col.weight.grad, gw1.chunk(world, 0)[ps.tp_rank])
    out["row_dw"] = _close(row.weight.grad, gw2.chunk(world, 1)[ps.tp_rank])

    # Sequence parallel: input and output split along the sequence.
    sp = _ps(world, sp=True)
    col_s, row_s = ColumnParallelLinear(h, f, sp), RowParallelLinear(f, h, sp)
    col_s.load_state_dict(col.state_dict())
    row_s.load_state_dict(row.state_dict())
    xs = x.clone().requires_grad_()
    ys = row_s(F.gelu(col_s(xs.chunk(world, 1)[sp.tp_rank])))    # this rank's sequence shard
    ys.backward(gy.chunk(world, 1)[sp.tp_rank])
    out["sp_out"] = _close(ys, yd.detach().chunk(world, 1)[sp.tp_rank])
    dx = xs.grad.clone()
    dist.all_reduce(dx)   # each rank's input grad covers its own shard (zeros elsewhere)
    out["sp_dx"] = _close(dx, xd.grad)
    out["sp_col_dw"] = _close(col_s.weight.grad, col.weight.grad)
    bias_grad = row_s.bias.grad.clone()
    dist.all_reduce(bias_grad)  # sequence-parallel params: partial grads, summed over TP
    out["sp_bias_dw"] = _close(bias_grad, row.bias.grad)

    # Vocab-parallel embedding and cross entropy (with padded columns masked).
    ids = torch.randint(0, v, (b, s))
    table = torch.randn(v, h)
    ed = F.embedding(ids, table.requires_grad_())
    ed.backward(gy)
    emb = VocabParallelEmbedding(v, h, ps)
    with torch.no_grad():
        emb.weight.copy_(table.detach().chunk(world, 0)[ps.tp_rank])
    et = emb(ids)
    et.backward(gy)
    out["emb_out"] = _close(et, ed)
    out["emb_dw"] = _close(emb.weight.grad, table.grad.chunk(world, 0)[ps.tp_rank])

    real_vocab = v - 3
    logits = torch.randn(b, s, v)
    labels = torch.randint(0, real_vocab, (b, s))
    ld = logits.clone().requires_grad_()
    lossd = F.cross_entropy(ld[..., :real_vocab].reshape(-1, real_vocab), labels.reshape(-1), reduction="none")
    lossd.sum().backward()
    lt = logits.chunk(world, -1)[ps.tp_rank].clone().requires_grad_()
    losst = vocab_parallel_cross_entropy(lt, labels, real_vocab, ps)
    losst.sum().backward()
    out["ce_loss"] = _close(losst.reshape(-1), lossd)
    out["ce_grad"] = _close(lt.grad, ld.grad.chunk(world, -1)[ps.tp_rank])
    return out


def _dense_weight_grads(x, w1, b1, w2, b2, gy):
    w1, w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).backward(gy)
    return w1.grad, w2.grad


def _model_case(rank: int, world: int, kw: dict, sp: bool, fusions: str = "") -> dict:
    """Whole GPT at TP=world vs TP=1 built in the same process: same init, same loss, same grads. With "bg" in
    `fusions` the TP model's biased GeLU MLPs and QKV linears run gpt3d/model/bias_grad.py's functions, with "lt"
    its GEMMs go through gpt3d/model/cublaslt.py's ops (here their torch references run; the Triton kernels and
    cuBLASLt on a GPU)."""
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                      attention_dropout=0.0, **kw)
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    dense_ps = ParallelState()
    dense = GPTModel(cfg, dense_ps, seed_everything(5, dense_ps), vocab_size=1000)
    dense.init_weights(5)
    ld = dense(tokens[:, :-1], tokens[:, 1:]).mean()
    ld.backward()
    ps = _ps(world, sp=sp)
    model = GPTModel(cfg, ps, seed_everything(5, ps), vocab_size=1000)
    model.init_weights(5)
    if "bg" in fusions:
        from gpt3d.model.bias_grad import enable_bias_grad_fusion
        assert enable_bias_grad_fusion(model, "lt" in fusions) == 2 * cfg.num_layers
    if "lt" in fusions:
        from gpt3d.model.cublaslt import enable_cublaslt
        assert enable_cublaslt(model) > 0
    lt = model(tokens[:, :-1], tokens[:, 1:]).mean()
    lt.backward()
    worst = 0.0
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        d = dense_params[name]
        grad = p.grad.clone()
        if param_meta(p).sequence_parallel and ps.sp:
            dist.all_reduce(grad)
        rows = min(d.shape[0], 1000) if "word_embeddings" in name else None
        split = param_meta(p).split_dim
        if split is not None:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach())
            full_w = torch.cat(parts, split)
            gparts = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(gparts, grad)
            full_g = torch.cat(gparts, split)
        else:
            full_w, full_g = p.detach(), grad
        if rows:
            full_w, full_g, d_w, d_g = full_w[:rows], full_g[:rows], d.detach()[:rows], d.grad[:rows]
        else:
            d_w, d_g = d.detach(), d.grad
        worst = max(worst, _close(full_w, d_w) * 1e3, _close(full_g, d_g))
    return {"loss": _close(lt, ld), "worst": worst}


@functools.cache
def _layers(world: int) -> tuple:
    return tuple(distributed.run(world, _layer_cases))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_layers_match_dense(world):
    for rank_result in _layers(world):
        for key, diff in rank_result.items():
            assert diff < 1e-4, f"{key}: sharded differs from dense by {diff} at TP={world}"


LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, num_key_value_heads=2,
             disable_bias_linear=True)
MODEL_CASES = [
    ({}, False, ""),
    ({}, True, ""),
    (LLAMA, True, ""),
    ({}, False, "bg"),
    (dict(num_key_value_heads=2), True, "bg"),
    ({}, True, "bg+lt"),
    (LLAMA, True, "lt"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kw,sp,fusions", MODEL_CASES,
                         ids=["gpt", "gpt-sp", "llama-gqa-sp", "gpt-bias-grad-fusion", "gpt-gqa-sp-bias-grad-fusion",
                              "gpt-sp-bias-grad-fusion-cublaslt", "llama-gqa-sp-cublaslt"])
def test_gpt_tp2_equals_tp1(kw, sp, fusions):
    for r in distributed.run(2, _model_case, kw, sp, fusions):
        assert r["loss"] < 1e-5, r
        assert r["worst"] < 1e-4, r


def test_tp_must_divide_heads():
    from gpt3d.config import Config
    from gpt3d.errors import ConfigError
    cfg = Config()
    cfg.model.num_attention_heads, cfg.model.hidden_size = 6, 96
    cfg.parallel.tensor_model_parallel_size = 4
    cfg.data.mock_data = True
    cfg.training.train_iters = 1
    with pytest.raises(ConfigError, match="TP size 4 must divide --num-attention-heads"):
        cfg.validate(world_size=4)
