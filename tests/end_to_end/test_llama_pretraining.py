"""Llama-style pretraining end to end with a user's own tokenizer (issue 16): tokenizer file -> preprocess ->
train -> resume -> eval / generate / export-hf from another directory -> transformers gives the same ids and
the same loss. The tokenizers are tests/conftest.py's `hf_bpe` and `spm_model`, trained on generated text."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from gpt3d.cli import main as cli_main
from gpt3d.data.indexed import MMapIndexedDataset
from gpt3d.tokenizers.factory import build_tokenizer

from tests.support.textgen import make_texts, tokenizer_flags

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


def _tokenizer_copy(kind: str, hf_bpe: str, spm_model: str, dest) -> list:
    """A copy of the tokenizer's files at `dest` and the flags that name it there."""
    if kind == "bpe":
        shutil.copytree(hf_bpe, dest)
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(dest)]
    dest.mkdir()
    shutil.copyfile(spm_model, dest / "sp.model")
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(dest / "sp.model")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_llama_pretraining_end_to_end(kind, hf_bpe, spm_model, texts, tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    # the user's corpus and tokenizer files, named relative to where they work
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 2))
    flags = _tokenizer_copy(kind, hf_bpe, spm_model, work / "tok")
    rel = [*flags[:3], os.path.relpath(flags[3], work)]
    tok = build_tokenizer(**{flags[i][2:].replace("-", "_"): flags[i + 1] for i in (0, 2)})
    assert cli_main(["preprocess", "--input", "corpus.jsonl", "--output-prefix", "data/c", "--append-eod",
                     "--workers", "2", *rel]) == 0
    data = MMapIndexedDataset("data/c_text_document")
    assert str(data.dtype) == ("int32" if kind == "bpe" else "uint16")
    train = ["train", *TINY, *LLAMA, "--data-path", "data/c_text_document", "--save", "ck", "--save-interval", "2",
             "--log-file", "m.jsonl"]
    assert cli_main([*train, *rel, "--train-iters", "4"]) == 0
    carried = json.loads((work / "ck" / "iter_0000004" / "meta.json").read_text())["tokenizer"]
    assert carried["fingerprint"] == tok.fingerprint and carried["eod"] == tok.eod
    assert sorted(os.listdir(work / "ck" / "iter_0000004" / "tokenizer")) == sorted(carried["files"])

    # resume: the same files at another path are the same tokenizer; other contents are refused in one line
    shutil.rmtree(work / "tok")
    moved = _tokenizer_copy(kind, hf_bpe, spm_model, work / "tok_moved")
    other = tokenizer_flags("spm" if kind == "bpe" else "bpe", hf_bpe, spm_model)
    capsys.readouterr()
    assert cli_main([*train, *other, "--train-iters", "6", "--load", "ck"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with another tokenizer" in err[0], err
    assert f"--tokenizer-model {os.path.join('ck', 'iter_0000004', 'tokenizer')}" in err[0]
    assert (work / "ck" / "latest").read_text().strip() == "iter_0000004"
    assert cli_main([*train, *moved, "--train-iters", "6", "--load", "ck"]) == 0
    assert (work / "ck" / "latest").read_text().strip() == "iter_0000006"
    losses = [r["loss"] for r in map(json.loads, (work / "m.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 6 and all(math.isfinite(x) for x in losses)

    # eval / generate / export-hf with no tokenizer flags, from another directory, the checkpoint moved and
    # every other copy of the tokenizer deleted
    shutil.rmtree(work / "tok_moved")
    ck = str(elsewhere / "ck_moved")
    shutil.move(str(work / "ck"), ck)
    text = elsewhere / "held_out.txt"
    text.write_text("".join(make_texts(40, seed=9)))
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli_main(["eval", "--load", ck, "--text-file", "held_out.txt", "--device", "cpu"]) == 0
    ours = _json_out(capsys)
    assert cli_main(["generate", "--load", ck, "--prompt", "Kato mo", "--max-new-tokens", "5", "--temperature",
                     "0", "--json"]) == 0
    gen = _json_out(capsys)
    assert 1 <= len(gen["tokens"]) <= 5 and gen["text"].endswith(gen["completion"])
    assert cli_main(["export-hf", "--load", ck, "--output", "hf"]) == 0
    assert _json_out(capsys)["tokenizer"] == tok.type_name
    assert cli_main(["checkpoint-info", ck]) == 0
    assert f"tokenizer: {tok.type_name} (" in capsys.readouterr().out

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

    # import-hf carries the export's tokenizer too: exporting again needs no flags and encodes the same
    assert cli_main(["import-hf", "--input", "hf", "--save", "ck2"]) == 0
    assert json.loads((elsewhere / "ck2" / "iter_0000000" / "meta.json").read_text())["tokenizer"]["type"] == \
        "HuggingFaceTokenizer"
    shutil.move("ck2", "ck2_moved")
    assert cli_main(["export-hf", "--load", "ck2_moved", "--output", "hf2"]) == 0
    assert transformers.AutoTokenizer.from_pretrained("hf2")(text.read_text())["input_ids"] == ids
    if kind == "bpe":   # the imported copy was re-written by export-hf: the user's original files still match it
        again = _tokenizer_copy(kind, hf_bpe, spm_model, elsewhere / "tok_again")
        capsys.readouterr()
        assert cli_main(["train", "--config", "ck2_moved/model.yaml", *TINY, *LLAMA,
                         "--data-path", str(work / "data" / "c_text_document"), *again,
                         "--load", "ck2_moved", "--finetune", "--train-iters", "1", "--log-file", "ft.jsonl"]) == 0
        assert "loaded checkpoint" in capsys.readouterr().out


def test_mock_data_checkpoints_carry_no_tokenizer(tmp_path, capsys):
    assert cli_main(["train", *TINY[:-1], "--mock-data", "--vocab-size", "64", "--train-iters", "1",
                     "--save", str(tmp_path / "ck")]) == 0
    meta = json.loads((tmp_path / "ck" / "iter_0000001" / "meta.json").read_text())
    assert "tokenizer" not in meta and not (tmp_path / "ck" / "iter_0000001" / "tokenizer").exists()
    assert cli_main(["checkpoint-info", str(tmp_path / "ck")]) == 0
    assert "tokenizer: none carried" in capsys.readouterr().out


def test_a_tokenizer_file_changed_under_a_run_fails_its_save(hf_bpe, tmp_path):
    from gpt3d.checkpoint.store import Writer
    from gpt3d.checkpoint.tokenizer_part import TokenizerPart
    from gpt3d.errors import CheckpointError
    from gpt3d.parallel.state import ParallelState
    shutil.copytree(hf_bpe, tmp_path / "tok")
    tok = build_tokenizer(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    TokenizerPart(tok).save(Writer(str(tmp_path / "a"), ParallelState.single()))
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "tok" / "tokenizer.json").read_bytes()
    with open(tmp_path / "tok" / "tokenizer.json", "a") as fh:
        fh.write("\n")
    with pytest.raises(CheckpointError, match="changed on disk since this run read it"):
        TokenizerPart(tok).save(Writer(str(tmp_path / "b"), ParallelState.single()))
