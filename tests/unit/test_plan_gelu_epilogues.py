"""The planner's GeLU-epilogue term (gpt3d/plan/timing.py, presets.GELU_EPILOGUE_EW_SHARE): where training runs the
MLP's GeLU and GeLU' in the fc1 GEMMs' epilogues (model/build.gelu_epilogues), only that share of the MLP
intermediates' elementwise traffic is charged; the rule agrees with the function the model installs."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpt3d.model.bias_grad import FusedGeluMLP, enable_bias_grad_fusion
from gpt3d.model.build import gelu_epilogues
from gpt3d.model.gpt import MLP, GPTModel
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


@settings(max_examples=24, deadline=None)
@given(swiglu=st.booleans(), no_bias=st.booleans(), tanh=st.booleans())
def test_the_rule_names_the_mlps_that_get_the_fused_gelu(swiglu, no_bias, tanh):
    """With the switches on, `gelu_epilogues` is true exactly where enable_bias_grad_fusion gives the MLP the fused
    GeLU function with the tanh GeLU (the one model/cublaslt.py's epilogues serve)."""
    cfg = _cfg(swiglu=swiglu, disable_bias_linear=no_bias, gelu_approximation="tanh" if tanh else "none")
    ps = ParallelState()
    m = GPTModel(cfg.model, ps, seed_everything(1, ps), vocab_size=256, layer_ids=[0])
    enable_bias_grad_fusion(m, lt=True)
    fused = [x._fused for x in m.modules() if isinstance(x, MLP)]
    assert gelu_epilogues(cfg) == all(isinstance(f, FusedGeluMLP) and f.tanh for f in fused)


@given(off=st.sampled_from([dict(bias_grad_fusion=False), dict(gemm_tuning=False), dict(deterministic_mode=True),
                            dict(bf16=False)]))
def test_any_switch_off_means_no_epilogues(off):
    assert gelu_epilogues(_cfg()) and not gelu_epilogues(_cfg(**off))


@settings(max_examples=12, deadline=None)
@given(hidden=st.sampled_from([32, 64]), ffn=st.sampled_from([None, 96, 200]))
def test_only_the_share_of_the_mlp_intermediates_is_charged(hidden, ffn):
    """The layers' compute time drops by (1 - share) of EW_PASSES x the GeLU MLP's two [tokens, ffn] intermediates
    at the calibrated elementwise speed, per layer and micro-batch; nothing else moves (but the host-bound idle
    time, which is what the host takes beyond the GPU)."""
    on = _cfg(hidden_size=hidden, ffn_hidden_size=ffn)
    off = _cfg(hidden_size=hidden, ffn_hidden_size=ffn, gemm_tuning=False)
    p_on, p_off = (predict_layout(c, layout_of(c, 1), H100, vocab_size=256) for c in (on, off))
    f = on.model.ffn_size
    intermediates = 2 * 2 * MBS * SEQ * f   # bf16: the pre-activation and the GeLU output
    want = LAYERS * MICRO * EW_PASSES * (1 - GELU_EPILOGUE_EW_SHARE) * intermediates / (H100.calibration.ew_gbps * 1e9)
    got = p_off.time.parts["layers (compute)"] - p_on.time.parts["layers (compute)"]
    assert abs(got - want) <= 1e-9 * want
    def rest(p):
        return {k: v for k, v in p.time.parts.items() if k != "layers (compute)" and not k.startswith("host")}
    assert rest(p_on) == rest(p_off)
