"""Reading Megatron-DeepSpeed's `.pt` files without running anything they name.

They are torch.save pickles, and a pickle can name any importable callable (`os.system` included) that the
unpickler then calls. Besides tensors, storages, numpy arrays and plain containers, these files name a few
classes of programs gpt3d does not import (megatron's ModelType enum, DeepSpeed's loss scaler, ZeRO stage
enum and fragment addresses) and argparse.Namespace. So the unpickler here resolves a global only from
`ALLOWED`: torch's tensor rebuilders, numpy's array reconstruction (non-object dtypes only), a latin-1
`_codecs.encode` (how protocol 2 stores bytes) and plain stand-ins for the named classes that keep only the
state the file gives them. Any other global stops the read with one CheckpointError naming the file and the
global, before it is called. TorchScript archives (whose loading runs TorchScript) are refused too.

`torch.load(..., pickle_module=this module's shim)` does the rest (zip records, storages; memory-mapped, so
reading a multi-GB shard touches only the tensors asked for). No `megatron` or `deepspeed` import happens.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import pickle
import types
import zipfile
from typing import Any

import numpy as np
import torch
import torch._utils

from ...errors import CheckpointError


class Refused(pickle.UnpicklingError):
    """A global outside ALLOWED (the caller names the file)."""


# ----- stand-ins for the classes of other programs -------------------------------------------------------------
class StandIn:
    """A plain object in place of a class gpt3d does not import: the constructor arguments and the state the
    pickle gives, nothing else (no method of the original class ever runs)."""
    origin = ""
    args: tuple = ()      # class-level defaults: pickle's NEWOBJ makes instances without calling __init__
    state: Any = None

    def __init__(self, *args):
        self.args = tuple(args)

    def __setstate__(self, state) -> None:
        self.state = state

    def get(self, key: str, default=None):
        """A field of the pickled state (a dict, or (dict, slots) as pickle's BUILD may give)."""
        state = self.state[0] if isinstance(self.state, tuple) and self.state else self.state
        return state.get(key, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"<{self.origin} args={self.args} state={self.state}>"


def _stand_in(origin: str) -> type:
    return type(origin.rsplit(".", 1)[-1], (StandIn,), {"origin": origin})


def _np_dtype(*args):
    """numpy.dtype, but never the object dtype (whose arrays would hold pickled objects)."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise Refused("numpy object dtype")
    return dt


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise Refused("numpy scalar of an object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_encode(text, encoding="latin1"):
    """What protocol 2 uses to store bytes; no other codec."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise Refused(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's rebuild of a tensor subclass, for Tensor and Parameter only."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise Refused(f"tensor subclass {new_type}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as r   # numpy 2
    except ImportError:   # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct as r  # type: ignore[no-redef]  # numpy 1's home of it
    return r


_TORCH_DTYPES = {str(d).split(".")[1]: d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}

ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("__builtin__", "slice"): slice,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    **{("torch", name): dt for name, dt in _TORCH_DTYPES.items()},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _np_dtype,
    **{(mod, "_reconstruct"): _reconstruct() for mod in ("numpy._core.multiarray", "numpy.core.multiarray")},
    **{(mod, "scalar"): _np_scalar for mod in ("numpy._core.multiarray", "numpy.core.multiarray")},
    ("argparse", "Namespace"): argparse.Namespace,
    **{(mod, name): _stand_in(f"{mod}.{name}") for mod, name in (
        ("megatron.core.enums", "ModelType"), ("megatron.model.enums", "ModelType"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"))},
}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come from ALLOWED only (torch's loader adds storages and tensors)."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"{module}.{name}") from None


def _shim_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load takes as `pickle_module`: it subclasses `Unpickler` (adding storages) and calls `load`.
PICKLE_MODULE = types.SimpleNamespace(__name__="gpt3d_restricted_pickle", Unpickler=RestrictedUnpickler,
                                      load=_shim_load)


def load(path: str) -> Any:
    """The object in the torch.save file `path`, its tensors on the CPU (memory-mapped where the format
    allows); CheckpointError naming the file for anything outside ALLOWED or a file that is not one."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                raise CheckpointError(f"{path}: a TorchScript archive, not a Megatron-DeepSpeed checkpoint file; "
                                      "refusing to load it")
    try:
        return torch.load(path, map_location="cpu", pickle_module=PICKLE_MODULE, weights_only=False,
                          mmap=is_zip)
    except Refused as e:
        raise CheckpointError(f"{path}: refusing to unpickle {e} (only tensors, arrays, plain containers and "
                              "the Megatron-DeepSpeed/DeepSpeed classes gpt3d knows are read)") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch and pickle raise many types for a damaged file
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {e})") from None
