"""`gpt3d preprocess`: JSONL -> Megatron .bin/.idx (Megatron's tools/preprocess_data.py flags).

Outputs are written to temporary files beside the targets and renamed into
place only after the whole input was read, so a malformed line or a crash
never leaves a half-written corpus over an existing one.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Optional

from tqdm import tqdm

from ..errors import PreprocessError
from .indexed import MMapIndexedDatasetBuilder, best_dtype
from .tokenizer import TokenizerError, build_tokenizer

_worker: dict = {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSON-lines file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    p.add_argument("--vocab-file", required=True)
    p.add_argument("--merge-file", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    p.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=["GPT2BPETokenizer"])
    p.add_argument("--log-interval", type=int, default=10000, help="(accepted for Megatron compatibility)")


def _init(vocab: str, merges: str, keys: list, append_eod: bool) -> None:
    _worker["tok"] = build_tokenizer(vocab, merges)
    _worker["keys"], _worker["eod"] = keys, append_eod


def _encode(item: tuple) -> tuple:
    """(lineno, raw line) -> (lineno, {key: ids}, bytes, error)."""
    lineno, line = item
    if not line.strip():
        return lineno, None, len(line), None
    try:
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return lineno, None, len(line), f"malformed JSON ({e})"
    tok, out = _worker["tok"], {}
    for key in _worker["keys"]:
        if key not in doc:
            return lineno, None, len(line), f"missing key '{key}'"
        ids = tok.tokenize(str(doc[key]))
        if ids and _worker["eod"]:
            ids.append(tok.eod)
        out[key] = ids
    return lineno, out, len(line), None


def preprocess(input_path: str, output_prefix: str, vocab_file: str, merge_file: str, json_keys: list,
               append_eod: bool = False, workers: int = 1, progress: bool = True) -> dict:
    """Tokenize; returns stats. Raises ValueError('file:line: ...') on bad input, leaving outputs untouched."""
    tok = build_tokenizer(vocab_file, merge_file)
    if not os.path.isfile(input_path):
        raise ValueError(f"{input_path}: input file not found")
    dtype = best_dtype(tok.vocab_size)
    finals = {k: f"{output_prefix}_{k}_document" for k in json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = {k: f"{p}.tmp{os.getpid()}" for k, p in finals.items()}
    builders = {k: MMapIndexedDatasetBuilder(tmp[k] + ".bin", dtype) for k in json_keys}
    stats = {"docs": 0, "empty": 0, "tokens": 0, "bytes": 0}
    start = time.perf_counter()
    pool: Optional[mp.pool.Pool] = None
    ok = False
    try:
        with open(input_path, encoding="utf-8") as fh:
            lines = enumerate(fh, 1)
            if workers > 1:
                pool = mp.get_context("spawn").Pool(workers, _init, (vocab_file, merge_file, json_keys, append_eod))
                results = pool.imap(_encode, lines, chunksize=64)
            else:
                _init(vocab_file, merge_file, json_keys, append_eod)
                results = map(_encode, lines)
            # disable=None: no bar when stderr is not a terminal, so logs keep one line per error
            bar = tqdm(results, unit=" docs", disable=None if progress else True, file=sys.stderr,
                       mininterval=1.0)
            for lineno, doc, nbytes, err in bar:
                if err:
                    raise ValueError(f"{input_path}:{lineno}: {err}")
                stats["bytes"] += nbytes
                if doc is None or not any(doc.values()):
                    stats["empty"] += 1
                    continue
                for k, ids in doc.items():
                    if ids:
                        builders[k].add_item(ids)
                        builders[k].end_document()
                        stats["tokens"] += len(ids)
                stats["docs"] += 1
        for k, b in builders.items():
            b.finalize(tmp[k] + ".idx")
        for k in json_keys:
            for ext in (".bin", ".idx"):
                os.replace(tmp[k] + ext, finals[k] + ext)
        ok = True
    finally:
        if pool is not None:
            pool.terminate()
        if not ok:
            for k, b in builders.items():
                b.fh.close()
                for ext in (".bin", ".idx"):
                    if os.path.exists(tmp[k] + ext):
                        os.remove(tmp[k] + ext)
    secs = max(time.perf_counter() - start, 1e-9)
    stats.update(seconds=secs, docs_per_s=stats["docs"] / secs, mb_per_s=stats["bytes"] / secs / 2 ** 20,
                 outputs=[finals[k] for k in json_keys])
    return stats


def run(args: argparse.Namespace) -> int:
    try:
        s = preprocess(args.input, args.output_prefix, args.vocab_file, args.merge_file, args.json_keys,
                       args.append_eod, args.workers)
    except (ValueError, TokenizerError, OSError) as e:
        raise PreprocessError(str(e)) from e
    print(f"processed {s['docs']:,} documents ({s['empty']:,} empty skipped), {s['tokens']:,} tokens in "
          f"{s['seconds']:.1f}s: {s['docs_per_s']:,.0f} docs/s, {s['mb_per_s']:.2f} MB/s -> "
          + ", ".join(p + ".bin/.idx" for p in s["outputs"]))
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m gpt3d.data.preprocess ...` is `gpt3d preprocess ...`."""
    from ..cli import main as cli_main
    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
