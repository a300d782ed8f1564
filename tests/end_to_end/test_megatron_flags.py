"""Megatron-DeepSpeed's seed launch scripts and ds_config.json, taken as they are.

The five examples_deepspeed/rebase scripts (125M, 125M flash-attn, 1.3B, 1.3B RoPE, 13B) are rebuilt
here as the full pretrain_gpt.py argument lists they pass, in their order, with --deepspeed_config
pointing at their ds_config template filled in as they fill it. Each must parse into the settings the
script means, DeepSpeed's loss-scaling values included; conflicts and DeepSpeed features gpt3d lacks
stop with one error line naming the key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt3d.cli import build_parser, main
from gpt3d.config.load import load_config
from gpt3d.errors import ConfigError
from gpt3d.data.sizing import train_iterations, train_valid_test_num_samples

from tests.support import ROOT

TEMPLATE = """{
  "train_batch_size": GBSIZE,
  "train_micro_batch_size_per_gpu": MBSIZE,
  "steps_per_print": LOG_INTERVAL,
  "zero_optimization": {"stage": ZERO_STAGE},
  "gradient_clipping": 1.0,
  "prescale_gradients": PRESCALE_GRAD,
  "fp16": {"enabled": true, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
           "min_loss_scale": 1, "initial_scale_power": 11},
  "wall_clock_breakdown" : false
}"""

# model block, parallelism and extra flags of each seed script
SEEDS = {
    "125M": dict(layers=12, hidden=768, heads=12, gbs=256, lr="6.0e-4", std="0.02", mp=2, pp=2, extra=[]),
    "125M_flashattn": dict(layers=12, hidden=768, heads=12, gbs=256, lr="6.0e-4", std="0.02", mp=2, pp=2,
                           extra=["--use-flash-attn"]),
    "1.3B": dict(layers=24, hidden=2048, heads=16, gbs=512, lr="2.0e-4", std="0.013", mp=4, pp=8, extra=[]),
    "1.3B_rope": dict(layers=24, hidden=2048, heads=16, gbs=512, lr="2.0e-4", std="0.013", mp=4, pp=8,
                      extra=["--use-rotary-position-embeddings", "--rotary-percent", "0.25"]),
    "13B": dict(layers=40, hidden=5120, heads=40, gbs=1024, lr="1.0e-4", std="0.008", mp=4, pp=8, extra=[]),
}
SEQ, MBS, LOG, ZERO = 2048, 2, 10, 1
TRAIN_SAMPLES = 300 * 1000000000 * 2 // SEQ


def ds_config(tmp_path, gbs, **edit) -> str:
    text = (TEMPLATE.replace("GBSIZE", str(gbs)).replace("MBSIZE", str(MBS)).replace("LOG_INTERVAL", str(LOG))
            .replace("ZERO_STAGE", str(ZERO)).replace("PRESCALE_GRAD", "false"))
    cfg = json.loads(text)
    for key, value in edit.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"ds_config_gbs{gbs}_mbs{MBS}_log{LOG}_zero{ZERO}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def seed_argv(name: str, config_json: str, ckpt: str = "output/checkpoint/job", tb: str = "output/tb") -> list:
    """megatron_options + data_options + deepspeed_options, as the seed script assembles them."""
    s = SEEDS[name]
    megatron = ["--override-opt_param-scheduler", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                "--tensor-model-parallel-size", str(s["mp"]), "--init-method-std", s["std"],
                "--lr-decay-tokens", "300000000000", "--lr-warmup-tokens", "3000000000",
                "--micro-batch-size", str(MBS), "--exit-duration-in-mins", "30000000",
                "--global-batch-size", str(s["gbs"]), "--num-layers", str(s["layers"]),
                "--hidden-size", str(s["hidden"]), "--num-attention-heads", str(s["heads"]),
                "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
                "--train-tokens", "300000000000", "--train-samples", str(TRAIN_SAMPLES),
                "--lr", s["lr"], "--min-lr", "1.0e-6", "--lr-decay-style", "cosine", "--split", "949,50,1",
                "--log-interval", str(LOG), "--eval-interval", "100", "--eval-iters", "10",
                "--save-interval", "100", "--weight-decay", "0.1", "--clip-grad", "1.0", "--hysteresis", "2",
                "--num-workers", "0", "--fp16", "--seed", "1234", "--load", ckpt, "--save", ckpt,
                "--no-async-tensor-model-parallel-allreduce", *s["extra"], "--tensorboard-queue-size", "1",
                "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
                "--log-validation-ppl-to-tensorboard", "--tensorboard-dir", tb,
                "--checkpoint-activations", "--log-optimizer-states-to-tensorboard"]
    data = ["--vocab-file", "gpt2-vocab.json", "--merge-file", "gpt2-merges.txt",
            "--data-path", "pile_text_document", "--data-impl", "mmap"]
    deepspeed = ["--deepspeed", "--deepspeed_config", config_json, "--zero-stage", str(ZERO),
                 "--pipeline-model-parallel-size", str(s["pp"]), "--deepspeed-activation-checkpointing"]
    return megatron + data + deepspeed


def parse(argv: list):
    return load_config(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_script_parses_into_the_config_it_means(name, tmp_path, monkeypatch):
    s = SEEDS[name]
    world = s["mp"] * s["pp"] * 2
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = parse(seed_argv(name, ds_config(tmp_path, s["gbs"])))
    m, p, t, pr = cfg.model, cfg.parallel, cfg.training, cfg.precision
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.max_position_embeddings) == \
        (s["layers"], s["hidden"], s["heads"], SEQ, SEQ)
    assert m.init_method_std == float(s["std"]) and m.recompute_granularity == "full"
    assert m.use_flash_attn == (name == "125M_flashattn")
    assert m.use_rotary_position_embeddings == (name == "1.3B_rope")
    assert m.rotary_percent == (0.25 if name == "1.3B_rope" else 1.0)
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.zero_stage) == (s["mp"], s["pp"], 1)
    assert p.no_async_tensor_model_parallel_allreduce and not p.no_pipeline_parallel
    assert (t.micro_batch_size, t.global_batch_size) == (MBS, s["gbs"])
    assert (t.train_samples, t.train_tokens, t.train_iters) == (TRAIN_SAMPLES, 300_000_000_000, None)
    assert (t.log_interval, t.eval_interval, t.eval_iters, t.seed) == (LOG, 100, 10, 1234)
    assert t.exit_duration_in_mins == 30000000
    assert (t.tensorboard_queue_size, t.log_timers_to_tensorboard, t.log_batch_size_to_tensorboard,
            t.log_validation_ppl_to_tensorboard, t.log_optimizer_states_to_tensorboard) == (1, True, True, True, True)
    assert t.deepspeed and t.deepspeed_config.endswith(".json")
    # fp16 with DeepSpeed's loss scaling from the ds_config, not gpt3d's defaults
    assert pr.fp16 and not pr.bf16 and pr.loss_scale is None
    assert (pr.initial_loss_scale, pr.loss_scale_window, pr.hysteresis, pr.min_loss_scale) == (2048.0, 500, 2, 1.0)
    o, sc = cfg.optimizer, cfg.scheduler
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert (sc.lr, sc.min_lr, sc.lr_decay_style) == (float(s["lr"]), 1e-6, "cosine")
    assert (sc.lr_warmup_tokens, sc.lr_decay_tokens, sc.override_opt_param_scheduler) == \
        (3_000_000_000, 300_000_000_000, True)
    d = cfg.data
    assert (d.data_path, d.split, d.data_impl, d.vocab_file) == (["pile_text_document"], "949,50,1", "mmap",
                                                                 "gpt2-vocab.json")
    assert cfg.checkpoint.load == cfg.checkpoint.save == "output/checkpoint/job"
    assert cfg.checkpoint.save_interval == 100
    cfg.validate(world)
    iters = train_iterations(t.train_iters, t.train_samples, t.train_tokens, s["gbs"], SEQ)
    assert iters == TRAIN_SAMPLES // s["gbs"]
    assert train_valid_test_num_samples(iters, t.train_samples, s["gbs"], 100, 10) == \
        (TRAIN_SAMPLES, (iters // 100 + 1) * 10 * s["gbs"], 10 * s["gbs"])


def test_defaults_that_size_the_index_are_megatrons():
    """Megatron-DeepSpeed's arguments.py: --seed 1234, --split '969, 30, 1', --eval-interval 1000,
    --eval-iters 100, --global-batch-size micro x DP, --data-impl infer. A command line that leaves them out
    gets the same (train, valid, test) sample counts, hence the same index, in gpt3d."""
    from gpt3d.data.gpt_dataset import get_split_ranges
    cfg = parse(["--data-path", "corpus", "--train-iters", "5000", "--micro-batch-size", "4"])
    t, d = cfg.training, cfg.data
    assert (t.seed, t.eval_interval, t.eval_iters, t.global_batch_size, d.data_impl) == (1234, 1000, 100, None,
                                                                                          "infer")
    for docs in (1, 7, 1000, 123457):
        assert get_split_ranges(d.split, docs) == get_split_ranges("969, 30, 1", docs)
    assert train_valid_test_num_samples(5000, t.train_samples, 4, t.eval_interval, t.eval_iters) == \
        (20_000, 6 * 100 * 4, 100 * 4)


TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--mock-data", "--train-iters", "1", "--device", "cpu", "--micro-batch-size", "2"]


def _one_error_line(capsys, argv) -> str:
    rc = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error: "), err
    return err[0]


@pytest.mark.parametrize("edit,flags,key", [
    ({"train_batch_size": 512}, ["--global-batch-size", "256"], "train_batch_size = 512 conflicts with "
                                                                "--global-batch-size 256"),
    ({"train_micro_batch_size_per_gpu": 4}, [], "train_micro_batch_size_per_gpu = 4 conflicts with "
                                                "--micro-batch-size 2"),
    ({"gradient_clipping": 0.5}, ["--clip-grad", "1.0"], "gradient_clipping = 0.5 conflicts with --clip-grad"),
    ({"zero_optimization.stage": 0}, ["--zero-stage", "1"], "zero_optimization.stage = 0 conflicts"),
    ({"fp16.hysteresis": 4}, ["--hysteresis", "2"], "fp16.hysteresis = 4 conflicts with --hysteresis 2"),
    ({}, ["--bf16"], "fp16.enabled"),      # the file asks for fp16, the flag for bf16
    ({"zero_optimization.stage": 3}, [], "zero_optimization.stage: ZeRO stage 3 is not supported"),
    ({"zero_optimization.stage": 2}, [], "zero_optimization.stage: ZeRO stage 2 is not supported"),
    ({"zero_optimization.offload_optimizer": {"device": "cpu"}}, [], "zero_optimization.offload_optimizer"),
    ({"optimizer": {"type": "Adam"}}, [], "optimizer: gpt3d's AdamW"),
    ({"wall_clock_breakdown": True}, [], "wall_clock_breakdown: only false"),
    ({"activation_checkpointing": {"partition_activations": True}}, [], "activation_checkpointing: a DeepSpeed"),
])
def test_conflicts_and_unsupported_features_give_one_line(edit, flags, key, tmp_path, capsys):
    path = ds_config(tmp_path, 8, **edit)
    line = _one_error_line(capsys, [*TINY, *flags, "--deepspeed", "--deepspeed_config", path])
    assert key in line and path in line


def test_steps_per_print_is_accepted_and_leaves_the_log_interval_alone(tmp_path, monkeypatch, capsys):
    """In Megatron-DeepSpeed steps_per_print paces DeepSpeed's own prints and --log-interval Megatron's log
    line, independently; gpt3d's log line is Megatron's, so only --log-interval sets it."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    path = ds_config(tmp_path, 8, steps_per_print=5)
    for flags, interval in ((["--log-interval", "10"], 10), (["--log-interval", "3"], 3), ([], 10)):
        cfg = parse([*TINY, *flags, "--deepspeed", "--deepspeed_config", path])
        assert cfg.training.log_interval == interval
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "steps_per_print does not change it" in " ".join(capsys.readouterr().out.split())


