"""Llama-style pretraining end to end with a user's own tokenizer (issue 16): tokenizer file -> preprocess ->
train -> resume -> eval / generate / export-hf from another directory -> transformers gives the same ids and
the same loss. The tokenizers are the ones tests/test_tokenizers.py trains on generated text."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_tokenizers import hf_bpe, make_texts, spm_model, texts, tokenizer_flags  # noqa: F401 (fixtures)

from gpt3d.cli import main as cli_main
from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.data.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")   # @record under capsys

LLAMA = ["--use-rotary-position-embeddings", "--normalization", "rmsnorm", "--swiglu", "--num-key-value-heads", "2",
         "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "1", "--lr-decay-iters", "20", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--seed", "3", "--device", "cpu", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "100",
        "--split", "90,10,0", "--no-mock-data"]


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_llama_pretraining_end_to_end(kind, hf_bpe, spm_model, texts, tmp_path, monkeypatch, capsys):  # noqa: F811
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    flags = tokenizer_flags(kind, hf_bpe, spm_model)
    tok = build_tokenizer(**{flags[i][2:].replace("-", "_"): flags[i + 1] for i in (0, 2)})
    # the user's corpus and tokenizer file, named relative to where they work
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 2))
    os.symlink(flags[3], work / os.path.basename(flags[3]))
    rel = [flags[0], flags[1], flags[2], os.path.basename(flags[3])]
    monkeypatch.chdir(work)
    assert cli_main(["preprocess", "--input", "corpus.jsonl", "--output-prefix", "data/c", "--append-eod",
                     "--workers", "2", *rel]) == 0
    data = MMapIndexedDataset("data/c_text_document")
    assert str(data.dtype) == ("int32" if kind == "bpe" else "uint16")
    assert cli_main(["train", *TINY, *LLAMA, *rel, "--data-path", "data/c_text_document", "--train-iters", "4",
                     "--save", "ck", "--save-interval", "2", "--log-file", "m.jsonl"]) == 0
    assert cli_main(["train", *TINY, *LLAMA, *rel, "--data-path", "data/c_text_document", "--train-iters", "6",
                     "--load", "ck", "--save", "ck", "--save-interval", "2", "--log-file", "m.jsonl"]) == 0
    assert (work / "ck" / "latest").read_text().strip() == "iter_0000006"
    losses = [r["loss"] for r in map(json.loads, (work / "m.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 6 and all(math.isfinite(x) for x in losses)

    # eval / generate / export-hf from another directory, the tokenizer named by absolute flags
    text = elsewhere / "held_out.txt"
    text.write_text("".join(make_texts(40, seed=9)))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    ck = str(work / "ck")
    assert cli_main(["eval", "--load", ck, "--text-file", "held_out.txt", "--device", "cpu", *flags]) == 0
    ours = _json_out(capsys)
    assert cli_main(["generate", "--load", ck, "--prompt", "Kato mo", "--max-new-tokens", "5", "--temperature",
                     "0", "--json", *flags]) == 0
    gen = _json_out(capsys)
    assert 1 <= len(gen["tokens"]) <= 5 and gen["text"].endswith(gen["completion"])
    assert cli_main(["export-hf", "--load", ck, "--output", "hf", *flags]) == 0
    assert _json_out(capsys)["tokenizer"] == tok.type_name

    hf_tok = transformers.AutoTokenizer.from_pretrained("hf")
    ids = hf_tok(text.read_text())["input_ids"]
    assert ids == tok.encode(text.read_text())
    assert hf_tok(texts[3])["input_ids"] == tok.encode(texts[3])
    model = transformers.AutoModelForCausalLM.from_pretrained("hf").eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    total, count, seq = 0.0, 0, 32
    with torch.no_grad():
        for i in range(0, len(ids), seq):
            w = torch.tensor(ids[i:i + seq])
            if len(w) >= 2:
                total += float(model(w[None], labels=w[None]).loss) * (len(w) - 1)
                count += len(w) - 1
    assert ours["tokens"] == count
    assert abs(ours["loss"] - total / count) <= 2e-3, (ours, total / count)
