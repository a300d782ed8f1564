"""Does any cuDNN execution plan run causal attention with dropout faster than the one PyTorch's SDPA picks?

Why: attention dropout 0.1 is what keeps `gpt3d train` with the seed's dropout below 0.97x of dropout 0
(benchmarks/RESULTS.md, 2026-12-06 session 33: cuDNN's forward with dropout takes 2.1x its time without).
PyTorch builds one cuDNN graph per call with the heuristics' first plan. This probe builds the same forward
and backward graphs through cudnn-frontend's Python API (`pip install nvidia-cudnn-frontend`), asks the
heuristics (modes A, B and the fallback) for every plan, and times each against SDPA's cuDNN path, with and
without dropout, at the bench shapes' attention ([batch, heads, kv heads, seq, head dim]).

    python benchmarks/cudnn_dropout_plans.py [--p 0.1] [--reps 10]

Exploratory: prints one line per (shape, pass, p, plan).
"""
from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_timing import median_ms   # benchmarks/, run as `python benchmarks/<script>.py`

SHAPES = {"1.3B": (8, 16, 16, 2048, 128), "125M": (16, 12, 12, 2048, 64), "llama-1.5B": (4, 32, 8, 2048, 64)}


def _forward_backward(attend, inputs):
    o = attend()
    return torch.autograd.grad(o, inputs, torch.ones_like(o))


def bshd(b, h, s, d):
    """[b, h, s, d] view of [b, s, h, d] memory: how gpt3d hands q, k, v to SDPA."""
    return torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def _graph(handle):
    """An empty cuDNN graph for bf16 attention computed in fp32."""
    import cudnn
    f32 = cudnn.data_type.FLOAT
    return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=f32, compute_data_type=f32,
                         handle=handle)


def plans(graph, pack, reps, label):
    import cudnn
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    n = graph.get_execution_plan_count()
    print(f"{label}: {n} plans", flush=True)
    for i in range(n):
        try:
            graph.build_plan_at_index(i)
            ws = torch.empty(max(1, graph.get_workspace_size_plan_at_index(i)), device="cuda", dtype=torch.uint8)
            ms = median_ms(functools.partial(graph.execute_plan_at_index, pack, ws, index=i), reps)
            print(f"  plan {i} {graph.get_plan_name_at_index(i)}: {ms:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a plan that does not build is reported, not fatal
            print(f"  plan {i}: {type(e).__name__}: {str(e)[:160]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    a = ap.parse_args()
    import cudnn
    print("cudnn backend", cudnn.backend_version_string(), "torch", torch.__version__, torch.cuda.get_device_name())
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    for name in a.shapes:
        b, h, hk, s, d = SHAPES[name]
        q, k, v = bshd(b, h, s, d), bshd(b, hk, s, d), bshd(b, hk, s, d)
        scale = d ** -0.5
        for p in (0.0, a.p):
            # SDPA's cuDNN path, forward and forward + backward (K/V expanded where grouped: SDPA's cuDNN needs it)
            kk, vv = (k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)) if hk != h else (k, v)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, kk, vv))
            attend = functools.partial(F.scaled_dot_product_attention, qg, kg, vg, dropout_p=p, is_causal=True)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                fwd = median_ms(attend, a.reps)
                both = median_ms(functools.partial(_forward_backward, attend, (qg, kg, vg)), a.reps)
            print(f"{name} p={p}: SDPA cuDNN forward {fwd:.3f} ms, forward+backward {both:.3f} ms", flush=True)
            drop = p > 0
            seed = torch.full((1, 1, 1, 1), 1234, dtype=torch.int64, device="cuda")
            off = torch.full((1, 1, 1, 1), 0, dtype=torch.int64, device="cuda")
            o = torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            stats = torch.empty(b, h, s, 1, device="cuda", dtype=torch.float32)
            try:
                gf = _graph(handle)
                tq, tk, tv = gf.tensor_like(q), gf.tensor_like(k), gf.tensor_like(v)
                ts, to = (gf.tensor_like(seed), gf.tensor_like(off)) if drop else (None, None)
                out, st = gf.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                                  use_causal_mask=True, dropout=(p, ts, to) if drop else None)
                out.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
                st.set_output(True).set_data_type(cudnn.data_type.FLOAT)
                pack = {tq: q, tk: k, tv: v, out: o, st: stats}
                if drop:
                    pack.update({ts: seed, to: off})
                plans(gf, pack, a.reps, f"{name} p={p} forward")
            except Exception as e:  # noqa: BLE001
                print(f"{name} p={p} forward graph: {type(e).__name__}: {str(e)[:200]}", flush=True)
            try:
                gb = _graph(handle)
                dout = torch.randn_like(o)
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                tq, tk, tv, tob, tdo, tst = (gb.tensor_like(x) for x in (q, k, v, o, dout, stats))
                ts, to = (gb.tensor_like(seed), gb.tensor_like(off)) if drop else (None, None)
                gq, gk, gv = gb.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=tob, dO=tdo, stats=tst,
                                              attn_scale=scale, use_causal_mask=True,
                                              dropout=(p, ts, to) if drop else None)
                for tt, x in ((gq, dq), (gk, dk), (gv, dv)):
                    tt.set_output(True).set_dim(list(x.shape)).set_stride(list(x.stride()))
                pack = {tq: q, tk: k, tv: v, tob: o, tdo: dout, tst: stats, gq: dq, gk: dk, gv: dv}
                if drop:
                    pack.update({ts: seed, to: off})
                plans(gb, pack, a.reps, f"{name} p={p} backward")
            except Exception as e:  # noqa: BLE001
                print(f"{name} p={p} backward graph: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
