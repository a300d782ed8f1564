"""The planner's GeLU-epilogue term (gpt3d/plan/timing.py, presets.GELU_EPILOGUE_EW_SHARE): where training runs the
MLP's GeLU and GeLU' in the fc1 GEMMs' epilogues (model/build.gelu_epilogues), only that share of the MLP
intermediates' elementwise traffic is charged; the rule agrees with the function the model installs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model import quack_gemm
from gpt3d.model.bias_grad import FusedGeluMLP
from gpt3d.model.build import gelu_epilogues
from gpt3d.model.gpt import MLP
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from gpt3d.plan.layout import layout_of
from gpt3d.plan.presets import EW_PASSES, GELU_EPILOGUE_EW_SHARE, resolve_gpu
from gpt3d.plan.search import predict_layout

from tests.support.curves import tiny_config

H100 = resolve_gpu("h100-80gb")
MBS, SEQ, LAYERS, MICRO = 2, 128, 4, 2


def _cfg(bf16: bool = True, **kw):
    return tiny_config(num_layers=LAYERS, micro_batch_size=MBS, global_batch_size=MBS * MICRO, seq_length=SEQ,
                       max_position_embeddings=SEQ, bf16=bf16, compile=True, **kw)


@fuzz(40)
@given(swiglu=st.booleans(), no_bias=st.booleans(), tanh=st.booleans(),
       switch=st.sampled_from([None, "fp16", "fp32", "no fusion", "no tuning", "deterministic"]))
@example(swiglu=False, no_bias=False, tanh=True, switch="deterministic")
@example(swiglu=False, no_bias=True, tanh=True, switch=None)
def test_the_rule_is_what_training_installs(swiglu, no_bias, tanh, switch):
    """`gelu_epilogues` is true exactly where build_model_chunks, as on a CUDA machine with Triton and the gpu
    extra (the two `applies` checks answer by dtype, as they do there), gives every MLP the fused GeLU function
    with the tanh GeLU on the cuBLASLt path (the one whose GeLU runs in GEMM epilogues). `switch`: bf16 with the
    defaults, or one thing changed."""
    import gpt3d.model.build as build
    half = (torch.bfloat16, torch.float16)
    cfg = tiny_config(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=256,
                      compile=False, swiglu=swiglu, disable_bias_linear=no_bias,
                      gelu_approximation="tanh" if tanh else "none", bf16=switch not in ("fp16", "fp32"),
                      fp16=switch == "fp16", bias_grad_fusion=switch != "no fusion", gemm_tuning=switch != "no tuning",
                      deterministic_mode=switch == "deterministic")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "cublaslt_applies", lambda d, t: t in half)
        mp.setattr(build, "bias_grad_fusion_applies", lambda d, t: t in half)
        ps = ParallelState()
        (m,) = build.build_model_chunks(cfg, ps, seed_everything(1, ps), vocab_size=256).chunks
    fused = [x._fused for x in m.modules() if isinstance(x, MLP)]
    assert fused and gelu_epilogues(cfg) == all(isinstance(f, FusedGeluMLP) and f.tanh and f.lt for f in fused)


@fuzz(12)
@given(hidden=st.sampled_from([32, 64]), ffn=st.sampled_from([None, 96, 200]))
def test_only_the_share_of_the_mlp_intermediates_is_charged(hidden, ffn):
    """With quack-kernels installed, the layers' compute time drops by (1 - share) of EW_PASSES x the GeLU MLP's
    two [tokens, ffn] intermediates at the calibrated elementwise speed, per layer and micro-batch; nothing else
    moves (but the host-bound idle time, which is what the host takes beyond the GPU). Without it, nothing."""
    on = _cfg(hidden_size=hidden, ffn_hidden_size=ffn)
    off = _cfg(hidden_size=hidden, ffn_hidden_size=ffn, gemm_tuning=False)
    def predict(c, quack: bool):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quack_gemm, "installed", lambda: quack)
            return predict_layout(c, layout_of(c, 1), H100, vocab_size=256)
    p_on, p_off = predict(on, True), predict(off, True)
    assert predict(on, False).time.seconds == p_off.time.seconds   # without quack: cuBLASLt's, not modelled
    f = on.model.ffn_size
    intermediates = 2 * 2 * MBS * SEQ * f   # bf16: the pre-activation and the GeLU output
    want = LAYERS * MICRO * EW_PASSES * (1 - GELU_EPILOGUE_EW_SHARE) * intermediates / (H100.calibration.ew_gbps * 1e9)
    got = p_off.time.parts["layers (compute)"] - p_on.time.parts["layers (compute)"]
    assert abs(got - want) <= 1e-9 * want
    def rest(p):
        return {k: v for k, v in p.time.parts.items() if k != "layers (compute)" and not k.startswith("host")}
    assert rest(p_on) == rest(p_off)
    a100 = resolve_gpu("a100")   # quack's kernels need sm_90: no credit for a GPU they do not run on
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quack_gemm, "installed", lambda: True)
        assert predict_layout(on, layout_of(on, 1), a100, vocab_size=256).time.parts == \
            predict_layout(off, layout_of(off, 1), a100, vocab_size=256).time.parts
