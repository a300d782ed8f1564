"""The planner's parameter list is the model's: for any small model, TP degree, sequence parallelism, pipeline
position and set of layers, `plan.memory.chunk_params` (read from a one-layer chunk built on the meta device,
its layer repeated under each id) equals the `named_parameters()` of the chunk gpt3d trains, built for real on
the CPU at any TP rank: names in registration order (the optimizer's bucket order), element counts and the
typed metadata (split dim, init, sequence-parallel, tied copy, shared embedding) that buckets read, and the
gradient-accumulation fusion's marks that the planner's gradient-accumulation time reads (as training sets them
without FP8)."""
from __future__ import annotations

from hypothesis import given, strategies as st

from tests.support.fuzz import fuzz

from gpt3d.model.gpt import GPTModel
from gpt3d.model.grad_accumulation import enable_grad_accumulation_fusion
from gpt3d.parallel.param_meta import param_meta
from gpt3d.parallel.random import seed_everything
from gpt3d.parallel.state import ParallelState
from gpt3d.plan.memory import chunk_params

from tests.support.curves import tiny_config


@st.composite
def chunks(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    groups = draw(st.integers(1, 2))                 # KV heads per TP rank
    heads = tp * groups * draw(st.sampled_from([1, 2]))   # query heads: a multiple of the KV heads
    kv = draw(st.sampled_from([None, tp * groups]))
    swiglu = draw(st.booleans())
    hidden = heads * draw(st.sampled_from([2, 4]))
    ffn = draw(st.one_of(st.none(), st.integers(1, 6).map(lambda k: k * tp)))   # None: 4 x hidden here
    layers = draw(st.integers(1, 4))
    model = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                 ffn_hidden_size=ffn, swiglu=swiglu, disable_bias_linear=draw(st.booleans()),
                 normalization=draw(st.sampled_from(["layernorm", "rmsnorm"])),
                 untie_embeddings_and_output_weights=draw(st.booleans()),
                 use_rotary_position_embeddings=draw(st.booleans()),
                 add_position_embedding=draw(st.sampled_from([None, True, False])),
                 max_position_embeddings=draw(st.sampled_from([None, 24])),
                 make_vocab_size_divisible_by=draw(st.sampled_from([1, 8, 128])))
    ids = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers).map(sorted))
    return dict(model=model, vocab=draw(st.integers(1, 300)), tp=tp, tp_rank=draw(st.integers(0, tp - 1)),
                sp=draw(st.booleans()), ids=ids, pre=draw(st.booleans()), post=draw(st.booleans()))


@fuzz(80)
@given(chunks())
def test_the_planners_parameter_list_is_the_real_models(c):
    m = tiny_config(**c["model"]).model
    ps = ParallelState(tp=c["tp"], pp=2, rank=c["tp_rank"], sequence_parallel=c["sp"])
    model = GPTModel(m, ps, seed_everything(1, ps), vocab_size=c["vocab"], layer_ids=c["ids"],
                     pre_process=c["pre"], post_process=c["post"])
    enable_grad_accumulation_fusion(model)   # as model/build.py's build_model_chunks does by default
    want = [(n, p.numel(), param_meta(p)) for n, p in model.named_parameters()]
    got = [(p.name, p.numel, p.meta) for p in chunk_params(m, c["vocab"], c["tp"], c["sp"], c["ids"], c["pre"],
                                                           c["post"])]
    assert got == want
