"""Corpus files -> Megatron .bin/.idx (`preprocess`; the `gpt3d preprocess` command is commands/preprocess.py),
at the tokenizer's own speed times the workers.

Megatron's tools/preprocess_data.py flags and output: the same ids (same tokenizer types), the same token
width, and the same .idx bytes (every non-empty sentence one sequence, --append-eod counted in the last
one, a document boundary for every document, empty ones included). Inputs are JSONL, .jsonl.gz,
.jsonl.zst or Parquet, several files or globs into one output or one output per shard.

Speed: the reading process only cuts raw chunks and writes numpy arrays; each worker decodes, validates
and batch-encodes whole chunks with one tokenizer thread, so throughput is the tokenizer's batch speed
times the workers. Memory is flat: a bounded number of chunks is in flight and the index streams to disk.
Outputs are written beside their targets and renamed into place only when complete, so a bad line or a
crash never leaves a half-written corpus over an existing one.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import time
from collections import deque
from typing import Optional, Union
from collections.abc import Iterable, Iterator

import numpy as np

from ..files import atomic
from ..errors import DataError, TokenizerError
from ..console.progress import Progress
from . import corpus
from .indexed import MMapIndexedDatasetBuilder, best_dtype
from ..tokenizers.factory import build_tokenizer

_state: dict = {}
SUFFIXES = (".gz", ".zst", ".zstd", ".jsonl", ".json", ".parquet", ".pq")


# ----- worker side -----------------------------------------------------------------------------------------------
def _init(spec: dict, keys: list, append_eod: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # one thread per worker: --workers is the knob
    tok = build_tokenizer(**spec, quiet=True)          # the reading process warned already
    _state.update(tok=tok, keys=keys, eod=tok.require_eod() if append_eod else None,
                  dtype=best_dtype(tok.vocab_size))


def _encode_key(values: list) -> tuple:
    """Documents (text or list of sentence texts) -> (flat tokens, sizes per sequence, sequences per doc)."""
    tok, eod = _state["tok"], _state["eod"]
    if all(type(v) is str for v in values):
        owner = None
        ids = tok.encode_batch(values)
        if eod is not None:
            for x in ids:
                if x:
                    x.append(eod)
    else:
        texts, owner = [], []
        for d, v in enumerate(values):
            for s in [v] if type(v) is str else v:
                texts.append(s)
                owner.append(d)
        ids = tok.encode_batch(texts)
        if eod is not None:
            last = {d: i for i, (d, x) in enumerate(zip(owner, ids)) if x}
            for i in last.values():
                ids[i].append(eod)
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    keep = lens > 0
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_state["dtype"], count=int(lens.sum()))
    if owner is None:
        per_doc = keep.astype(np.int64)
    else:
        per_doc = np.bincount(np.asarray(owner, dtype=np.int64)[keep], minlength=len(values))
    return tokens, lens[keep].astype(np.int32), per_doc


def _encode_chunk(chunk: corpus.Chunk) -> tuple:
    values, ndocs, nbytes = corpus.decode(chunk, _state["keys"])
    try:
        out = {k: _encode_key(values[k]) for k in _state["keys"]}
    except TokenizerError as e:        # e.g. NullTokenizer text that is not ids: find the line
        raise DataError(_locate(chunk, values, e)) from None
    empty = np.ones(ndocs, dtype=bool)
    for _, _, per_doc in out.values():
        empty &= per_doc == 0
    return out, ndocs, nbytes, sum(len(t) for t, _, _ in out.values()), int(empty.sum())


def _locate(chunk: corpus.Chunk, values: dict, err: Exception) -> str:
    for docs in values.values():
        for i, v in enumerate(docs):
            try:
                _state["tok"].encode_batch([v] if type(v) is str else v)
            except TokenizerError:
                return f"{chunk.path}:{_line_of(chunk, i)}: {err}"
    return f"{chunk.path}:{chunk.first}: {err}"


def _line_of(chunk: corpus.Chunk, doc: int) -> int:
    if not isinstance(chunk.data, (bytes, bytearray)):
        return chunk.first + doc
    seen = -1
    for i, ln in enumerate(chunk.data.split(b"\n")):
        seen += bool(ln.strip())
        if seen == doc:
            return chunk.first + i
    return chunk.first


# ----- reading process -------------------------------------------------------------------------------------------
def _in_order(pool, items: Iterable, depth: int) -> Iterator[tuple]:
    """Results in input order with at most `depth` chunks in flight (flat memory)."""
    if pool is None:
        yield from map(_encode_chunk, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(_encode_chunk, (item,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _base_name(path: str) -> str:
    name = os.path.basename(path)
    while name.lower().endswith(SUFFIXES):
        name = name[:name.rfind(".")]
    return name


def plan_outputs(files: list, prefixes: Union[str, list]) -> list[tuple[str, list]]:
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    if len(prefixes) == 1 and "{name}" in prefixes[0]:
        plan = [(prefixes[0].replace("{name}", _base_name(f)), [f]) for f in files]
    elif len(prefixes) == 1:
        plan = [(prefixes[0], list(files))]
    elif len(prefixes) == len(files):
        plan = [(p, [f]) for p, f in zip(prefixes, files)]
    else:
        raise DataError(f"{len(prefixes)} output prefixes for {len(files)} input files: give one, one per "
                        "input, or one containing {name}")
    seen = [p for p, _ in plan]
    dup = next((p for p in seen if seen.count(p) > 1), None)
    if dup is not None:
        raise DataError(f"two inputs would write the same output {dup} (use a prefix per input)")
    return plan


def _progress(files: list, stream, enabled: bool) -> Progress:
    """Counted in what tells the total up front: Parquet rows, plain JSONL bytes; else documents, no ETA."""
    kinds = {corpus.kind(f) for f in files}
    if kinds == {"parquet"}:
        import pyarrow.parquet as pq
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        return Progress("preprocess", rows, "documents", stream=stream, enabled=enabled)
    if kinds == {"jsonl"}:
        size = sum(os.path.getsize(f) for f in files) / 2 ** 20
        return Progress("preprocess", size, "MB", stream=stream, enabled=enabled)
    return Progress("preprocess", None, "documents", stream=stream, enabled=enabled)


def preprocess(inputs: Union[str, list], output_prefix: Union[str, list], vocab_file: Optional[str] = None,
               merge_file: Optional[str] = None, json_keys: Iterable = ("text",), append_eod: bool = False,
               workers: int = 1, progress: bool = True, *, tokenizer_type: str = "GPT2BPETokenizer",
               tokenizer_model: Optional[str] = None, vocab_size: Optional[int] = None,
               log_interval: int = 100000, stream=None) -> dict:
    """Tokenize; returns totals. Raises DataError('FILE:LINE: ...') / TokenizerError on bad input, leaving
    existing outputs untouched."""
    keys = list(json_keys)
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    spec = dict(vocab_file=vocab_file, merge_file=merge_file, tokenizer_type=tokenizer_type,
                tokenizer_model=tokenizer_model, vocab_size=vocab_size)
    tok = build_tokenizer(**spec)
    if append_eod:
        tok.require_eod()
    files = corpus.expand_inputs(inputs)
    for f in files:
        corpus.check_input(f, keys)
    plan = plan_outputs(files, output_prefix)
    dtype = best_dtype(tok.vocab_size)
    start = time.perf_counter()
    stats = {"docs": 0, "empty": 0, "tokens": 0, "bytes": 0}
    bar = _progress(files, stream, progress)
    every, next_line = max(1, log_interval), max(1, log_interval)
    pool = None
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init, (spec, keys, append_eod))
        else:
            _init(spec, keys, append_eod)
        for prefix, group in plan:
            for ndocs, nbytes, ntok in _write_output(prefix, group, keys, dtype, pool, 2 * workers + 2, stats):
                force = stats["docs"] >= next_line           # Megatron's --log-interval, in documents
                next_line = (stats["docs"] // every + 1) * every if force else next_line
                if bar.unit == "documents":
                    bar.update(ndocs, force, MB=nbytes / 2 ** 20, tokens=ntok)
                else:
                    bar.update(nbytes / 2 ** 20, force, documents=ndocs, tokens=ntok)
        bar.close()
    finally:
        if pool is not None:
            pool.terminate()
        bar.close(done=False)
    secs = max(time.perf_counter() - start, 1e-9)
    stats.update(seconds=secs, docs_per_s=stats["docs"] / secs, mb_per_s=stats["bytes"] / secs / 2 ** 20,
                 tokens_per_s=stats["tokens"] / secs, files=len(files), dtype=np.dtype(dtype).name,
                 outputs=[f"{p}_{k}_document" for p, _ in plan for k in keys])
    return stats


def _write_output(prefix: str, files: list, keys: list, dtype, pool, depth: int,
                  stats: dict) -> Iterator[tuple]:
    """Every key's .bin/.idx is written under a temporary name (atomic.replacing) and renamed into place once
    all of them are complete; on an error the temporary files go and existing outputs stay as they were.
    Yields (documents, bytes, tokens) of each chunk written, for the progress line."""
    with contextlib.ExitStack() as stack:
        tmp = {(k, ext): stack.enter_context(atomic.replacing(f"{prefix}_{k}_document{ext}"))
               for k in keys for ext in (".bin", ".idx")}
        builders = {}
        for k in keys:
            builders[k] = MMapIndexedDatasetBuilder(tmp[k, ".bin"], dtype)
            stack.callback(builders[k].close)   # runs before the temporary files go; a second close is a no-op
        items = itertools.chain.from_iterable(corpus.chunks(f, keys) for f in files)
        for out, ndocs, nbytes, ntok, nempty in _in_order(pool, items, depth):
            for k, (tokens, sizes, per_doc) in out.items():
                builders[k].add_docs(tokens, sizes, per_doc)
            stats["docs"] += ndocs
            stats["bytes"] += nbytes
            stats["tokens"] += ntok
            stats["empty"] += nempty
            yield ndocs, nbytes, ntok
        for k, b in builders.items():
            b.finalize(tmp[k, ".idx"])