def test_ds_config_fills_what_the_flags_leave_open(tmp_path, monkeypatch):
    """Absent keys take DeepSpeed's defaults; gradient_accumulation_steps fixes the global batch with DP."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5,
                                "bf16": {"enabled": True}, "zero_optimization": {"stage": 1,
                                                                                 "reduce_bucket_size": 5e8}}))
    cfg = parse([*TINY[:-2], "--tensor-model-parallel-size", "2", "--deepspeed", "--deepspeed_config", str(path)])
    t = cfg.training
    assert (t.micro_batch_size, t.global_batch_size) == (3, 3 * 5 * 2)     # DP = 4 / TP 2
    assert cfg.precision.bf16 and not cfg.precision.fp16
    assert cfg.optimizer.clip_grad == 0.0                                  # DeepSpeed clips only if asked
    assert cfg.parallel.zero_stage == 1 and cfg.parallel.bucket_size_mb == pytest.approx(5e8 * 4 / 2 ** 20)
    path.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 3,
                                "gradient_accumulation_steps": 5}))
    with pytest.raises(ConfigError, match="train_batch_size: 32 != train_micro_batch_size_per_gpu"):
        parse([*TINY[:-2], "--tensor-model-parallel-size", "2", "--deepspeed", "--deepspeed_config", str(path)])


@pytest.mark.parametrize("flags,text", [
    (["--data-impl", "lazy"], "--data-impl lazy is not supported"),
    (["--deepspeed"], "--deepspeed needs --deepspeed_config"),
    (["--deepspeed_config", "x.json"], "--deepspeed_config is read only with --deepspeed"),
    (["--deepspeed", "--deepspeed_config", "/nonexistent/ds.json"], "file not found: /nonexistent/ds.json"),
    (["--no-pipeline-parallel", "--pipeline-model-parallel-size", "2"], "--no-pipeline-parallel needs"),
    (["--train-samples", "64"], "--train-iters and --train-samples are exclusive"),
])
def test_megatron_flags_refused_with_one_line(flags, text, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert text in _one_error_line(capsys, [*TINY, *flags])


def test_documented_no_ops_and_aliases_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-async-tensor-model-parallel-allreduce accepted, no effect: gpt3d's column-parallel" in out
    assert "--no-override-opt_param-scheduler accepted, no effect: gpt3d always takes the LR schedule" in out
    assert "--checkpoint-activations Megatron's name for --recompute-granularity full" in out
    assert "--deepspeed-activation-checkpointing DeepSpeed's activation checkpointing" in out
    cfg = parse([*TINY, "--deepspeed-activation-checkpointing", "--no-pipeline-parallel", "--train-samples", "64",
                 "--train-iters", "1"][:-2])
    assert cfg.model.recompute_granularity == "full" and cfg.parallel.no_pipeline_parallel


def test_optimizer_state_scalars_are_consistent():
    """fp32, one process: weight_l2 is the parameters' norm; sqrt(v) squared sums back to v's L1."""
    import torch

    from gpt3d.config import Config
    from gpt3d.data.sampler import build_data_loader
    from gpt3d.parallel.state import ParallelState
    from gpt3d.train import Trainer
    from gpt3d.train.report import optimizer_state_stats
    cfg = Config.from_dict({"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
                            "vocab_size": 128, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 3,
                            "mock_data": True, "device": "cpu"})
    trainer = Trainer(cfg, ParallelState.single())
    train_ds = trainer.build_datasets()[0]
    loader = iter(build_data_loader(train_ds, 0, 2, 0, 1))
    for _ in range(3):
        trainer.train_step(trainer.microbatches(loader))
    stats = optimizer_state_stats(trainer.optimizer.state_dict()["pieces"], trainer.ps, sharded=False)
    weights = torch.cat([p.detach().float().reshape(-1) for _, p in trainer.model.named_parameters()])
    assert stats["optimizer/weight_l2"] == pytest.approx(float(weights.norm()), rel=1e-5)
    assert stats["optimizer/weight_abs_max"] == pytest.approx(float(weights.abs().max()), rel=1e-6)
    assert stats["optimizer/variance_sqrt_l2"] ** 2 == pytest.approx(stats["optimizer/variance_l1"], rel=1e-5)
    assert stats["optimizer/variance_sqrt_abs_max"] ** 2 == pytest.approx(stats["optimizer/variance_abs_max"],
                                                                          rel=1e-5)
    assert stats["optimizer/momentum_l2"] > 0 and stats["optimizer/momentum_l1"] >= stats["optimizer/momentum_l2"]


@pytest.mark.slow
def test_seed_launcher_runs_with_torchrun(tmp_path):
    """examples/megatron-deepspeed/ds_pretrain_gpt_125M.sh as written, shrunk through its variables, on CPU:
    PP=2 over 2 processes, fp16 at the ds_config's 2^11 loss scale, Megatron's TensorBoard tags, an empty
    --load directory on the first run, and --train-tokens stopping before --train-samples."""
    from tokenizers import ByteLevelBPETokenizer

    from gpt3d.data.indexed import MMapIndexedDatasetBuilder
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([f"the fox {i} jumps over dog {i * i}" for i in range(200)], vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save_model(str(tmp_path))
    b = MMapIndexedDatasetBuilder(str(tmp_path / "corpus.bin"), np.uint16)
    rng = np.random.RandomState(0)
    for _ in range(200):
        b.add_item(rng.randint(0, 256, size=rng.randint(5, 80)))
        b.end_document()
    b.finalize(str(tmp_path / "corpus.idx"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "num_layers": "2", "hidden_size": "64", "num_attn_heads": "4", "seq_len": "32", "global_batch_size": "8",
           "mp_size": "1", "pp_size": "2", "NPROC_PER_NODE": "2", "train_samples": "80", "train_tokens": "1536",
           "lr_warmup_tokens": "256", "lr_decay_tokens": "2560", "log_interval": "2", "eval_interval": "3",
           "eval_iters": "1", "save_interval": "4", "data_path": str(tmp_path / "corpus"),
           "vocab_path": str(tmp_path / "vocab.json"), "merge_path": str(tmp_path / "merges.txt"),
           "output_home": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(ROOT / "examples" / "megatron-deepspeed" / "ds_pretrain_gpt_125M.sh"),
                        "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TP=1 PP=2 DP=1" in r.stdout and "10 iterations" in r.stdout      # 80 samples // 8
    assert "loss scale 2048" in r.stdout and "holds no checkpoint yet" in r.stdout   # tee: one stream
    ckpt = next((tmp_path / "out" / "checkpoint").iterdir())
    assert (ckpt / "latest").read_text() == "iter_0000006"                   # 1536 tokens = 6 x 8 x 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((tmp_path / "out" / "tensorboard").iterdir())))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"iteration-time/iteration-time", "batch-size/batch-size", "optimizer/variance_l2",
            "optimizer/weight_abs_max", "lm-loss-validation/lm loss validation ppl"} <= tags
    assert [e.step for e in events.Scalars("batch-size/batch-size")] == [2, 4, 6]
    assert all(bash_ok(p) for p in (ROOT / "examples" / "megatron-deepspeed").glob("*.sh"))


def bash_ok(path: Path) -> bool:
    return subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
