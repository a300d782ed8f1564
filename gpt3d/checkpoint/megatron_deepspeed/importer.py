"""A Megatron-DeepSpeed checkpoint written out as a gpt3d checkpoint, by `train --load` and by `gpt3d
checkpoint import-megatron-deepspeed`.

The gpt3d checkpoint is written through gpt3d's own save sequence (store.save: temporary directory,
checksums, meta.json last, `latest`) at the saved run's TP x PP x DP layout, each rank of the job converting
its share of the shard files (convert.py), and is then loaded like any gpt3d checkpoint, at any layout, by
the parts that load gpt3d's own. It records the run's position (iteration, consumed samples and tokens: the
next sample is the one Megatron-DeepSpeed would draw), Adam's step and the fp16 loss scaler; the LR follows
from the position and the schedule's settings. The Megatron-DeepSpeed directory is only read.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ...config import Config, apply_flat, flatten
from ...data import stream
from ...errors import CheckpointError, warn
from ...parallel.state import ParallelState
from ..parts import ConfigPart, MetaPart
from ..reshard import check_compatible
from ..store import Reader, Writer, list_checkpoints, save
from ..tokenizer_part import TokenizerPart
from .convert import Converter, plan
from .names import target
from .settings import padded_vocab, refuse_unsupported, settings, shapes
from .source import Checkpoint


class _Value:
    """A fixed state for a MetaPart (the run's position, the loss scaler's state)."""

    def __init__(self, state: Optional[dict]):
        self.state = state

    def state_dict(self) -> Optional[dict]:
        return self.state


class ImportPart:
    """The converted shard files (this rank's share of the jobs) and the model's meta.json entries."""

    def __init__(self, ckpt: Checkpoint, layout: dict, vocab: int, ps: ParallelState):
        self.ckpt, self.layout, self.vocab, self.ps = ckpt, layout, vocab, ps
        self.converter = Converter(ckpt, layout, shapes(ckpt))

    def save(self, w: Writer) -> None:
        jobs = plan(self.ckpt, with_optimizer=self.ckpt.has_optimizer_state)
        for job in jobs[self.ps.rank::self.ps.world_size]:
            tensors, metadata = self.converter.run(job)
            w.tensors(job.out, tensors, metadata)
        c = self.ckpt
        w.meta("layout", {"tp": c.tp, "pp": c.pp, "dp": c.dp, **({"zero": 1} if c.has_optimizer_state else {})})
        w.meta("vocab_size", self.vocab)
        w.meta("padded_vocab", self.vocab)
        w.meta("params", self.layout)
        w.meta("imported_from", {"megatron_deepspeed": os.path.abspath(c.dir), "iteration": c.iteration,
                                 "tp": c.tp, "pp": c.pp, "dp": c.dp, "pipeline_engine": c.pipeline})

    def load(self, r: Reader) -> bool:
        raise CheckpointError("an imported checkpoint is loaded by the training parts")


def model_layout(cfg: Config, vocab: int) -> dict:
    """gpt3d's {name: {"shape", "split_dim", "tied_to"}} of the whole model (built on the meta device)."""
    from ...model.build import ModelChunks, build_full_model
    return ModelChunks([build_full_model(cfg.model, vocab, device=torch.device("meta"))]).layout()


def check_names(ckpt: Checkpoint, layout: dict) -> None:
    """Every gpt3d parameter comes from some saved parameter and every saved one has a place."""
    sh = shapes(ckpt)
    got = set()
    for s in ckpt.shards:
        for group in s.param_shapes:
            for name in group:
                t = target(name, sh, ckpt.layers if ckpt.pipeline else None)
                if t is not None:
                    got |= {t.name} | ({t.gate} if t.gate else set())
    if got != set(layout):
        missing, extra = sorted(set(layout) - got), sorted(got - set(layout))
        raise CheckpointError(f"{ckpt.dir}: its parameters do not match the model of its settings (missing "
                              f"{', '.join(missing) or 'none'}; unexpected {', '.join(extra) or 'none'})")


def scaler_state(ckpt: Checkpoint) -> Optional[dict]:
    """DeepSpeed's fp16 loss scaler as gpt3d's DynamicLossScaler state (None without fp16). DeepSpeed grows
    the scale when (cur_iter - last_overflow_iter) % window == 0 before counting the step, which is gpt3d's
    good-step count cur_iter - last_overflow_iter - 1; its cur_hysteresis is gpt3d's hysteresis left."""
    if not ckpt.args.get("fp16") or not ckpt.has_optimizer_state:
        return None
    from .unpickle import load
    osd = load(ckpt.shards[0].optim_files[0]).get("optimizer_state_dict") or {}
    ls = osd.get("loss_scaler")
    if ls is None or ls.get("cur_scale") is None:
        raise CheckpointError(f"{ckpt.shards[0].optim_files[0]}: fp16 run without a loss scaler state")
    if not osd.get("dynamic_loss_scale"):
        return {"scale": float(ls.get("cur_scale")), "good_steps": 0, "hysteresis_left": 1}
    good = int(ls.get("cur_iter", 0)) - int(ls.get("last_overflow_iter", -1)) - 1
    return {"scale": float(ls.get("cur_scale")), "good_steps": max(good, 0),
            "hysteresis_left": int(ls.get("cur_hysteresis", ls.get("delayed_shift", 1)))}


def check_save_dir(save: Optional[str], ckpt: Checkpoint) -> None:
    if not save:
        raise CheckpointError(f"--load {ckpt.root} is a Megatron-DeepSpeed checkpoint: gpt3d converts it into "
                              "--save, so give --save NEW_DIR")
    mine, theirs = os.path.realpath(save), os.path.realpath(os.path.dirname(ckpt.dir))
    if mine == theirs or mine.startswith(theirs + os.sep):
        raise CheckpointError(f"--save {save} is the Megatron-DeepSpeed checkpoint's directory "
                              f"{os.path.dirname(ckpt.dir)} (or inside it): its files are never modified; give a "
                              "new --save directory")
    existing = list_checkpoints(save)
    if existing:
        raise CheckpointError(f"--save {save} already holds gpt3d checkpoints (newest {existing[-1]}): continue "
                              f"from them with --load {save}, or give an empty --save to import again")


def data_changes(ckpt: Checkpoint, state: dict) -> list[str]:
    """The data stream settings (stream.LABELS) in which this run differs from the saved one. Data files are
    compared by name: the run's copy of the corpus usually lives in another directory."""
    a = ckpt.args
    saved = {"data_path": [os.path.basename(x) for x in a.get("data_path") or []], "split": a.get("split"),
             "seq_length": a.get("seq_length"), "global_batch_size": a.get("global_batch_size"),
             "seed": a.get("seed")}
    mine = {**state, "data_path": [os.path.basename(x) for x in state.get("data_path") or []]}
    return stream.changes(saved, mine)


def convert(ckpt: Checkpoint, root: str, ps: ParallelState, cfg: Config, vocab: int, tokenizer,
            data_state: dict) -> str:
    """Write `ckpt` as gpt3d checkpoint iter_<iteration> under `root` (a collective over `ps`); its path."""
    refuse_unsupported(ckpt)
    layout = model_layout(cfg, vocab)
    check_names(ckpt, layout)
    train = {"iteration": ckpt.iteration, "consumed_samples": ckpt.consumed_samples, "tokens": ckpt.tokens,
             "data_state": data_state}
    parts = {"config": ConfigPart(cfg.to_dict()), "tokenizer": TokenizerPart(tokenizer, writes_files=ps.rank == 0),
             "model": ImportPart(ckpt, layout, vocab, ps), "scaler": MetaPart(_Value(scaler_state(ckpt)), "scaler"),  # type: ignore[arg-type]
             "train": MetaPart(_Value(train), None)}  # type: ignore[arg-type]  # _Value: written, never loaded
    return save(root, parts, ps, ckpt.iteration)


# ----- `train --load MDS_DIR --save NEW_DIR` --------------------------------------------------------------------
def saved_config(ckpt: Checkpoint, run: Config) -> Config:
    """The run's settings with the checkpoint's model (what the converted checkpoint records)."""
    import dataclasses
    model_fields = {f.name for f in dataclasses.fields(type(run.model))}
    cfg = Config.from_dict(run.to_dict())
    apply_flat(cfg, flatten({k: v for k, v in settings(ckpt).items() if k in model_fields}))
    return cfg


def apply_settings(cfg: Config, given: set) -> dict:
    """Fill every setting `given` does not name from the Megatron-DeepSpeed checkpoint --load names (nothing
    when it names none); {setting: value} of those that changed."""
    if not cfg.checkpoint.load:
        return {}
    from .source import is_checkpoint
    if not is_checkpoint(cfg.checkpoint.load):
        return {}
    derived = settings(Checkpoint(cfg.checkpoint.load))
    before = Config.from_dict({})
    apply_flat(before, flatten(cfg.to_dict()))
    apply_flat(cfg, flatten({k: v for k, v in derived.items() if k not in given}, source="the checkpoint's args"))
    now, old = flatten(cfg.to_dict()), flatten(before.to_dict())
    return {k: v for k, v in now.items() if old[k] != v}


def import_for_run(trainer) -> str:
    """Convert the Megatron-DeepSpeed checkpoint of `trainer`'s --load into its --save (every rank); the
    gpt3d checkpoint's path, for trainer.load."""
    cfg, ps = trainer.cfg, trainer.ps
    ckpt = Checkpoint(cfg.checkpoint.load)
    check_save_dir(cfg.checkpoint.save, ckpt)
    saved = saved_config(ckpt, cfg)
    check_compatible({"config": saved.to_dict()}, cfg.model)   # as for gpt3d checkpoints, before any write
    want = padded_vocab(ckpt)
    if trainer.vocab_size != want:
        raise CheckpointError(f"{ckpt.dir}: its model has {want} vocabulary rows (Megatron-DeepSpeed's padded "
                              f"vocabulary, all in its loss) but this run's has {trainer.vocab_size}: pass "
                              f"--padded-vocab-size {want} (or leave it out to take it from the checkpoint)")
    original = (ckpt.args.get("universal_checkpoint_info") or {}).get("original_vocab_size")
    if trainer.tokenizer is not None and original and trainer.tokenizer.vocab_size != original:
        raise CheckpointError(f"{ckpt.dir} was trained with a tokenizer of {original} ids, this run's "
                              f"({trainer.tokenizer.type_name} {trainer.tokenizer.describe()}) has "
                              f"{trainer.tokenizer.vocab_size}")
    c = cfg.checkpoint
    if not ckpt.has_optimizer_state and not (c.no_load_optim or c.finetune):
        raise CheckpointError(f"{ckpt.dir} has no ZeRO optimizer files ([bf16_]zero_pp_rank_*_optim_states.pt): "
                              "pass --no-load-optim (or --finetune) to start from its weights alone")
    state = stream.data_state(cfg, trainer.global_batch)
    diffs = data_changes(ckpt, state)
    if diffs and not c.override_data_state:
        raise CheckpointError(f"continuing {ckpt.dir} would change the data stream: {'; '.join(diffs)}. Pass "
                              "--override-data-state to continue anyway")
    if diffs and ps.rank == 0:
        warn(f"--override-data-state: the data stream changed ({'; '.join(diffs)})")
    path = convert(ckpt, c.save, ps, saved, trainer.vocab_size, trainer.tokenizer, state)
    trainer.report.console(f"imported {ckpt.describe()} into {path}")
    return path


# ----- `gpt3d checkpoint import-megatron-deepspeed` -------------------------------------------------------------
def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def import_checkpoint(load: str, save: str, iteration: Optional[int] = None) -> dict:
    """Offline conversion on one process: the gpt3d checkpoint under `save` and, beside it, the run's settings
    as a YAML config (`gpt3d train --config SAVE/megatron_deepspeed.yaml --load SAVE ...` continues it)."""
    import yaml

    from ...config.rules import check_values
    from ...tokenizers.factory import model_vocab_size, tokenizer_from_config
    from ..lock import lock_save_dir
    ckpt = Checkpoint(load, iteration)
    check_save_dir(save, ckpt)
    derived = settings(ckpt)
    cfg = Config()
    apply_flat(cfg, flatten(derived, source="the checkpoint's args"))
    check_values(cfg)
    tok = None
    try:
        tok = tokenizer_from_config(cfg.data, cfg.model.vocab_size)
    except (OSError, ValueError) as e:   # the run's tokenizer files are on another machine
        warn(f"the checkpoint's tokenizer could not be read ({e}); the gpt3d checkpoint carries none")
    vocab = model_vocab_size(tok, cfg.model.vocab_size, cfg.model.padded_vocab_size) if tok else padded_vocab(ckpt)
    data_state = stream.data_state(cfg, cfg.training.global_batch_size)   # as the saved run recorded it
    if not all(os.path.exists(p + ".idx") for p in data_state["data_path"] if not _is_number(p)):
        del data_state["data_path"]   # another machine's paths: the run that loads it names its own copy
    ps = ParallelState.single()
    lock = lock_save_dir(save, ps)
    try:
        path = convert(ckpt, save, ps, cfg, vocab, tok, data_state)
    finally:
        lock.release()
    yaml_path = os.path.join(save, "megatron_deepspeed.yaml")
    with open(yaml_path, "w") as fh:
        yaml.safe_dump(derived, fh, sort_keys=False)
    return {"input": ckpt.dir, "checkpoint": path, "config": yaml_path, "iteration": ckpt.iteration,
            "layout": f"TP={ckpt.tp} PP={ckpt.pp} DP={ckpt.dp}"}
