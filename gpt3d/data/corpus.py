"""Documents out of corpus files: JSONL (plain, .gz, .zst) and Parquet shards, read in bounded chunks.

`preprocess` must stream corpora of any size with flat memory and name FILE:LINE for bad input. The
reading process only cuts raw chunks (whole lines, or Parquet record batches of the wanted columns) and
numbers them; the worker that tokenizes a chunk also decodes and validates it, so reading never becomes
the bottleneck and an error still points at the exact line (for Parquet: the 1-based row).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Union
from collections.abc import Iterator

from ..errors import DataError

CHUNK_BYTES = 1 << 21          # raw JSONL bytes per chunk handed to a worker
PARQUET_ROWS = 2048            # rows per Parquet record batch


@dataclass
class Chunk:
    path: str
    first: int                 # line (JSONL) or row (Parquet) number of the chunk's first document, from 1
    data: Any                  # bytes of whole lines, or a pyarrow RecordBatch of the --json-keys columns


def expand_inputs(patterns: Union[str, list]) -> list[str]:
    """Files and shell globs (quoted, so gpt3d expands them, in sorted order) -> the input files."""
    files: list[str] = []
    for pat in [patterns] if isinstance(patterns, str) else list(patterns):
        if glob.has_magic(pat):
            matched = sorted(p for p in glob.glob(pat, recursive=True) if os.path.isfile(p))
            if not matched:
                raise DataError(f"no input files match {pat}")
            files += matched
        elif os.path.isfile(pat):
            files.append(pat)
        else:
            raise DataError(f"{pat}: input file not found")
    if not files:
        raise DataError("no input files given (the shard list is empty)")
    return files


def kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "zstd"
    return "jsonl"


def _text_type(t) -> bool:
    """A string type, or a dictionary (categorical) of strings."""
    import pyarrow as pa
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)))


def _string_type(t) -> bool:
    """Strings, or lists of strings (Megatron's sentence lists); dictionary-encoded strings included."""
    import pyarrow as pa
    return _text_type(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t)) and _text_type(t.value_type))


def _list_of_dictionary(t) -> bool:
    """list<dictionary<string>>: sentence lists of categorical strings."""
    import pyarrow as pa
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_dictionary(t.value_type)


def _plain_strings(col):
    """A column with its dictionary (categorical) strings decoded, lists of them included."""
    import pyarrow as pa
    t = col.type
    if pa.types.is_dictionary(t):
        return col.cast(t.value_type)
    if _list_of_dictionary(t):
        make = pa.list_ if pa.types.is_list(t) else pa.large_list
        return col.cast(make(t.value_type.value_type))
    return col


def _parquet(path: str, keys: list):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    for key in keys:
        if key not in schema.names:
            raise DataError(f"{path}: no column '{key}' (columns: {', '.join(schema.names)})")
        t = schema.field(key).type
        if not _string_type(t):
            raise DataError(f"{path}: column '{key}' holds {t}, not strings")
    return pf


def check_input(path: str, keys: list) -> None:
    """Cheap up-front checks (Parquet schema), so a bad shard fails before hours of work on the others."""
    if kind(path) == "parquet":
        _parquet(path, keys)


