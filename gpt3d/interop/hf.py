"""Hugging Face export: `gpt3d export-hf`, and the tensor mapping both directions use (import-hf's command,
which reads an untrusted directory, is hf_import.py).

Three HF architectures express gpt3d models exactly: the GPT-3/Megatron default (learned positions, LayerNorm,
tanh-GeLU, biases, multi-head) is `GPT2LMHeadModel`; the same with RoPE (any --rotary-percent) is
`GPTNeoXForCausalLM` (sequential residual); RoPE + RMSNorm + SwiGLU (+ GQA, + untied head) is
`LlamaForCausalLM`. Anything else would load into HF with silently different maths, so it is refused.
Only tensors are renamed, transposed (GPT-2's Conv1D stores [in, out]) and regrouped (gpt3d fuses Q/K/V per
key/value group, HF keeps Q, K, V apart or as [all Q, all K, all V]); no value is ever recomputed, so
import -> export returns the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from ..files import atomic
from ..config import Config
from ..errors import HFError
from ..model.build import DTYPES
from ..model.gpt import EMBEDDING, OUTPUT_LAYER, layer_prefix
from ..console.progress import Activity

HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----- architecture -----------------------------------------------------------------------------------------------
def hf_architecture(m: dict) -> str:
    """'gpt2', 'gpt_neox' or 'llama' for a gpt3d model config (as a dict), else HFError saying what does not fit."""
    kv = m.get("num_key_value_heads") or m["num_attention_heads"]
    rope, norm, swiglu = m["use_rotary_position_embeddings"], m["normalization"], m["swiglu"]
    if rope and m.get("add_position_embedding"):
        raise HFError("RoPE together with learned position embeddings (Megatron-DeepSpeed's default without "
                      "--no-position-embedding) has no Hugging Face equivalent")
    if norm == "layernorm" and not swiglu:   # GPT-2 (learned positions) or GPT-NeoX (RoPE, any rotary percent)
        name = "GPT-NeoX" if rope else "GPT-2"
        why = [w for c, w in [(m["disable_bias_linear"], f"--disable-bias-linear ({name} MLPs have biases)"),
                              (kv != m["num_attention_heads"], "grouped-query attention")] if c]
        if why:
            raise HFError(f"a {name}-style model with {' and '.join(why)} has no Hugging Face equivalent")
        return "gpt_neox" if rope else "gpt2"
    if rope and norm == "rmsnorm" and swiglu:
        if m["rotary_percent"] != 1.0:
            raise HFError(f"--rotary-percent {m['rotary_percent']} cannot be expressed in LlamaForCausalLM "
                          "(it rotates whole heads); export needs --rotary-percent 1.0")
        return "llama"
    raise HFError("exportable architectures: GPT-2 (learned positions + layernorm + GeLU), GPT-NeoX (RoPE + "
                  "layernorm + GeLU) and Llama (RoPE + rmsnorm + SwiGLU); this model has "
                  f"rope={rope} normalization={norm} swiglu={swiglu}")


def split_qkv(w: torch.Tensor, heads: int, kv: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gpt3d's fused rows [kv groups x (q heads of the group, k, v) x hd] -> Q [heads*hd], K, V [kv*hd]."""
    g = heads // kv
    x = w.reshape(kv, g + 2, hd, *w.shape[1:])
    q = x[:, :g].reshape(heads * hd, *w.shape[1:])
    return q, x[:, g].reshape(kv * hd, *w.shape[1:]), x[:, g + 1].reshape(kv * hd, *w.shape[1:])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv: int, hd: int) -> torch.Tensor:
    g = heads // kv
    rest = q.shape[1:]
    parts = [q.reshape(kv, g, hd, *rest), k.reshape(kv, 1, hd, *rest), v.reshape(kv, 1, hd, *rest)]
    return torch.cat(parts, dim=1).reshape((heads + 2 * kv) * hd, *rest)


