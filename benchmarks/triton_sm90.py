"""Compile, on a machine without a GPU, every Triton kernel launch that a CPU check makes, for the H100 (sm_90).

Why: GPU time is scarce and sometimes not lent at all, while Triton's interpreter (`TRITON_INTERPRET=1`, the
`--check-cpu` modes of benchmarks/bias_grad_check.py and cross_entropy_probe.py) checks only a kernel's
arithmetic in numpy, not that Triton's compiler accepts it. This runs such a check once under the interpreter,
records each kernel launch (its arguments' types, its constexprs and launch options), then compiles each
distinct one through Triton's CUDA backend down to a cubin (without the launch-time specialisations: integer
arguments divisible by 16 or equal to 1, aligned pointers; so the PTX may differ a little), and counts the
approximate fp32 instructions in its PTX (`ex2.approx`, `div.full`: what the GPU's exp and division become).
It cannot say anything about speed, or about the arithmetic on the GPU.

    python benchmarks/triton_sm90.py benchmarks/bias_grad_check.py --check-cpu
(Triton with its bundled ptxas is needed; torch's CPU wheel does not bring it: `pip install triton`.)
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import runpy
import subprocess
import sys
import tempfile

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1", "float8_e4m3fn": "fp8e4nv",
           "float8_e5m2": "fp8e5"}


def _type(v) -> str:
    if v is None:
        return "constexpr"   # Triton specialises a None argument as a constexpr
    if hasattr(v, "dtype") and hasattr(v, "data_ptr"):
        return "*" + _DTYPES[str(v.dtype).removeprefix("torch.")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"an argument of type {type(v).__name__}")


def record(out: str, script: str, argv: list) -> None:
    """Run `script` under the interpreter, writing one JSON line per distinct launch to `out`."""
    from triton.runtime.interpreter import InterpretedFunction
    seen: dict = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        sig, consts = {}, {}
        for name, v in bound.arguments.items():
            if v is None or "constexpr" in str(params[name].annotation):
                sig[name], consts[name] = "constexpr", v
            else:
                sig[name] = _type(v)
        key = json.dumps([self.fn.__module__, self.fn.__name__, sig, consts, options], sort_keys=True)
        seen[key] = None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    InterpretedFunction.run = recording
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(out, "w") as f:
            f.writelines(k + "\n" for k in seen)


def compile_all(path: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target, failed = GPUTarget("cuda", 90, 32), 0
    with open(path) as f:
        launches = [json.loads(line) for line in f]
    for module, name, sig, consts, options in launches:
        ptrs = ",".join(sorted({t[1:] for t in sig.values() if t.startswith("*")}))
        what = f"{module}.{name} ({ptrs}) {consts} {options}"
        try:
            fn = getattr(importlib.import_module(module), name)   # a kernel of the checked script: FAIL, said why
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=options)
        except Exception as e:  # noqa: BLE001 -- Triton raises several types (front end, MLIR, ptxas); report all
            failed += 1
            print(f"FAIL {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        ptx = k.asm["ptx"]
        print(f"ok   {what}: cubin {len(k.asm['cubin']):,} B, ex2.approx {ptx.count('ex2.approx')}, "
              f"div.full {ptx.count('div.full')}")
    print(f"{len(launches)} distinct launches, {failed} failed to compile for sm_90")
    return 1 if failed or not launches else 0


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if sys.argv[1] == "--record":
        record(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(here), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.jsonl")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--record", out, *sys.argv[1:]], env=env,
                       check=True)
        sys.path.insert(0, os.path.dirname(here))
        return compile_all(out)


if __name__ == "__main__":
    sys.exit(main())
