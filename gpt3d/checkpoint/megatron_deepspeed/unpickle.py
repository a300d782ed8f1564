"""Reading Megatron-DeepSpeed's `.pt` files without running anything they name.

They are torch.save pickles, and a pickle can name any importable callable (`os.system` included) that the
unpickler then calls. So they are read with torch's weights-only unpickler (`torch.load(weights_only=True)`),
which builds tensors, storages and plain containers and refuses every other global before calling it. These
files also name numpy arrays (RNG state), argparse.Namespace (the run's arguments) and a few classes of
programs gpt3d does not import (megatron's ModelType enum, DeepSpeed's loss scaler, ZeRO stage enum and
fragment addresses): `SAFE_GLOBALS` lets exactly those through, for the duration of one load, each under the
name the file uses but resolved to something of gpt3d's: numpy's array reconstruction and numeric dtypes (a
dtype factory that refuses the object dtype, whose arrays would hold pickled objects) and plain stand-ins that
keep only the state the file gives them (no method of the original class ever runs). Any other global stops
the read with one CheckpointError naming the file and the global. TorchScript archives (whose loading runs
TorchScript) are refused too. Tensors are memory-mapped, so reading a multi-GB shard touches only the tensors
asked for; no `megatron` or `deepspeed` import happens.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from typing import Any

import numpy as np
import torch
import torch.serialization

from ...errors import CheckpointError


class Refused(pickle.UnpicklingError):
    """Something SAFE_GLOBALS' numpy factories will not build (the caller names the file)."""


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


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as r   # numpy 2
    except ImportError:   # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct as r  # type: ignore[no-redef]  # numpy 1's home of it
    return r


# numpy's numeric dtypes (bool, integers, floats, complex): a dtype the file names is rebuilt as one of these
_NUMPY_DTYPES = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=str)

# (what gpt3d builds, the name the file gives it): every global a Megatron-DeepSpeed checkpoint may name beyond
# what torch's weights-only unpickler already builds (tensors, storages, OrderedDict, the bytes codec)
SAFE_GLOBALS: list = [
    (argparse.Namespace, "argparse.Namespace"),
    (np.ndarray, "numpy.ndarray"), (_np_dtype, "numpy.dtype"), *_NUMPY_DTYPES,
    *((_reconstruct(), f"{mod}._reconstruct") for mod in ("numpy._core.multiarray", "numpy.core.multiarray")),
    *((_np_scalar, f"{mod}.scalar") for mod in ("numpy._core.multiarray", "numpy.core.multiarray")),
    *((_stand_in(name), name) for name in (
        "megatron.core.enums.ModelType", "megatron.model.enums.ModelType",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")),
]


def _refused(e: Exception) -> str:
    """What torch's weights-only unpickler refused, in a few words: its inner error (chained as the context of
    the multi-paragraph one torch.load raises) names the global, or says what it could not build."""
    inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e
    text = str(inner)
    m = re.search(r"GLOBAL (\S+)", text)
    if m:
        return m.group(1)
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(inner).__name__)[:200]


def load(path: str) -> Any:
    """The object in the torch.save file `path`, its tensors on the CPU (memory-mapped where the format
    allows); CheckpointError naming the file for anything outside SAFE_GLOBALS or a file that is not one."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                raise CheckpointError(f"{path}: a TorchScript archive, not a Megatron-DeepSpeed checkpoint file; "
                                      "refusing to load it")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to unpickle {_refused(e)} (only tensors, arrays, plain containers "
                              "and the Megatron-DeepSpeed/DeepSpeed classes gpt3d knows are read)") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch and pickle raise many types for a damaged file
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({type(e).__name__}: {e})") from None