# Per-layer tensor names (gpt3d module, HF module), used in both directions.
GPT2_NORMS = (("input_norm", "ln_1"), ("post_attention_norm", "ln_2"))
GPT2_LINEARS = (("attention.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))  # Conv1D
NEOX_LAYER = (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
              ("attention.qkv", "attention.query_key_value"), ("attention.proj", "attention.dense"),
              ("mlp.fc1", "mlp.dense_h_to_4h"), ("mlp.fc2", "mlp.dense_4h_to_h"))
LLAMA_LINEARS = (("attention.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.fc1", "mlp.up_proj"),
                 ("mlp.fc2", "mlp.down_proj"))


# ----- gpt3d -> HF ------------------------------------------------------------------------------------------------
def to_hf(m: dict, t: dict, vocab_size: int, eod: Optional[int]) -> tuple[dict, dict]:
    """(HF state dict, config.json dict) from full gpt3d tensors (padded vocab rows already cut)."""
    arch = hf_architecture(m)
    heads, h = m["num_attention_heads"], m["hidden_size"]
    kv, hd = m.get("num_key_value_heads") or heads, h // heads
    cfg = Config.from_dict({"model": m}).model
    tied = not m["untie_embeddings_and_output_weights"]
    gelu = "gelu" if m.get("gelu_approximation") == "none" else "gelu_new"   # exact erf, or tanh
    sd = {}
    if arch == "gpt2":
        sd["transformer.wte.weight"] = t[EMBEDDING]
        sd["transformer.wpe.weight"] = t["embedding.position_embeddings.weight"]
        for i in range(m["num_layers"]):
            src, dst = layer_prefix(i), f"transformer.h.{i}."
            for a, b in GPT2_NORMS:
                sd[f"{dst}{b}.weight"], sd[f"{dst}{b}.bias"] = t[f"{src}{a}.weight"], t[f"{src}{a}.bias"]
            for kind in ("weight", "bias"):
                fused = torch.cat(split_qkv(t[f"{src}attention.qkv.{kind}"], heads, kv, hd))
                sd[f"{dst}attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
            for a, b in GPT2_LINEARS:
                sd[f"{dst}{b}.weight"], sd[f"{dst}{b}.bias"] = t[f"{src}{a}.weight"].t(), t[f"{src}{a}.bias"]
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = t["final_norm.weight"], t["final_norm.bias"]
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
                  "n_positions": cfg.max_positions, "n_embd": h, "n_layer": m["num_layers"], "n_head": heads,
                  "n_inner": cfg.ffn_size, "activation_function": gelu,
                  "resid_pdrop": m["hidden_dropout"], "embd_pdrop": m["hidden_dropout"],
                  "attn_pdrop": m["attention_dropout"], "layer_norm_epsilon": m["layernorm_epsilon"],
                  "initializer_range": m["init_method_std"], "scale_attn_weights": True,
                  "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    elif arch == "gpt_neox":   # fused QKV per head [q, k, v]: gpt3d's layout when every head is its own group
        sd["gpt_neox.embed_in.weight"] = t[EMBEDDING]
        for i in range(m["num_layers"]):
            src, dst = layer_prefix(i), f"gpt_neox.layers.{i}."
            for a, b in NEOX_LAYER:
                sd[f"{dst}{b}.weight"], sd[f"{dst}{b}.bias"] = t[f"{src}{a}.weight"], t[f"{src}{a}.bias"]
        sd["gpt_neox.final_layer_norm.weight"] = t["final_norm.weight"]
        sd["gpt_neox.final_layer_norm.bias"] = t["final_norm.bias"]
        base, pct = float(m["rotary_base"]), m["rotary_percent"]
        config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab_size,
                  "hidden_size": h, "intermediate_size": cfg.ffn_size, "num_hidden_layers": m["num_layers"],
                  "num_attention_heads": heads, "hidden_act": gelu, "use_parallel_residual": False,
                  "max_position_embeddings": cfg.max_positions, "layer_norm_eps": m["layernorm_epsilon"],
                  "initializer_range": m["init_method_std"], "rotary_pct": pct, "rotary_emb_base": base,
                  "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": pct},
                  "attention_bias": True, "hidden_dropout": m["hidden_dropout"],
                  "attention_dropout": m["attention_dropout"]}
    else:
        bias = not m["disable_bias_linear"]
        sd["model.embed_tokens.weight"] = t[EMBEDDING]
        for i in range(m["num_layers"]):
            src, dst = layer_prefix(i), f"model.layers.{i}."
            sd[f"{dst}input_layernorm.weight"] = t[f"{src}input_norm.weight"]
            sd[f"{dst}post_attention_layernorm.weight"] = t[f"{src}post_attention_norm.weight"]
            for kind in ("weight", "bias") if bias else ("weight",):
                q, k, v = split_qkv(t[f"{src}attention.qkv.{kind}"], heads, kv, hd)
                sd[f"{dst}self_attn.q_proj.{kind}"], sd[f"{dst}self_attn.k_proj.{kind}"] = q, k
                sd[f"{dst}self_attn.v_proj.{kind}"] = v
                for a, b in LLAMA_LINEARS:
                    sd[f"{dst}{b}.{kind}"] = t[f"{src}{a}.{kind}"]
        sd["model.norm.weight"] = t["final_norm.weight"]
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
                  "hidden_size": h, "intermediate_size": cfg.ffn_size, "num_hidden_layers": m["num_layers"],
                  "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "hidden_act": "silu",
                  "max_position_embeddings": cfg.max_positions, "rms_norm_eps": m["layernorm_epsilon"],
                  "initializer_range": m["init_method_std"], "rope_theta": float(m["rotary_base"]),
                  "rope_parameters": {"rope_type": "default", "rope_theta": float(m["rotary_base"])},
                  "attention_bias": bias, "mlp_bias": bias, "attention_dropout": m["attention_dropout"]}
    head = "embed_out.weight" if arch == "gpt_neox" else "lm_head.weight"
    if not tied:
        sd[head] = t[OUTPUT_LAYER]
    config.update({"tie_word_embeddings": tied, "bos_token_id": eod, "eos_token_id": eod, "use_cache": True})
    return {k: v.contiguous() for k, v in sd.items()}, config


