"""`gpt3d import-hf`: a Hugging Face model directory, read as untrusted input (nothing in it runs, nothing is
believed before it is checked), becomes a weights-only gpt3d checkpoint (the mapping is hf.py's `from_hf`).

config.json must be a JSON object, and each field gpt3d reads must have the type its meaning needs (a size
is an integer, not a bool, a float or a string; an epsilon a number; a switch a boolean; ranges, NaN
and infinity are train's rules, applied to the settings they become): `HFConfig`
checks every read, so a malformed config is one error line naming the field, never a traceback. Weights
are read from *.safetensors only (never a pickle: a pytorch_model.bin directory is refused with the way to
convert it), headers first: a truncated or corrupt file, or a tensor name in two files, is one error naming
the file before any tensor is loaded; each tensor's shape and dtype are then checked against the model the
config describes (`hf_tensors_needed`) before anything is reshaped or written. Custom code a config names
(auto_map) is never imported: the three architectures gpt3d maps by hand are the only ones accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..files import atomic
from ..config import Config
from ..config.rules import check_model, check_values
from ..errors import ConfigError, HFError
from .hf import from_hf, hf_model_config, to_hf
from ..model.gpt import VOCAB_PARAMETERS, count_parameters
from ..console.progress import Activity, Progress

_INT = ("n_embd", "n_head", "n_layer", "n_inner", "n_positions", "hidden_size", "num_attention_heads",
        "num_hidden_layers", "intermediate_size", "max_position_embeddings", "num_key_value_heads", "head_dim",
        "vocab_size")
_NUMBER = ("layer_norm_epsilon", "resid_pdrop", "attn_pdrop", "embd_pdrop", "rotary_emb_base", "rotary_pct",
           "layer_norm_eps", "hidden_dropout", "attention_dropout", "rms_norm_eps", "rope_theta",
           "initializer_range", "partial_rotary_factor")
_BOOL = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "scale_attn_weights",
         "use_parallel_residual", "attention_bias", "mlp_bias", "tie_word_embeddings")
_STR = ("model_type", "activation_function", "hidden_act", "rope_type")
_OBJECT = ("rope_parameters", "rope_scaling")
FLOATING = ("F16", "BF16", "F32", "F64")


class HFConfig:
    """config.json's fields, type-checked as they are read (`c["n_embd"]`, `c.get("n_inner", None)`).
    A field that is null reads as absent, as in transformers' config classes."""

    def __init__(self, data: dict, path: str, where: str = ""):
        self.data, self.path, self.where = data, path, where

    def _checked(self, key: str, v: Any) -> Any:
        name = f"{self.where}{key}"
        if key in _INT and (type(v) is not int):
            raise HFError(f"{self.path}: {name} is {json.dumps(v)}, expected an integer")
        if key in _NUMBER and type(v) not in (int, float):   # its range (finite too): train's rules, later
            raise HFError(f"{self.path}: {name} is {json.dumps(v)}, expected a number")
        if key in _BOOL and type(v) is not bool:
            raise HFError(f"{self.path}: {name} is {json.dumps(v)}, expected true or false")
        if key in _STR and type(v) is not str:
            raise HFError(f"{self.path}: {name} is {json.dumps(v)}, expected a string")
        if key in _OBJECT:
            if not isinstance(v, dict):
                raise HFError(f"{self.path}: {name} is {json.dumps(v)}, expected an object")
            return HFConfig(v, self.path, f"{name}.")
        return v

    def __getitem__(self, key: str) -> Any:
        v = self.data.get(key)
        if v is None:
            raise HFError(f"{self.path}: no {self.where}{key}, which a {self.data.get('model_type')} model needs")
        return self._checked(key, v)

    def get(self, key: str, default: Any = None) -> Any:
        v = self.data.get(key)
        return default if v is None else self._checked(key, v)

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def __bool__(self) -> bool:
        return bool(self.data)


def read_config(src: str) -> HFConfig:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise HFError(f"{src} has no config.json (not a Hugging Face model directory)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise HFError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: expected a JSON object")
    return HFConfig(data, path)


def read_headers(src: str) -> dict:
    """{tensor name: (file, shape, dtype)} from the safetensors headers of `src` (no tensor is read)."""
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if not files:
        raise HFError(f"{src} has no .safetensors weights (convert pytorch_model.bin with save_pretrained "
                      "(safe_serialization=True) first)")
    out: dict = {}
    for f in files:
        path = os.path.join(src, f)
        try:
            with safe_open(path, framework="pt") as fh:
                for k in fh.keys():
                    if k in out:
                        raise HFError(f"{path}: tensor {k} is also in {out[k][0]}")
                    s = fh.get_slice(k)
                    out[k] = (path, tuple(s.get_shape()), s.get_dtype())
        except (SafetensorError, OSError) as e:
            raise HFError(f"{path}: not a readable safetensors file ({e})") from None
    return out


def read_tensors(headers: dict, names: list) -> dict:
    """{name: tensor} of the tensors `names` (each checked already against what the model needs)."""
    out = {}
    paths = sorted({headers[k][0] for k in names})
    total = sum(os.path.getsize(p) for p in paths) / 2 ** 20
    with Progress(f"import-hf: reading {os.path.dirname(paths[0]) if paths else ''}", total, "MB") as bar:
        for path in paths:
            try:
                with safe_open(path, framework="pt") as fh:
                    for k in names:
                        if headers[k][0] == path:
                            out[k] = fh.get_tensor(k)
                            bar.update(out[k].numel() * out[k].element_size() / 2 ** 20)
            except (SafetensorError, OSError) as e:
                raise HFError(f"{path}: unreadable tensor data ({e})") from None
    return out


