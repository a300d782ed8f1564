"""The flat AdamW kernel (gpt3d/optim/adamw_triton.py) on the GPU: against its reference and torch's fused AdamW,
then timed against what the optimizer ran before (torch's fused AdamW with the gradient scale, then a copy of
the fp32 masters into the bf16 parameters).

    python benchmarks/adamw_check.py [--shape 1.3B] [--sweep]

Correctness: random piece layouts (gaps between pieces, odd sizes), bf16 parameters with fp32 masters and fp32
parameters, decoupled decay and Adam's L2 penalty, with and without a gradient scale, a skipped step among
four: the kernel must give the reference's bits (asserted), also reading direct half-precision gradients;
against torch's fused AdamW it prints the largest difference and how many elements differ. Timing: the pieces
of a GPT shape's parameters, one step of each path (CUDA events, median of 10), with the bytes each must move.
Exploratory: numbers that count go to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpt3d.optim import adamw_triton
from gpt3d.optim.adamw import FlatAdamW, Piece, block_table

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
DEFAULT = (adamw_triton.BLOCK, adamw_triton.WARPS)   # the kernel's own choice, timed first for every shape


def layout(sizes: list[int], gap: int = 0) -> tuple[list[Piece], int]:
    out, off, flat = [], 0, 0
    for i, n in enumerate(sizes):
        off += gap * (i % 3)
        out.append(Piece(off, flat, n, decay=i % 4 != 1))
        off, flat = off + n, flat + n
    return out, off + 5


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    rel = (d / b.double().abs().clamp_min(1e-30)).max().item() if d.numel() else 0.0
    return f"max abs {d.max().item() if d.numel() else 0:.3g} max rel {rel:.3g} differ {(a != b).sum().item()}"


def check() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1, 7, 2047, 2048, 2049, 65536, 3 * 2 ** 20 + 5, 17, 1_000_003]
    pieces, total = layout(sizes, gap=13)
    for separate in (True, False):
        for decoupled in (True, False):
            for scale in (None, 0.37):
                params = torch.randn(total, device="cuda", generator=g)
                params = params.to(torch.bfloat16) if separate else params
                ref = FlatAdamW(pieces, params.clone(), torch.float32, separate, BETAS, EPS, WD, decoupled)
                ker = FlatAdamW(pieces, params.clone(), torch.float32, separate, BETAS, EPS, WD, decoupled)
                ref._kernel = None
                assert ker._kernel is not None
                # torch's fused AdamW on per-piece fp32 copies; grad_scale and found_inf as GradScaler passes them
                masters = [torch.nn.Parameter(ker.master_view(i).clone()) for i in range(len(pieces))]
                groups = [{"params": [m for m, pc in zip(masters, pieces) if pc.decay], "weight_decay": WD},
                          {"params": [m for m, pc in zip(masters, pieces) if not pc.decay], "weight_decay": 0.0}]
                torch_opt = torch.optim.Adam(groups, lr=0.0, betas=BETAS, eps=EPS, fused=True,
                                             decoupled_weight_decay=decoupled)
                for step in range(4):
                    lr = 1e-3 * (step + 1)
                    grads = torch.randn(total, device="cuda", generator=g) * 10.0 ** (step - 3)
                    sc = None if scale is None else torch.tensor(scale, device="cuda")
                    inf = torch.tensor(float(step == 2), device="cuda")
                    kept = grads.clone()
                    ref.step(grads, lr, sc, inf)
                    ker.step(grads, lr, sc, inf)
                    assert torch.equal(grads, kept), "the kernel wrote the gradient buffer"
                    for m, pc in zip(masters, pieces):
                        m.grad = grads[pc.offset:pc.offset + pc.numel].clone()
                    for grp in torch_opt.param_groups:
                        grp["lr"] = lr
                    torch_opt.grad_scale, torch_opt.found_inf = sc, inf
                    torch_opt.step()
                torch.cuda.synchronize()
                tag = f"separate={separate} decoupled={decoupled} scale={scale}"
                for name in ("master", "exp_avg", "exp_avg_sq", "param_data", "steps"):
                    a, b = getattr(ker, name), getattr(ref, name)
                    if a.numel():
                        print(f"CHECK {tag} {name:10s} kernel vs reference: {_diff(a, b)}")
                        assert torch.equal(a, b), f"{tag}: the kernel's {name} is not the reference's"
                flat_torch = torch.cat([m.detach() for m in masters])
                mine = torch.cat([ker.master_view(i) for i in range(len(pieces))])
                print(f"CHECK {tag} master     kernel vs torch fused: {_diff(mine, flat_torch)}")
                assert ker.steps.tolist() == [3.0] * len(pieces)


def check_direct() -> None:
    """Direct gradients (gpt3d/optim/buckets.py direct_gradients): the kernel reading one half-precision gradient
    per piece at its address must give the bits of the kernel and of the reference reading the fp32 buffer that
    holds their exact copies; the gradient norm computed in fp32 from them must be the norm of the copies."""
    g = torch.Generator(device="cuda").manual_seed(1)
    sizes = [1, 7, 2047, 2048, 2049, 65536, 3 * 2 ** 20 + 5, 17, 1_000_003]
    pieces, total = layout(sizes, gap=13)
    for half in (torch.bfloat16, torch.float16):
        for decoupled in (True, False):
            for scale in (None, 0.37):
                params = torch.randn(total, device="cuda", generator=g).to(half)
                opts = [FlatAdamW(pieces, params.clone(), torch.float32, True, BETAS, EPS, WD, decoupled)
                        for _ in range(3)]
                opts[0]._kernel = None
                for step in range(3):
                    per_piece = [(torch.randn(pc.numel, device="cuda", generator=g) * 10.0 ** (step - 2)).to(half)
                                 for pc in pieces]
                    buffer = torch.full((total,), float("nan"), device="cuda")
                    for pc, gp in zip(pieces, per_piece):
                        buffer[pc.offset:pc.offset + pc.numel] = gp.float()
                    sc = None if scale is None else torch.tensor(scale, device="cuda")
                    inf = torch.tensor(float(step == 1), device="cuda")
                    opts[0].step(buffer, 1e-3, sc, inf)      # reference, buffer
                    opts[1].step(buffer, 1e-3, sc, inf)      # kernel, buffer
                    opts[2].step(per_piece, 1e-3, sc, inf)   # kernel, direct
                    a = torch.stack(torch._foreach_norm([buffer[pc.offset:pc.offset + pc.numel] for pc in pieces]))
                    b = torch.stack(torch._foreach_norm(per_piece, 2.0, dtype=torch.float32))
                    if not torch.equal(a, b):   # a reduction order of its own for 2-byte loads: reported
                        print(f"NORM {half} step {step}: fp32-from-half vs fp32 copies: {_diff(b, a)}")
                torch.cuda.synchronize()
                tag = f"direct {half} decoupled={decoupled} scale={scale}"
                for name in ("master", "exp_avg", "exp_avg_sq", "param_data", "steps"):
                    for o in opts[1:]:
                        assert torch.equal(getattr(o, name), getattr(opts[0], name)), f"{tag}: {name} differs"
                print(f"CHECK {tag}: kernel (buffer, direct) = reference")


def gpt_sizes(shape: str) -> list[int]:
    if shape == "llama-1.5B":   # 16 layers, GQA (8 KV heads of 64), SwiGLU 8192, untied 128,256-token vocabulary
        h, f, v, kv = 2048, 8192, 128256, 512
        return [v * h] + [h, (h + 2 * kv) * h, h * h, h, f * h, f * h, h * f] * 16 + [h, v * h]
    layers, h, v = {"125M": (12, 768, 50304), "1.3B": (24, 2048, 50304), "2.7B": (32, 2560, 50304)}[shape]
    per = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
    return [v * h, 2048 * h] + per * layers + [h, h]


def _timed(fn, reps: int = 10) -> float:
    """Median milliseconds of `fn` over `reps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[reps // 2]


def _before(pieces: list[Piece], grads: torch.Tensor, params: torch.Tensor, scale: torch.Tensor,
            inf: torch.Tensor) -> float:
    """The optimizer before: per-piece fp32 masters, torch's fused AdamW with grad_scale (which writes the
    unscaled gradients back), then the masters copied into the bf16 parameters."""
    masters = [torch.nn.Parameter(params[pc.offset:pc.offset + pc.numel].float()) for pc in pieces]
    for m, pc in zip(masters, pieces):
        m.grad = grads[pc.offset:pc.offset + pc.numel]
    opt = torch.optim.Adam([{"params": masters, "weight_decay": WD}], lr=1e-4, betas=BETAS, eps=EPS, fused=True,
                           decoupled_weight_decay=True)
    outs = [params[pc.offset:pc.offset + pc.numel] for pc in pieces]
    plain = [m.detach() for m in masters]

    def step():
        opt.grad_scale, opt.found_inf = scale, inf
        opt.step()
        torch._foreach_copy_(outs, plain)
    return _timed(step)


def bench(shape: str, sweep: bool) -> None:
    sizes = gpt_sizes(shape)
    pieces, total = layout(sizes)
    n = sum(sizes)
    grads = torch.randn(total, device="cuda") * 1e-3
    params = torch.randn(total, device="cuda").to(torch.bfloat16)
    scale = torch.tensor(1.7, device="cuda")
    inf = torch.zeros((), device="cuda")

    t_before = _before(pieces, grads, params, scale, inf)
    torch.cuda.empty_cache()
    opt = FlatAdamW(pieces, params, torch.float32, True, BETAS, EPS, WD, True)
    configs = [DEFAULT]
    if sweep:
        configs += [(1024, 4), (2048, 4), (4096, 8), (4096, 16), (8192, 16)]
    gb = n * 30 / 1e9   # read grad, master, m, v (16 B); write master, m, v (12 B) and bf16 param (2 B)
    print(f"BENCH {shape}: {n / 1e9:.3f}B elements in {len(pieces)} pieces; before (torch fused AdamW + copy) "
          f"{t_before:.2f} ms ({n * 38 / 1e9 / t_before:.2f} TB/s of its 38 B/element)")
    per_piece = [grads[pc.offset:pc.offset + pc.numel].to(torch.bfloat16) for pc in pieces]   # direct gradients
    for block, warps in configs:
        adamw_triton.BLOCK, adamw_triton.WARPS = block, warps
        opt._blocks = tuple(t.cuda() for t in block_table(pieces, block))
        t = _timed(lambda: opt.step(grads, 1e-4, scale, inf))
        t_direct = _timed(lambda: opt.step(per_piece, 1e-4, scale, inf))
        print(f"BENCH {shape}: flat kernel BLOCK={block} warps={warps}: {t:.2f} ms ({gb / t:.2f} TB/s of 30 "
              f"B/element), {t_before / t:.2f}x before; direct bf16 gradients {t_direct:.2f} ms "
              f"({n * 28 / 1e9 / t_direct:.2f} TB/s of 28 B/element)")
    adamw_triton.BLOCK, adamw_triton.WARPS = DEFAULT
    opt._blocks = None
    fp32_views = [grads[pc.offset:pc.offset + pc.numel] for pc in pieces]
    t_norm = _timed(lambda: torch._foreach_norm(fp32_views, 2.0))
    t_norm_direct = _timed(lambda: torch._foreach_norm(per_piece, 2.0, dtype=torch.float32))
    print(f"BENCH {shape}: gradient norm {t_norm:.2f} ms from fp32, {t_norm_direct:.2f} ms from bf16 (direct)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="*", default=["1.3B"])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if not a.no_check:
        check()
        check_direct()
    for s in a.shape:
        bench(s, a.sweep)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
