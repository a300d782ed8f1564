"""Hugging Face export/import, eval and generate, checked against transformers built locally (no hub)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from gpt3d.interop.hf import export_hf
from gpt3d.interop.hf_import import import_hf
from gpt3d.inference.generate import generate, load_model, score_tokens

from tests.support import distributed
from tests.support.curves import make_trainer, run_curve, save_worker, tiny_config

transformers = pytest.importorskip("transformers")

LLAMA = dict(use_rotary_position_embeddings=True, normalization="rmsnorm", swiglu=True, num_key_value_heads=2,
             disable_bias_linear=True, untie_embeddings_and_output_weights=True)


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt3d", *args], capture_output=True, text=True, env=env)


def _load_hf(cls, path):
    """from_pretrained with every loading complaint captured: none may mention missing/unexpected keys."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    handler = Grab(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [r for r in records if any(w in r.lower() for w in ("missing", "unexpected", "newly initialized",
                                                                   "not used", "mismatch"))], records
    return model.eval()


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _hf_window_loss(model, ids, seq):
    """Sum of HF's loss over the same non-overlapping windows gpt3d eval scores."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq):
            w = ids[i:i + seq]
            if len(w) < 2:
                continue
            out = model(w[None], labels=w[None])
            total += float(out.loss) * (len(w) - 1)
            count += len(w) - 1
    return total / count, count


@pytest.mark.slow
def test_gpt2_export_matches_transformers_loss(text_prefix, bpe, heldout_text, tmp_path):
    """Train at TP2 x PP2, export: transformers' loss on held-out text equals `gpt3d eval` (fp32)."""
    ck, out = tmp_path / "ck", tmp_path / "hf"
    overrides = dict(num_layers=2, hidden_size=64, seq_length=32, vocab_size=None, mock_data=False,
                     data_path=[text_prefix], vocab_file=str(bpe.vocab), merge_file=str(bpe.merges),
                     split="949,50,1", train_iters=4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    distributed.run(4, save_worker, overrides, str(ck), 4)
    text = tmp_path / "heldout.txt"
    text.write_text(heldout_text)
    r = _cli("export-hf", "--load", str(ck), "--output", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "--load", str(ck), "--text-file", str(text), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    model = _load_hf(transformers.GPT2LMHeadModel, out)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor(tok(text.read_text())["input_ids"])
    from gpt3d.tokenizers.factory import build_tokenizer
    assert ids.tolist() == build_tokenizer(str(bpe.vocab), str(bpe.merges)).tokenize(text.read_text())
    loss, count = _hf_window_loss(model, ids, 32)
    assert ours["tokens"] == count and abs(ours["ppl"] - math.exp(ours["loss"])) < 1e-6 * ours["ppl"]
    assert abs(ours["loss"] - loss) <= 2e-3, (ours, loss)
    vocab_size = len(json.loads(bpe.vocab.read_text(encoding="utf-8")))
    assert loss < math.log(vocab_size) - 1.0   # trained a little: well below uniform over the vocabulary
    # a split of .bin/.idx data scores the same way
    r = _cli("eval", "--load", str(ck), "--data-path", text_prefix, "--eval-split", "valid",
             "--max-tokens", "700", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    split = json.loads(r.stdout)
    from gpt3d.inference.generate import _split_tokens
    ref, count = _hf_window_loss(model, _split_tokens(text_prefix, "949,50,1", "valid", vocab_size)[:700], 32)
    assert split["tokens"] == count and abs(split["loss"] - ref) <= 2e-3
    r = _cli("generate", "--load", str(ck), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--top-k", "20",
             "--json")
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)
    assert gen["text"].startswith("ROMEO:") and 1 <= len(gen["tokens"]) <= 8


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_rope_export_logits_and_kv_cache_generation(arch, tmp_path):
    """Llama style (GQA, untied, no biases) -> LlamaForCausalLM; RoPE + layernorm + GeLU with rotary percent
    0.25 (the seed's gpt-1.3B-rope) -> GPTNeoXForCausalLM. Logits match gpt3d; greedy decoding matches HF."""
    flags = LLAMA if arch == "llama" else dict(use_rotary_position_embeddings=True, rotary_percent=0.25)
    cfg = tiny_config(num_layers=2, hidden_size=64, save=str(tmp_path / "ck"), **flags)
    t = make_trainer(cfg)
    run_curve(cfg, iters=2, trainer=t)     # norms and weights away from their init
    t.save()
    export_hf(str(tmp_path / "ck"), str(tmp_path / "hf"))
    if arch == "llama":
        hf = _load_hf(transformers.LlamaForCausalLM, tmp_path / "hf")
        assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
    else:
        hf = _load_hf(transformers.GPTNeoXForCausalLM, tmp_path / "hf")
        assert hf.config.tie_word_embeddings and not hf.config.use_parallel_residual
    model, _, meta = load_model(str(tmp_path / "ck"))
    x = torch.randint(0, meta["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[..., :meta["vocab_size"]], hf(x).logits
    assert (ours - theirs).abs().max() <= 1e-4
    prompt = x[0, :5].tolist()
    cached = generate(model, prompt, 20, temperature=0)
    assert cached == generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached == hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None)[0].tolist()
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)
    assert generate(model, prompt, 20, **kw) == generate(model, prompt, 20, use_cache=False, **kw)
    low, _, _ = load_model(str(tmp_path / "ck"), dtype=torch.bfloat16)   # like training: weights bf16,
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())       # RoPE frequencies stay fp32
    assert all(b.dtype == torch.float32 for n, b in low.named_buffers() if n.endswith("inv_freq"))


def _random_hf(kind, path):
    torch.manual_seed(0)
    if kind == "gpt2":
        c = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(c)
    elif kind == "gpt_neox":
        c = transformers.GPTNeoXConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, hidden_act="gelu_new",
                                       use_parallel_residual=False, rotary_pct=0.5)
        model = transformers.GPTNeoXForCausalLM(c)
    else:
        c = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(c)
    with torch.no_grad():   # norms away from ones, biases away from zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(path))
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_import_export_round_trip_is_bitwise(kind, tmp_path):
    hf = _random_hf(kind, tmp_path / "src")
    import_hf(str(tmp_path / "src"), str(tmp_path / "ck"))
    model, cfg, _ = load_model(str(tmp_path / "ck"))
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x)[..., :300] - hf(x).logits).abs().max() <= 1e-4
    export_hf(str(tmp_path / "ck"), str(tmp_path / "back"))
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    _load_hf(type(hf), tmp_path / "back")
    # training starts from the imported weights (plain --load: no optimizer state in the checkpoint)
    import yaml
    model_cfg = yaml.safe_load((tmp_path / "ck" / "model.yaml").read_text())["model"]
    model_cfg.update(seq_length=12, hidden_dropout=0.0, attention_dropout=0.0)
    tcfg = tiny_config(load=str(tmp_path / "ck"), **model_cfg)
    trainer = make_trainer(tcfg)
    trainer.load(str(tmp_path / "ck"))
    chunk = trainer.model[0].eval()
    with torch.no_grad():
        assert (chunk(x)[..., :300] - hf(x).logits).abs().max() <= 1e-4
    losses = run_curve(tcfg, iters=2, trainer=trainer)["losses"]
    assert all(math.isfinite(v) for v in losses)