class TruncatedZstd(EOFError):
    """The .zst file ends inside a frame (a cut-off download or copy)."""


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame (concatenated and skippable frames too).

    zstandard's stream readers return a file that ends inside a frame as if it ended there, so half a
    corpus would pass for all of it; this reader decodes one frame at a time (a decompressobj says when
    its frame is complete) and raises TruncatedZstd if the file ends inside one. Input goes in slices of
    `read_size` bytes, so memory stays bounded by what one slice decompresses to."""

    def __init__(self, path: str, read_size: int = 1 << 16):
        import zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._fh = open(path, "rb")
        self._read_size = read_size
        self._frame = None                  # the decompressobj of the frame being decoded
        self._input = b""                   # compressed bytes read but not fed yet (after a frame's end)
        self._out, self._at = b"", 0        # decompressed bytes not returned yet

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._at >= len(self._out):
            if not self._step():
                return 0
        n = min(len(buf), len(self._out) - self._at)
        buf[:n] = memoryview(self._out)[self._at:self._at + n]
        self._at += n
        return n

    def _step(self) -> bool:
        data, self._input = self._input or self._fh.read(self._read_size), b""
        if not data:
            if self._frame is not None:
                raise TruncatedZstd("the file ends inside a zstd frame")
            return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        self._out, self._at = self._frame.decompress(data), 0
        if self._frame.eof:
            self._input, self._frame = self._frame.unused_data, None
        return True

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open(path: str):
    k = kind(path)
    if k == "gzip":
        return gzip.open(path, "rb")
    if k == "zstd":
        return io.BufferedReader(ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb")


def chunks(path: str, keys: list, chunk_bytes: int = 0) -> Iterator[Chunk]:
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if kind(path) == "parquet":
        pf, row = _parquet(path, keys), 1
        # pyarrow cannot hand out a list<dictionary<string>> batch that spans two row groups: read those
        # row group by row group
        groups = ([[g] for g in range(pf.num_row_groups)]
                  if any(_list_of_dictionary(pf.schema_arrow.field(k).type) for k in keys) else [None])
        for group in groups:
            for batch in pf.iter_batches(batch_size=PARQUET_ROWS, row_groups=group, columns=list(keys)):
                yield Chunk(path, row, batch)
                row += batch.num_rows
        return
    line, carry = 1, b""
    try:
        with _open(path) as fh:
            while True:
                block = fh.read(chunk_bytes)
                if not block:
                    break
                data = carry + block if carry else block
                cut = data.rfind(b"\n") + 1
                if cut == 0:                       # one line longer than a chunk: keep reading
                    carry = data
                    continue
                carry = data[cut:]
                yield Chunk(path, line, data[:cut])
                line += data.count(b"\n", 0, cut)
    except TruncatedZstd as e:
        raise DataError(f"{path}: truncated zstd stream after line {line} ({e})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: cannot read {kind(path)} input after line {line} ({e})") from None
    except Exception as e:                         # zstandard.ZstdError and friends
        if type(e).__module__.startswith("zstandard"):
            raise DataError(f"{path}: corrupt zstd stream after line {line} ({e})") from None
        raise
    if carry:
        yield Chunk(path, line, carry)


# a JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way valid UTF-8 JSON yields a string that is
# not Unicode text (an unpaired one cannot be encoded, so no tokenizer takes it)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unpaired_surrogate(v) -> str:
    """'' if every string in `v` (a string or a list of them) is encodable text, else where it is not."""
    for j, s in enumerate([v] if type(v) is str else v):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"sentence {j + 1}, " if type(v) is not str else ""
            return f"{where}character {e.start + 1}: {s[e.start]!r}"
    return ""


def _what(v) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object",
            list: "a list with non-strings"}.get(type(v), type(v).__name__)


def utf8_text(raw: bytes, path: str, first_line: int = 1) -> str:
    """`raw` decoded as UTF-8, or DataError('PATH:LINE: not UTF-8 at byte N'), N counting that line's bytes
    from 1 (`first_line`: the line number of raw's first line)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 at byte {e.start - start + 1}") from None


def decode(chunk: Chunk, keys: list) -> tuple[dict, int, int]:
    """-> ({key: [text, or list of sentence texts, per document]}, documents, input bytes).
    Raises DataError('FILE:LINE: ...') for the first bad document."""
    if not isinstance(chunk.data, (bytes, bytearray)):
        return _decode_batch(chunk, keys)
    raw = chunk.data
    text = utf8_text(raw, chunk.path, chunk.first)
    values: dict = {k: [] for k in keys}
    n = 0
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None       # rare: check the values only then
    for i, ln in enumerate(text.split("\n")):
        if not ln or ln.isspace():
            continue
        try:
            doc = json.loads(ln)
        except ValueError as e:
            raise DataError(f"{chunk.path}:{chunk.first + i}: malformed JSON ({e})") from None
        if not isinstance(doc, dict):
            raise DataError(f"{chunk.path}:{chunk.first + i}: malformed JSON (not a JSON object)")
        for k in keys:
            try:
                v = doc[k]
            except KeyError:
                raise DataError(f"{chunk.path}:{chunk.first + i}: missing key '{k}'") from None
            if type(v) is not str and not (type(v) is list and all(type(s) is str for s in v)):
                raise DataError(f"{chunk.path}:{chunk.first + i}: the value under '{k}' is {_what(v)}, "
                                "not a string (or a list of strings)")
            bad = surrogates and _unpaired_surrogate(v)
            if bad:
                raise DataError(f"{chunk.path}:{chunk.first + i}: the value under '{k}' holds an unpaired UTF-16 "
                                f"surrogate escape ({bad}), not valid Unicode text")
            values[k].append(v)
        n += 1
    return values, n, len(raw)


def _decode_batch(chunk: Chunk, keys: list) -> tuple[dict, int, int]:
    import pyarrow.compute as pc
    batch, values, nbytes = chunk.data, {}, 0
    for k in keys:
        col = _plain_strings(batch.column(k))
        if col.null_count:
            row = chunk.first + col.is_null().to_pylist().index(True)
            raise DataError(f"{chunk.path}:{row}: the value under '{k}' is null, not a string")
        values[k] = col.to_pylist()
        if hasattr(col.type, "value_type") and pc.list_flatten(col).null_count:
            row = chunk.first + next(i for i, v in enumerate(values[k]) if None in v)
            raise DataError(f"{chunk.path}:{row}: the value under '{k}' is a list with nulls, not strings")
        if _string_type(col.type) and not hasattr(col.type, "value_type"):
            nbytes += int(pc.sum(pc.binary_length(col)).as_py() or 0)
        else:                                       # list<string> columns: count their strings' bytes
            nbytes += sum(len(s.encode()) for v in values[k] for s in ([v] if isinstance(v, str) else v))
    return values, batch.num_rows, nbytes
