"""DeepSpeed's JSON config (`--deepspeed --deepspeed_config ds_config.json`), honoured without DeepSpeed.

Megatron-DeepSpeed hands batch sizes, ZeRO, mixed precision and gradient clipping
to DeepSpeed's config instead of to its own flags, so users arrive with that
file. Each key is mapped onto the gpt3d setting that does the same thing. As
under DeepSpeed, the file decides: a key absent from it takes DeepSpeed's
default (no clipping without `gradient_clipping`, ZeRO stage 0 without
`zero_optimization`, an initial fp16 loss scale of 2^16 without
`initial_scale_power`). A value that disagrees with a flag or YAML setting the
user gave (but --clip-grad with no `gradient_clipping` in the file, which
Megatron-DeepSpeed ignores: a warning says so), and any DeepSpeed feature gpt3d does not have (ZeRO-2/3, offload,
DeepSpeed's own optimizer or scheduler, ...), stops the run with one line
naming the key.

`steps_per_print` is accepted and changes nothing: under Megatron-DeepSpeed it
paces the DeepSpeed engine's own progress prints, independently of Megatron's
log line (--log-interval). gpt3d has no engine prints; its log line is
Megatron's, every --log-interval (default 10; Megatron's is 100).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from ..errors import ConfigError, warn
from ..parallel.layout import data_parallel_size, global_batch_size
from .root import Config
from .schema import SECTIONS, flag_name
from .values import field_index, read_settings_file

# keys accepted with a fixed value because gpt3d always behaves that way
_FIXED = {
    "wall_clock_breakdown": (False, "gpt3d times whole steps only (per-iteration time is in the log line and, "
                                    "with --log-timers-to-tensorboard, in TensorBoard)"),
    "gradient_predivide_factor": (1.0, "gpt3d divides gradients by the data-parallel size only"),
}
_ZERO_FIXED = {
    "contiguous_gradients": True,    # gpt3d's gradients always live in contiguous buckets
    "reduce_scatter": True,          # ZeRO-1 reduce-scatters each bucket (all-reduce on gloo)
    "allgather_partitions": True,    # updated shards are all-gathered bucket by bucket
}
_FP16_FIXED = {"consecutive_hysteresis": False, "auto_cast": False}
# keys whose absence Megatron-DeepSpeed honours over the Megatron flag of the same setting: the flag is ignored
_FLAG_IGNORED_WITHOUT_KEY = {
    "gradient_clipping": "its optimizer is DeepSpeed's, which clips only by the ds_config's gradient_clipping",
}


def _flag(name: str) -> str:
    """The flag of setting `name`, as the CLI spells it."""
    return flag_name(next(f for f in dataclasses.fields(SECTIONS[field_index()[name]]) if f.name == name))


def _get(cfg: Config, name: str) -> Any:
    for section in SECTIONS:
        obj = getattr(cfg, section)
        if hasattr(obj, name):
            return obj
    raise KeyError(name)


def read_deepspeed_config(path: str) -> dict:
    return read_settings_file(path, json.load, json.JSONDecodeError,
                              lambda e: f"not valid JSON ({e.msg} at line {e.lineno})",
                              missing=f"--deepspeed_config: file not found: {path}", expected="expected a JSON object")


def deepspeed_settings(ds: dict, path: str, micro_batch: int, dp: Optional[int]) -> list[tuple[str, Any, str]]:
    """[(gpt3d field, value, ds key)] that the file asks for; raises ConfigError for what gpt3d cannot do."""
    def fail(key: str, why: str):
        raise ConfigError(f"{path}: {key}: {why}")

    def number(key: str, v: Any, integer: bool = False) -> Any:
        """A JSON number (an integer where `integer`), finite: never a bool, a string or null."""
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not math.isfinite(v):
            fail(key, f"expected {'an integer' if integer else 'a finite number'}, got {json.dumps(v)}")
        return v

    def switch(key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            fail(key, f"expected true or false, got {json.dumps(v)}")
        return v

    def section(name: str) -> dict:
        value = ds.get(name, {})
        if not isinstance(value, dict):
            fail(name, "expected a JSON object")
        return value

    out: list[tuple[str, Any, str]] = []
    known = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "steps_per_print", "gradient_clipping", "prescale_gradients", "zero_optimization", "fp16", "bf16",
             "bfloat16", "data_types", "zero_allow_untested_optimizer", *_FIXED}
    for key in ds:
        if key in ("optimizer", "scheduler"):
            fail(key, "gpt3d's AdamW and learning-rate schedule come from the Megatron flags "
                      "(--lr, --adam-beta1, --lr-decay-style, ...), not from DeepSpeed's config")
        if key not in known:
            fail(key, "a DeepSpeed feature gpt3d does not have")
    for key, (value, why) in _FIXED.items():
        if key in ds and ds[key] != value:
            fail(key, f"only {json.dumps(value)} is supported: {why}")

    # batch sizes (parallel/layout.global_batch_size); a missing one is derived from the other two
    tbs, mbs, gas = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                         "gradient_accumulation_steps"))
    for key, v in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mbs),
                   ("gradient_accumulation_steps", gas)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            fail(key, f"expected a positive integer, got {json.dumps(v)}")
    if mbs is not None:
        out.append(("micro_batch_size", mbs, "train_micro_batch_size_per_gpu"))
    if tbs is not None:
        out.append(("global_batch_size", tbs, "train_batch_size"))
    if gas is not None and dp is not None:
        micro = mbs if mbs is not None else micro_batch
        if tbs is None:
            out.append(("global_batch_size", global_batch_size(micro, gas, dp), "gradient_accumulation_steps"))
        elif mbs is None:
            if tbs % (gas * dp):
                fail("train_batch_size", f"{tbs} is not gradient_accumulation_steps ({gas}) x data-parallel "
                                         f"size ({dp}) x a micro batch")
            out.append(("micro_batch_size", tbs // (gas * dp), "gradient_accumulation_steps"))
        elif tbs != global_batch_size(mbs, gas, dp):
            fail("train_batch_size", f"{tbs} != train_micro_batch_size_per_gpu ({mbs}) x "
                                     f"gradient_accumulation_steps ({gas}) x data-parallel size ({dp})")

    # steps_per_print: accepted, no effect (the module docstring says why)
    out.append(("clip_grad", float(number("gradient_clipping", ds.get("gradient_clipping", 0.0))),
                "gradient_clipping"))
    switch("prescale_gradients", ds.get("prescale_gradients", False))
    switch("zero_allow_untested_optimizer", ds.get("zero_allow_untested_optimizer", False))
    types = section("data_types")
    for key, value in types.items():
        if key != "grad_accum_dtype" or value != "fp32":
            fail(f"data_types.{key}", "gpt3d accumulates and reduces gradients in fp32 only")

    zero = section("zero_optimization")
    for key, value in zero.items():
        if key == "stage":
            if number("zero_optimization.stage", value, integer=True) not in (0, 1):
                fail("zero_optimization.stage", f"ZeRO stage {value} is not supported (gpt3d has stage 0 and 1)")
        elif key == "reduce_bucket_size":
            out.append(("bucket_size_mb", float(number("zero_optimization.reduce_bucket_size", value)) * 4 / 2 ** 20,
                        "zero_optimization.reduce_bucket_size"))
        elif key == "overlap_comm":
            out.append(("overlap_grad_reduce", switch("zero_optimization.overlap_comm", value),
                        "zero_optimization.overlap_comm"))
        elif key in _ZERO_FIXED:
            if value != _ZERO_FIXED[key]:
                fail(f"zero_optimization.{key}", f"only {json.dumps(_ZERO_FIXED[key])} is supported")
        else:
            fail(f"zero_optimization.{key}", "a DeepSpeed ZeRO feature gpt3d does not have")
    out.append(("zero_stage", int(zero.get("stage", 0)), "zero_optimization.stage"))

    fp16, bf16 = section("fp16"), section("bf16") or section("bfloat16")
    for key in bf16:
        if key != "enabled":
            fail(f"bf16.{key}", "a DeepSpeed bf16 option gpt3d does not have")
    fp16_on = switch("fp16.enabled", fp16.get("enabled", False))
    bf16_on = switch("bf16.enabled", bf16.get("enabled", False))
    if fp16_on and bf16_on:
        fail("bf16.enabled", "fp16 and bf16 are both enabled")
    out.append(("fp16", fp16_on, "fp16.enabled"))
    out.append(("bf16", bf16_on, "bf16.enabled"))
    for key, value in fp16.items():
        if key in _FP16_FIXED and value != _FP16_FIXED[key]:
            fail(f"fp16.{key}", f"only {json.dumps(_FP16_FIXED[key])} is supported")
        if key not in ("enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                       "min_loss_scale", *_FP16_FIXED):
            fail(f"fp16.{key}", "a DeepSpeed fp16 option gpt3d does not have")
    if fp16_on:   # DeepSpeed's defaults for the keys the file leaves out
        scale = float(number("fp16.loss_scale", fp16.get("loss_scale", 0)))
        out.append(("loss_scale", scale if scale > 0 else None, "fp16.loss_scale"))
        power = number("fp16.initial_scale_power", fp16.get("initial_scale_power", 16), integer=True)
        if not 0 <= power <= 127:
            fail("fp16.initial_scale_power", f"expected 0..127 (a float32 loss scale), got {power}")
        out.append(("initial_loss_scale", float(2 ** power), "fp16.initial_scale_power"))
        out.append(("loss_scale_window", number("fp16.loss_scale_window", fp16.get("loss_scale_window", 1000),
                                                integer=True), "fp16.loss_scale_window"))
        out.append(("hysteresis", number("fp16.hysteresis", fp16.get("hysteresis", 2), integer=True),
                    "fp16.hysteresis"))
        out.append(("min_loss_scale", float(number("fp16.min_loss_scale", fp16.get("min_loss_scale", 1))),
                    "fp16.min_loss_scale"))
    return out


def apply_deepspeed_config(cfg: Config, given: set, world_size: Optional[int] = None) -> set:
    """Fold the ds_config named by --deepspeed_config into `cfg`; `given` names the settings the user set
    (flags or YAML), which the file must agree with. World size: $WORLD_SIZE (torchrun) unless given.
    Returns the names of the settings the file decides."""
    t = cfg.training
    if t.deepspeed_config and not t.deepspeed:
        raise ConfigError("--deepspeed_config is read only with --deepspeed (as in Megatron-DeepSpeed)")
    if t.deepspeed and not t.deepspeed_config:
        raise ConfigError("--deepspeed needs --deepspeed_config FILE (DeepSpeed's JSON config)")
    if not t.deepspeed:
        return set()
    path = t.deepspeed_config
    ds = read_deepspeed_config(path)
    if world_size is None:
        from ..parallel.state import launch_env   # the launcher's variables, checked (torch is loaded by train)
        world_size = launch_env().world
    world = world_size
    try:   # a world size the layout refuses is reported by the config check, after these settings are read
        dp: Optional[int] = data_parallel_size(world, cfg.parallel.tensor_model_parallel_size,
                                               cfg.parallel.pipeline_model_parallel_size)
    except ConfigError:
        dp = None
    settings = deepspeed_settings(ds, path, t.micro_batch_size, dp)
    wanted = {name: value for name, value, _ in settings}
    for mine, other in (("fp16", "bf16"), ("bf16", "fp16")):   # name the key that enables the other type
        if wanted[mine] and other in given and getattr(cfg.precision, other):
            raise ConfigError(f"{path}: {mine}.enabled = true conflicts with --{other}")
    for name, value, key in settings:
        holder = _get(cfg, name)
        current = getattr(holder, name)
        if name in given and current != value:
            shown = json.dumps(_ds_value(ds, key))
            if key in _FLAG_IGNORED_WITHOUT_KEY and key not in ds:
                if int(os.environ.get("RANK", "0")) == 0:
                    warn(f"{path} has no {key}: {_flag(name)} {_show(current)} has no effect, as under "
                         f"Megatron-DeepSpeed ({_FLAG_IGNORED_WITHOUT_KEY[key]})")
            else:
                raise ConfigError(f"{path}: {key} = {shown} conflicts with {_flag(name)} {_show(current)}")
        setattr(holder, name, value)
    return set(wanted)


def _ds_value(ds: dict, key: str) -> Any:
    node: Any = ds
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "(absent: DeepSpeed's default)"
        node = node[part]
    return node


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "(set)" if value else "(not set)"
    return str(value)
