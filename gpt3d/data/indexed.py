"""Megatron's MMIDIDX indexed dataset (.bin tokens + .idx index), read through numpy memmap.

Byte-compatible with Megatron-LM / Megatron-DeepSpeed, so their preprocessed
corpora load here and ours load there. Index layout (little endian):
    b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 num sequences | u64 num doc_idx entries
    | int32 sizes[n] | int64 byte pointers[n] | int64 doc_idx[m]

The index is checked, not trusted, when it is opened (`check_index`, O(n) numpy in blocks): an integer
token dtype, exactly the bytes its header announces, sizes >= 0, each pointer the sum of the sizes before
it (in bytes), the .bin exactly as long as the last pointer + size says (or longer by one eod per non-empty
document: Megatron-DeepSpeed's --append-eod files, see `_eods_left_out`), doc_idx starting at 0,
non-decreasing and ending at the sequence count. A failure names the file and the first bad entry, so a
bit flip is one error line instead of training on the neighbouring documents' tokens or a traceback.
"""
from __future__ import annotations

import os
import struct
import tempfile
from typing import Optional

import numpy as np

from ..errors import DataError, warn

MAGIC = b"MMIDIDX\x00\x00"
# Megatron's dtype codes; 6 and 7 (float32/float64 in its table) hold no token ids and are refused.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float32", 7: "float64"}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
_BLOCK = 1 << 24   # index entries checked at a time (flat memory on any corpus)