def hf_tensors_needed(cfg: Config, model, headers: dict) -> list[str]:
    """The names of `headers` ({name: (file, shape, dtype)}) that `from_hf` reads, after checking that each
    is there with the shape the config implies (found by mapping the gpt3d model's own shapes through
    `to_hf`, on the meta device) and a floating dtype; HFError naming the first that is not."""
    vocab = model.vocab_size
    shapes = {n: torch.empty(p.shape, device="meta")[:vocab] if n in VOCAB_PARAMETERS else
              torch.empty(p.shape, device="meta") for n, p in model.named_parameters()}
    expected, _ = to_hf(dataclasses.asdict(cfg.model), shapes, vocab, None)
    gpt2_bare = "transformer.wte.weight" not in headers and "wte.weight" in headers
    heads = ("lm_head.weight", "embed_out.weight")
    names = []
    for name, t in expected.items():
        if gpt2_bare and name.startswith("transformer."):
            name = name[len("transformer."):]
        if name in heads and name not in headers:
            name = next((h for h in heads if h in headers), name)
        if name not in headers:
            raise HFError(f"weight {name} missing for a {cfg.model.num_layers}-layer model of hidden size "
                          f"{cfg.model.hidden_size} as config.json describes it")
        path, shape, dtype = headers[name]
        if shape != tuple(t.shape):
            raise HFError(f"{path}: {name} has shape {list(shape)}, config.json implies {list(t.shape)}")
        if dtype not in FLOATING:
            raise HFError(f"{path}: {name} is {dtype}, expected floating weights ({', '.join(FLOATING)})")
        names.append(name)
    return names


def import_hf(src: str, save: str) -> dict:
    from ..checkpoint import save_weights
    from ..model.build import ModelChunks, build_full_model
    hf_config, headers = read_config(src), read_headers(src)   # checked as read; no tensor loaded yet
    m = hf_model_config(hf_config)
    if os.path.lexists(save) and (not os.path.isdir(save) or os.path.islink(save) or os.listdir(save)):
        raise HFError(f"checkpoint directory {save} already exists and is not empty; choose a new one")
    cfg = Config.from_dict({"model": m})
    cfg.model.make_vocab_size_divisible_by = 128
    try:   # config.json's numbers (epsilon, rope base, std, shapes) under train's rules, before anything is built
        check_values(cfg)
        check_model(cfg.model)
    except ConfigError as e:
        raise HFError(f"{hf_config.path}: a value gpt3d cannot train with: {e}") from None
    implied = count_parameters(cfg.model, m["vocab_size"])["total"]   # arithmetic: nothing built yet
    held = sum(math.prod(shape) for _, shape, _ in headers.values())
    if implied > held:   # e.g. a layer count or width no weights could back: refused before building anything
        raise HFError(f"{hf_config.path} describes a model of {implied:,} parameters, but the .safetensors files "
                      f"hold {held:,} values")
    model = build_full_model(cfg.model, m["vocab_size"], device=torch.device("meta"))
    params = ModelChunks([model]).layout()
    sd = read_tensors(headers, hf_tensors_needed(cfg, model, headers))
    m, tensors = from_hf(hf_config, sd)   # every parameter, with the shape hf_tensors_needed checked
    for n, p in model.named_parameters():
        if n in VOCAB_PARAMETERS:   # pad the vocabulary like training does
            w = tensors[n]
            tensors[n] = torch.cat([w, w.new_zeros(p.shape[0] - w.shape[0], w.shape[1])])
    from ..tokenizers.files import import_tokenizer
    from ..tokenizers.factory import tokenizer_from_config
    created = not os.path.exists(save)
    os.makedirs(save, exist_ok=True)
    try:
        import_tokenizer(src, save, cfg.data)
        tok = tokenizer_from_config(cfg.data) if cfg.data.vocab_file or cfg.data.tokenizer_model else None
        with Activity(f"import-hf: writing the checkpoint under {save}"):
            final = save_weights(save, tensors, params, cfg.to_dict(), m["vocab_size"], model.padded_vocab,
                                 tokenizer=tok)
        yaml_path = os.path.join(save, "model.yaml")
        _write_model_yaml(yaml_path, cfg)
    except BaseException:   # what this import wrote, and only that: the directory was new or empty
        if created:
            shutil.rmtree(save, ignore_errors=True)
        else:
            for name in os.listdir(save):
                atomic.remove_created(os.path.join(save, name))
        raise
    return {"input": src, "checkpoint": final, "config": yaml_path, "architecture": hf_config.get("model_type")}


def _write_model_yaml(path: str, cfg: Config) -> None:
    """The model (and tokenizer) settings a run needs to --load this checkpoint."""
    import yaml
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None}
    doc = {"model": model}
    if cfg.data.vocab_file:
        doc["data"] = {"vocab_file": cfg.data.vocab_file, "merge_file": cfg.data.merge_file}
    elif cfg.data.tokenizer_model:
        doc["data"] = {"tokenizer_type": cfg.data.tokenizer_type, "tokenizer_model": cfg.data.tokenizer_model}
    with open(path, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)