def test_bad_exports_fail_with_one_line_and_keep_data(tmp_path):
    cfg = tiny_config(num_layers=2, save=str(tmp_path / "ck"), **{**LLAMA, "rotary_percent": 0.5})
    t = make_trainer(cfg)
    t.save()
    r = _cli("export-hf", "--load", str(tmp_path / "ck"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--rotary-percent" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    cfg = tiny_config(num_layers=2, save=str(tmp_path / "ck2"))
    make_trainer(cfg).save()
    r = _cli("export-hf", "--load", str(tmp_path / "ck2"), "--output", str(tmp_path / "full"))
    assert r.returncode == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    r = _cli("import-hf", "--input", str(tmp_path / "full"), "--save", str(tmp_path / "new"))
    assert r.returncode == 2 and "no config.json" in r.stderr and not (tmp_path / "new").exists()
    r = _cli("eval", "--load", str(tmp_path / "nowhere"), "--text-file", str(tmp_path / "full" / "keep.txt"))
    assert r.returncode == 2 and r.stderr.startswith("gpt3d: error:") and len(r.stderr.strip().splitlines()) == 1


def test_score_tokens_windows():
    """Windows are non-overlapping; a short tail window counts, a 1-token tail does not."""
    cfg = tiny_config(num_layers=2)
    t = make_trainer(cfg)
    model = t.model[0].eval()
    ids = torch.randint(0, 256, (16 * 3 + 5,), generator=torch.Generator().manual_seed(2))
    total, count = score_tokens(model, ids, 16, batch_size=2)
    assert count == 3 * 15 + 4
    with torch.no_grad():
        ref = sum(float(model(w[None, :-1], w[None, 1:]).sum()) for w in ids.split(16))
    assert abs(total - ref) <= 1e-4 * abs(ref)
    assert score_tokens(model, ids[:33], 16)[1] == 30


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_kv_cache_chunks_match_full_forward(arch):
    """Feeding a sequence in pieces through the cache gives the logits of one full forward."""
    from gpt3d.model.attention import KVCache
    cfg = tiny_config(num_layers=2, init_method_std=0.3, **(LLAMA if arch == "llama" else {}))
    model = make_trainer(cfg).model[0].eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    cache, pieces = KVCache(), []
    with torch.no_grad():
        full = model(x)
        for lo, hi in ((0, 3), (3, 9), (9, 10), (10, 16)):
            pieces.append(model(x[:, lo:hi], kv_cache=cache))
    assert cache.length == 16
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5
    first = generate(model, x[0, :4].tolist(), 10, temperature=0)
    assert first == generate(model, x[0, :4].tolist(), 10, temperature=0, use_cache=False)
