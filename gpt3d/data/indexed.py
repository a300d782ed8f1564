"""Megatron's MMIDIDX indexed dataset (.bin tokens + .idx index), read through numpy memmap.

Byte-compatible with Megatron-LM / Megatron-DeepSpeed, so their preprocessed
corpora load here and ours load there. Index layout (little endian):
    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 num sequences | u64 num doc_idx entries
    | int32 sizes[n] | int64 byte pointers[n] | int64 doc_idx[m]
"""
from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np

from ..errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
          8: np.uint16}
CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
         np.dtype(np.int64): 5, np.dtype(np.float64): 7, np.dtype(np.uint16): 8}


def best_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


class MMapIndexedDataset:
    def __init__(self, prefix: str):
        self.prefix = prefix
        idx, bin_ = prefix + ".idx", prefix + ".bin"
        if not os.path.exists(idx):
            raise DataError(f"{idx}: index file not found")
        if not os.path.exists(bin_):
            raise DataError(f"{bin_}: data file not found (its index {idx} exists)")
        with open(idx, "rb") as fh:
            header = fh.read(9 + 8 + 1 + 8 + 8)
        if len(header) < 34 or header[:9] != MAGIC:
            raise DataError(f"{idx}: not a Megatron MMIDIDX index (bad magic)")
        version, code, n, m = struct.unpack("<QBQQ", header[9:])
        if version != 1:
            raise DataError(f"{idx}: unsupported index version {version}")
        if code not in DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = 34 + 4 * n + 8 * n + 8 * m
        if os.path.getsize(idx) < expected:
            raise DataError(f"{idx}: truncated index ({os.path.getsize(idx)} bytes, need {expected})")
        buf = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=34)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=34 + 4 * n)
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=m, offset=34 + 12 * n)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        have = os.path.getsize(bin_)
        if have != need:
            raise DataError(f"{bin_}: size {have} bytes does not match its index ({need} bytes expected)")
        self.bin = np.memmap(bin_, mode="r", dtype=self.dtype) if have else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return np.asarray(self.bin[start:start + n])


class MMapIndexedDatasetBuilder:
    """Streams tokens to .bin; sizes and document boundaries go to .idx at finalize."""

    def __init__(self, bin_path: str, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        self.fh = open(bin_path, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self.fh.write(arr.tobytes(order="C"))
        self.sizes.append(len(arr))

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def finalize(self, idx_path: str) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        with open(idx_path, "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<QBQQ", 1, CODES[self.dtype], len(sizes), len(self.doc_idx)))
            fh.write(sizes.tobytes())
            fh.write(pointers.tobytes())
            fh.write(np.asarray(self.doc_idx, dtype=np.int64).tobytes())
            fh.flush()
            os.fsync(fh.fileno())