def best_dtype(vocab_size: Optional[int]):
    """Token width as Megatron picks it: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


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
        if code in FLOAT_CODES:
            raise DataError(f"{idx}: dtype code {code} ({FLOAT_CODES[code]}) holds no token ids; gpt3d reads "
                            "integer token data (uint8/16, int8/16/32/64)")
        if code not in DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = 34 + 4 * n + 8 * n + 8 * m
        size = os.path.getsize(idx)
        if size != expected:
            raise DataError(f"{idx}: {'truncated index' if size < expected else 'index longer than its header says'} "
                            f"({size} bytes; its header's {n} sequences and {m} doc_idx entries need {expected})")
        buf = np.memmap(idx, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n, offset=34)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n, offset=34 + 4 * n)
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=m, offset=34 + 12 * n)
        need = check_index(idx, self.sizes, self.pointers, self.doc_idx, self.dtype.itemsize)
        have = os.path.getsize(bin_)
        if have != need and not self._eods_left_out(have - need):
            raise DataError(f"{bin_}: size {have} bytes does not match its index ({need} bytes expected)")
        self.bin = np.memmap(bin_, mode="r", dtype=self.dtype) if have else np.zeros(0, self.dtype)

    def _eods_left_out(self, extra: int) -> bool:
        """Megatron-DeepSpeed's tools/preprocess_data.py (seed commit b3405e1) with --append-eod writes one eod
        per non-empty document into the .bin but not into the sizes, so the .bin is longer than its index by
        exactly that many tokens. Megatron reads such files through the pointers as they are; so does gpt3d."""
        if extra <= 0 or extra % self.dtype.itemsize or len(self.doc_idx) < 2:
            return False
        nonempty = int(np.count_nonzero(self.doc_idx[1:] > self.doc_idx[:-1]))
        if extra // self.dtype.itemsize != nonempty:
            return False
        if os.environ.get("RANK", "0") == "0":
            warn(f"{self.prefix}.idx leaves each document's eod token out of its sizes (as Megatron-DeepSpeed's "
                 f"preprocess_data.py --append-eod wrote it); read as Megatron reads it")
        return True

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset if length is None else length
        return np.asarray(self.bin[start:start + n])


def check_index(idx: str, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray, itemsize: int) -> int:
    """DataError naming `idx` and its first bad entry unless the arrays are a consistent index (see the module
    docstring); the .bin length in bytes they describe. A few passes over each block, no temporaries beyond
    one block (about 0.02-0.04 s per million sequences on one core)."""
    n, m = len(sizes), len(doc_idx)
    ends = np.empty(min(n, _BLOCK), np.int64)
    offset = 0
    for lo in range(0, n, _BLOCK):
        s = sizes[lo:lo + _BLOCK]
        if s.min() < 0:
            i = lo + int(np.argmax(s < 0))
            raise DataError(f"{idx}: sizes[{i}] is {int(sizes[i])}, a negative sequence length (corrupt index)")
        e = ends[:len(s)]
        np.multiply(s, itemsize, out=e, dtype=np.int64)
        np.cumsum(e, out=e)
        e += offset                      # e[k]: where sequence lo + k ends = where lo + k + 1 starts
        bad = -1 if pointers[lo] == offset else 0
        if bad < 0 and len(s) > 1:
            wrong = pointers[lo + 1:lo + len(s)] != e[:-1]
            bad = int(np.argmax(wrong)) + 1 if wrong.any() else -1
        if bad >= 0:
            i = lo + bad
            want = offset if bad == 0 else int(e[bad - 1])
            raise DataError(f"{idx}: pointers[{i}] is {int(pointers[i])}, expected {want} (the sizes before it "
                            f"x {itemsize} bytes): corrupt index")
        offset = int(e[-1])
    if m == 0 or doc_idx[0] != 0:
        raise DataError(f"{idx}: doc_idx {'is empty' if m == 0 else f'starts at {int(doc_idx[0])}'}, expected "
                        "it to start at 0 (corrupt index)")
    for lo in range(0, m - 1, _BLOCK):
        d = doc_idx[lo:lo + _BLOCK + 1]
        down = d[1:] < d[:-1]
        if down.any():
            i = lo + int(np.argmax(down)) + 1
            raise DataError(f"{idx}: doc_idx[{i}] is {int(doc_idx[i])}, below doc_idx[{i - 1}] = "
                            f"{int(doc_idx[i - 1])} (corrupt index)")
    if doc_idx[-1] != n:
        raise DataError(f"{idx}: doc_idx ends at {int(doc_idx[-1])}, not at the sequence count {n} (corrupt index)")
    return offset


class MMapIndexedDatasetBuilder:
    """Streams tokens to .bin and the index arrays to spill files beside it, so memory stays flat whatever
    the corpus size; finalize writes the .idx. Documents follow Megatron's preprocess rule: each non-empty
    sentence is one sequence (a `sizes` entry) and every document, even an empty one, ends with a
    doc_idx boundary. The spill files have no name (removed as they are created), so a killed run leaves
    none behind."""

    def __init__(self, bin_path: str, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        self.bin_path = bin_path
        self.fh = open(bin_path, "wb")
        spill_dir = os.path.dirname(os.path.abspath(bin_path))
        self._sizes = tempfile.TemporaryFile(dir=spill_dir)
        self._docs = tempfile.TemporaryFile(dir=spill_dir)
        self.n_sizes = 0
        self.n_docs = 1                      # doc_idx starts with 0
        self._docs.write(np.zeros(1, np.int64).tobytes())
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_docs(self, tokens: np.ndarray, sizes: np.ndarray, per_doc: np.ndarray) -> None:
        """Many documents at once: `tokens` flat, `sizes` one entry per sequence, `per_doc` how many
        sequences each document has (0 for an empty document)."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            if len(tokens) and self._limit is not None and int(tokens.max()) > self._limit:
                raise DataError(f"{self.bin_path}: token id {int(tokens.max())} does not fit {self.dtype}")
            tokens = tokens.astype(self.dtype)
        self.fh.write(tokens.tobytes(order="C"))
        self._sizes.write(np.asarray(sizes, dtype=np.int32).tobytes())
        ends = self.n_sizes + np.cumsum(np.asarray(per_doc, dtype=np.int64))
        self._docs.write(ends.tobytes())
        self.n_sizes += len(sizes)
        self.n_docs += len(ends)

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self.fh.write(arr.tobytes(order="C"))
        self._sizes.write(np.asarray([len(arr)], dtype=np.int32).tobytes())
        self.n_sizes += 1

    def end_document(self) -> None:
        self._docs.write(np.asarray([self.n_sizes], dtype=np.int64).tobytes())
        self.n_docs += 1

    def close(self) -> None:
        for fh in (self.fh, self._sizes, self._docs):
            fh.close()

    def finalize(self, idx_path: str, block: int = 1 << 22) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        item = self.dtype.itemsize
        with open(idx_path, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<QBQQ", 1, CODES[self.dtype], self.n_sizes, self.n_docs))
            self._sizes.seek(0)
            for buf in iter(lambda: self._sizes.read(4 * block), b""):
                out.write(buf)
            self._sizes.seek(0)                          # pointers: byte offset of each sequence
            offset = 0
            for buf in iter(lambda: self._sizes.read(4 * block), b""):
                sizes = np.frombuffer(buf, dtype=np.int32).astype(np.int64) * item
                ends = np.cumsum(sizes)
                out.write((ends - sizes + offset).tobytes())
                offset += int(ends[-1])
            self._docs.seek(0)
            for buf in iter(lambda: self._docs.read(8 * block), b""):
                out.write(buf)
            out.flush()
            os.fsync(out.fileno())
        self.close()
