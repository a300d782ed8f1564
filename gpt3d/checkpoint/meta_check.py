"""meta.json is input, not trusted: its shape is checked before anything else reads it.

A checkpoint may come from someone else, and its checksums are no signature: anyone can edit meta.json and
re-seal it. So every entry the code reads is checked for its type and range here (a JSON object; the files,
each a path inside the directory; the layout; the model settings under train's own rules; the
parameters' shapes; the counters; the tokenizer manifest, whose files must be listed too) and a
problem comes back as one reason naming the entry, which integrity.py reports like any other corruption.
Keys added by later versions of gpt3d are allowed; older checkpoints lack some optional entries.
"""
from __future__ import annotations

from typing import Any, Optional


def _inside(name: str) -> bool:
    """A relative path that stays inside the checkpoint directory (no '..', no absolute path)."""
    parts = name.split("/")
    return "\\" not in name and "\0" not in name and all(p not in ("", ".", "..") for p in parts)


class _Bad(Exception):
    pass


def _int(v: Any, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise _Bad(f"{what} is {v!r}, expected an integer >= {lo}")
    return v


def _obj(v: Any, what: str) -> dict:
    if not isinstance(v, dict):
        raise _Bad(f"{what} is {_kind(v)}, expected a JSON object")
    return v


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def meta_problem(meta: Any) -> Optional[str]:
    """Why `meta` (as json.load returned it) is not a meta.json gpt3d can read, or None."""
    try:
        _check(meta)
    except _Bad as e:
        return f"meta.json is malformed: {e}"
    return None


def _check(meta: Any) -> None:
    _obj(meta, "the file")
    files = _obj(meta.get("files"), "files")
    for name, size in files.items():
        if not _inside(name):
            raise _Bad(f"files lists {name!r}, a path outside the checkpoint directory")
        _int(size, f"files[{name!r}]")
    for key in ("checksums", "non_finite"):
        if key in meta:
            for name, v in _obj(meta[key], key).items():
                if name not in files or not isinstance(v, str if key == "checksums" else list):
                    raise _Bad(f"{key}[{name!r}] does not describe a listed file")
    layout = _obj(meta.get("layout"), "layout")
    for k in ("tp", "pp", "dp"):
        _int(layout.get(k), f"layout.{k}", 1)
    if "zero" in layout:
        _int(layout["zero"], "layout.zero")
    _config(meta.get("config"))
    vocab = _int(meta.get("vocab_size"), "vocab_size", 1)
    _int(meta.get("padded_vocab"), "padded_vocab", vocab)
    for name, info in _obj(meta.get("params"), "params").items():
        info = _obj(info, f"params[{name!r}]")
        shape = info.get("shape")
        if not isinstance(shape, list) or not shape:
            raise _Bad(f"params[{name!r}].shape is {shape!r}, expected a list of sizes")
        for n in shape:
            _int(n, f"params[{name!r}].shape")
        split = info.get("split_dim", "missing")
        if split is not None and (type(split) is not int or not 0 <= split < len(shape)):
            raise _Bad(f"params[{name!r}].split_dim is {split!r}, expected null or a dimension of its shape")
    for key in ("iteration", "consumed_samples", "tokens"):
        if key in meta or key != "tokens":
            _int(meta.get(key), key)
    for key in ("scaler", "data_state", "tokenizer"):
        if meta.get(key) is not None:
            _obj(meta[key], key)
    data_path = (meta.get("data_state") or {}).get("data_path")
    if data_path is not None and not (isinstance(data_path, list) and all(isinstance(p, str) for p in data_path)):
        raise _Bad(f"data_state.data_path is {data_path!r}, expected a list of paths")
    if meta.get("tokenizer"):
        tok = meta["tokenizer"]
        if not isinstance(tok.get("type"), str) or not isinstance(tok.get("fingerprint"), str):
            raise _Bad("tokenizer has no type or fingerprint")
        for name, digest in _obj(tok.get("files", {}), "tokenizer.files").items():
            if f"tokenizer/{name}" not in files or not isinstance(digest, str):
                raise _Bad(f"tokenizer.files[{name!r}] is not a listed file of the checkpoint")
    for key in ("format", "meta_checksum"):
        if key in meta and not isinstance(meta[key], str):
            raise _Bad(f"{key} is {meta[key]!r}, expected a string")


def _config(config: Any) -> None:
    """The saved settings: each known one of the type its field has (as gpt3d wrote it: a path is a string,
    never a number), the model settings under the rules a run applies to its own. Settings of other gpt3d
    versions that this one does not know are left out."""
    from ..config import SECTIONS, field_types
    from ..errors import ConfigError
    config = _obj(config, "config")
    _obj(config.get("model"), "config.model")
    for section, values in config.items():
        types = field_types(SECTIONS[section]) if section in SECTIONS else {}
        for key, v in _obj(values, f"config.{section}").items():
            if key in types and v is not None and not _of_type(v, types[key]):
                raise _Bad(f"config.{section}.{key} is {v!r}, expected {types[key].__name__}")
    try:
        saved_model_config(config)
    except ConfigError as e:
        raise _Bad(f"config: {e}") from None


def _of_type(v: Any, t: type) -> bool:
    if t is float:
        return type(v) in (int, float)
    if t is list:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    return type(v) is t


def saved_model_config(config: dict):
    """The ModelConfig of a checkpoint's meta.json "config" (settings of other gpt3d versions that this one
    does not know are left out), checked as a run's own: ConfigError if it could not be built."""
    from ..config import Config, ModelConfig, field_types
    from ..config.rules import check_model, check_values
    known = field_types(ModelConfig)
    cfg = Config.from_dict({"model": {k: v for k, v in config["model"].items() if k in known}})
    check_values(cfg)
    check_model(cfg.model)
    return cfg.model