# ----- HF -> gpt3d ------------------------------------------------------------------------------------------------
def hf_model_config(c) -> dict:
    """The gpt3d model settings (a dict) of an HF config (hf_input.HFConfig: fields type-checked as read);
    HFError for a variant gpt3d cannot express exactly."""
    arch = c.get("model_type")
    if arch == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh") or c.get("scale_attn_by_inverse_layer_idx") or \
                c.get("reorder_and_upcast_attn") or c.get("scale_attn_weights", True) is False:
            raise HFError(f"GPT-2 variant not supported (activation {act}, attention scaling options)")
        h = c["n_embd"]
        m = {"num_layers": c["n_layer"], "hidden_size": h, "num_attention_heads": c["n_head"],
             "ffn_hidden_size": c.get("n_inner") or 4 * h, "seq_length": c["n_positions"],
             "max_position_embeddings": c["n_positions"], "layernorm_epsilon": c.get("layer_norm_epsilon", 1e-5),
             "hidden_dropout": c.get("resid_pdrop", 0.1), "attention_dropout": c.get("attn_pdrop", 0.1)}
    elif arch == "gpt_neox":
        rope = c.get("rope_parameters") or {}
        theta = rope.get("rope_theta", c.get("rotary_emb_base", 10000.0))
        pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
        why = [w for cond, w in [(c.get("use_parallel_residual", True), "parallel residual"),
                                 (c.get("hidden_act", "gelu") not in ("gelu_new", "gelu_pytorch_tanh"),
                                  f"hidden_act {c.get('hidden_act', 'gelu')} (gpt3d uses tanh GeLU)"),
                                 (not c.get("attention_bias", True), "no attention bias"),
                                 (rope.get("rope_type", "default") != "default", "RoPE scaling"),
                                 (not math.isfinite(theta) or float(theta) != int(theta),
                                  f"non-integer rotary base {theta}")] if cond]
        if why:
            raise HFError(f"GPT-NeoX variant not supported: {', '.join(why)}")
        m = {"num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
             "num_attention_heads": c["num_attention_heads"], "ffn_hidden_size": c["intermediate_size"],
             "seq_length": min(c["max_position_embeddings"], 4096),
             "max_position_embeddings": c["max_position_embeddings"], "use_rotary_position_embeddings": True,
             "rotary_base": int(theta), "rotary_percent": pct, "layernorm_epsilon": c.get("layer_norm_eps", 1e-5),
             "hidden_dropout": c.get("hidden_dropout", 0.0), "attention_dropout": c.get("attention_dropout", 0.0)}
    elif arch == "llama":
        h, heads = c["hidden_size"], c["num_attention_heads"]
        hd = c.get("head_dim") or (h // heads if heads else 0)
        rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        bias = c.get("attention_bias", False)
        why = [w for cond, w in [(c.get("hidden_act", "silu") != "silu", f"hidden_act {c.get('hidden_act')}"),
                                 (hd * heads != h, f"head_dim {hd} != hidden/heads"),
                                 (rope.get("rope_type", "default") != "default" or c.get("rope_scaling"),
                                  "RoPE scaling"),
                                 (not math.isfinite(theta) or float(theta) != int(theta),
                                  f"non-integer rope_theta {theta}"),
                                 (bias != c.get("mlp_bias", False), "attention_bias != mlp_bias")] if cond]
        if why:
            raise HFError(f"Llama variant not supported: {', '.join(why)}")
        m = {"num_layers": c["num_hidden_layers"], "hidden_size": h, "num_attention_heads": heads,
             "num_key_value_heads": c.get("num_key_value_heads") or heads,
             "ffn_hidden_size": c["intermediate_size"], "seq_length": min(c["max_position_embeddings"], 4096),
             "max_position_embeddings": c["max_position_embeddings"], "use_rotary_position_embeddings": True,
             "rotary_base": int(theta), "normalization": "rmsnorm", "swiglu": True,
             "layernorm_epsilon": c.get("rms_norm_eps", 1e-6), "disable_bias_linear": not bias,
             "hidden_dropout": 0.0, "attention_dropout": c.get("attention_dropout", 0.0)}
    else:
        raise HFError(f"model_type {arch!r} is not supported (gpt2, gpt_neox and llama are)")
    m.update({"vocab_size": c["vocab_size"], "init_method_std": c.get("initializer_range", 0.02),
              "untie_embeddings_and_output_weights": not c.get("tie_word_embeddings", arch == "gpt2")})
    return m


def from_hf(c, sd: dict) -> tuple[dict, dict]:
    """(gpt3d model config dict, full gpt3d tensors) from an HF config and state dict whose tensors have the
    shapes that config implies (import_hf checks them first)."""
    m = hf_model_config(c)
    arch, layers, h, heads = c.get("model_type"), m["num_layers"], m["hidden_size"], m["num_attention_heads"]
    t = {}
    if arch == "gpt2":
        p = "transformer." if "transformer.wte.weight" in sd else ""
        t[EMBEDDING], t["embedding.position_embeddings.weight"] = sd[f"{p}wte.weight"], sd[f"{p}wpe.weight"]
        for i in range(layers):
            src, dst = f"{p}h.{i}.", layer_prefix(i)
            for a, b in GPT2_NORMS:
                t[f"{dst}{a}.weight"], t[f"{dst}{a}.bias"] = sd[f"{src}{b}.weight"], sd[f"{src}{b}.bias"]
            for kind in ("weight", "bias"):
                w = sd[f"{src}attn.c_attn.{kind}"]
                w = w.t() if kind == "weight" else w
                t[f"{dst}attention.qkv.{kind}"] = fuse_qkv(*w.chunk(3, dim=0), heads, heads, h // heads)
            for a, b in GPT2_LINEARS:
                t[f"{dst}{a}.weight"], t[f"{dst}{a}.bias"] = sd[f"{src}{b}.weight"].t(), sd[f"{src}{b}.bias"]
        t["final_norm.weight"], t["final_norm.bias"] = sd[f"{p}ln_f.weight"], sd[f"{p}ln_f.bias"]
    elif arch == "gpt_neox":
        t[EMBEDDING] = sd["gpt_neox.embed_in.weight"]
        for i in range(layers):
            src, dst = f"gpt_neox.layers.{i}.", layer_prefix(i)
            for a, b in NEOX_LAYER:
                t[f"{dst}{a}.weight"], t[f"{dst}{a}.bias"] = sd[f"{src}{b}.weight"], sd[f"{src}{b}.bias"]
        t["final_norm.weight"] = sd["gpt_neox.final_layer_norm.weight"]
        t["final_norm.bias"] = sd["gpt_neox.final_layer_norm.bias"]
    else:
        kv, hd = m["num_key_value_heads"], h // heads
        t[EMBEDDING] = sd["model.embed_tokens.weight"]
        for i in range(layers):
            src, dst = f"model.layers.{i}.", layer_prefix(i)
            t[f"{dst}input_norm.weight"] = sd[f"{src}input_layernorm.weight"]
            t[f"{dst}post_attention_norm.weight"] = sd[f"{src}post_attention_layernorm.weight"]
            for kind in ("weight",) if m["disable_bias_linear"] else ("weight", "bias"):
                t[f"{dst}attention.qkv.{kind}"] = fuse_qkv(*(sd[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"),
                                                           heads, kv, hd)
                for a, b in LLAMA_LINEARS:
                    t[f"{dst}{a}.{kind}"] = sd[f"{src}{b}.{kind}"]
        t["final_norm.weight"] = sd["model.norm.weight"]
    if m["untie_embeddings_and_output_weights"]:
        t[OUTPUT_LAYER] = sd["embed_out.weight" if "embed_out.weight" in sd else "lm_head.weight"]
    return m, {k: v.contiguous() for k, v in t.items()}


# ----- commands ---------------------------------------------------------------------------------------------------
def export_hf(load: str, output: str, dtype: str = "auto", vocab_file: Optional[str] = None,
              merge_file: Optional[str] = None, tokenizer_type: Optional[str] = None,
              tokenizer_model: Optional[str] = None) -> dict:
    from ..checkpoint import read_model_tensors
    from ..checkpoint.meta_check import saved_model_config
    from ..tokenizers.files import data_sample, export_tokenizer
    from ..tokenizers.factory import tokenizer_for_checkpoint
    path, meta, tensors = read_model_tensors(load)
    m, data = dataclasses.asdict(saved_model_config(meta["config"])), meta["config"].get("data", {})
    flags = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                 merge_file=merge_file)
    named = any(flags.values()) or meta.get("tokenizer") or data.get("tokenizer_model") or \
        data.get("vocab_file") or (data.get("tokenizer_type") or "GPT2BPETokenizer") != "GPT2BPETokenizer"
    tok = tokenizer_for_checkpoint(data, meta["vocab_size"], flags, path, meta.get("tokenizer")) if named else None
    sd, config = to_hf(m, tensors, meta["vocab_size"], tok.eod if tok else None)
    target = DTYPES[dtype] if dtype != "auto" else next(iter(sd.values())).dtype
    sd = {k: v.to(target) for k, v in sd.items()}
    config["torch_dtype"] = config["dtype"] = HF_DTYPE_NAMES[target]
    output = output.rstrip("/") or output
    if os.path.lexists(output) and (not os.path.isdir(output) or os.path.islink(output) or os.listdir(output)):
        what = "is a symbolic link" if os.path.islink(output) else "is a file" if not os.path.isdir(output) else \
            "is not empty"
        raise HFError(f"output {output} already exists and {what}; choose a new directory")
    atomic.remove_leftovers(output)   # of an export of this output killed on this host
    tmp = atomic.new_dir(output)      # written whole under a fresh name, then renamed into place
    try:
        ids = {"bos_token_id": None, "eos_token_id": None}
        if tok is not None:
            info = export_tokenizer(tok, tmp, m["seq_length"], data_sample(data, tok))
            ids = {k: info[k] for k in ids}
            config.update(ids)
        with Activity(f"export-hf: writing {os.path.join(output, 'model.safetensors')}"):
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        atomic.honour_umask(os.path.join(tmp, "model.safetensors"))   # safetensors creates it 0600
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), ids)
        atomic.publish_dir(tmp, output)   # replaces an empty directory, checked above
    finally:
        atomic.remove_created(tmp)      # only what this export created; nothing once published
    return {"checkpoint": path, "output": output, "architecture": config["architectures"][0],
            "tokenizer": tok.type_name if tok else None, "dtype": config["dtype"]}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")

