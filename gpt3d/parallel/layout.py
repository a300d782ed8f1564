"""The run's parallel layout, resolved once from the config and the world size, and every rule about it.

Why its own module: how many ranks each parallel dimension gets, how the global batch becomes micro-batches,
how far the vocabulary is padded and which layers each pipeline stage (and each of its virtual chunks) holds
are read by the config check, `ParallelState`, the model builder, the Trainer and the planner. Each rule is
written here once, as a function the others call; `resolve` applies all of them, so a layout the runtime
cannot run is refused at start in one line (ConfigError), and `gpt3d plan` proposes exactly the layouts
`resolve` accepts. Pure arithmetic: no torch, no process groups (parallel/state.py builds those).

Rules (Megatron's, where Megatron has one):
- world size = TP x PP x DP;
- TP divides the attention heads, the key/value heads, the FFN and hidden sizes; with sequence parallelism
  also the sequence length;
- PP divides the layers, or `--pipeline-model-parallel-split` gives PP positive layer counts summing to them;
- interleaving (`--num-layers-per-virtual-pipeline-stage N`): PP > 1, no explicit split, N x PP divides the
  layers (VP = layers / (N x PP) chunks per stage), and with VP > 1 the micro-batches are a multiple of PP;
- global batch = micro-batch x DP x micro-batches (default: one micro-batch per DP rank);
- the vocabulary is padded to a multiple of `--make-vocab-size-divisible-by` x TP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, TypeAlias

from ..errors import ConfigError

# The config (gpt3d.config.Config / ModelConfig) is read by attribute only: importing it here, even for types,
# would make a cycle with config/rules.py, which resolves the layout.
Config: TypeAlias = Any
ModelConfig: TypeAlias = Any


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ----- the rules, one function each ---------------------------------------------------------------------------
def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """DP = world / (TP x PP); the world size must be a multiple of TP x PP."""
    _need(tp >= 1 and pp >= 1, f"TP and PP sizes must be positive, got {tp} x {pp}")
    _need(world_size % (tp * pp) == 0, f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}")
    return world_size // (tp * pp)


def check_tensor_parallel(m: ModelConfig, tp: int, sequence_parallel: bool) -> None:
    """TP splits the heads, the key/value heads, the FFN and the hidden size (and with SP the sequence)."""
    _need(m.num_attention_heads % tp == 0, f"TP size {tp} must divide --num-attention-heads ({m.num_attention_heads})")
    _need(m.kv_heads % tp == 0, f"TP size {tp} must divide the key/value heads ({m.kv_heads})")
    _need(m.ffn_size % tp == 0, f"TP size {tp} must divide the FFN hidden size ({m.ffn_size})")
    _need(m.hidden_size % tp == 0, f"TP size {tp} must divide --hidden-size ({m.hidden_size})")
    if sequence_parallel and tp > 1:
        _need(m.seq_length % tp == 0, f"--sequence-parallel needs TP ({tp}) to divide --seq-length ({m.seq_length})")


def split_sizes(split: Optional[str], num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per pipeline stage: `--pipeline-model-parallel-split` (e.g. "3,5"), else num_layers / PP each."""
    if not split:
        _need(num_layers % pp == 0, f"PP size {pp} must divide --num-layers ({num_layers}) "
              "(or give --pipeline-model-parallel-split)")
        return (num_layers // pp,) * pp
    try:
        parts = tuple(int(x) for x in split.split(","))
    except ValueError:
        raise ConfigError(f"--pipeline-model-parallel-split '{split}' must be "
                          "comma-separated layer counts like 3,5") from None
    _need(len(parts) == pp and sum(parts) == num_layers and min(parts) > 0,
          f"--pipeline-model-parallel-split {split} must be {pp} positive numbers summing to {num_layers}")
    return parts


def layers_per_virtual_stage(num_layers: int, pp: int, vp: int) -> Optional[int]:
    """The `--num-layers-per-virtual-pipeline-stage` that gives VP chunks per stage (None: not interleaved)."""
    return num_layers // (pp * vp) if vp > 1 else None


def virtual_stages(num_layers: int, pp: int, layers_per_virtual_stage: Optional[int],
                   split: Optional[str] = None, check: bool = True) -> int:
    """VP: model chunks per pipeline stage (1 without `--num-layers-per-virtual-pipeline-stage`). `check=False`:
    the count asked for, rounded down, whether or not the rules allow it."""
    if not layers_per_virtual_stage:
        return 1
    n = layers_per_virtual_stage
    if not check:
        return num_layers // (n * pp)
    _need(not split, "--pipeline-model-parallel-split and --num-layers-per-virtual-pipeline-stage are exclusive")
    _need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    _need(num_layers % (n * pp) == 0,
          f"--num-layers ({num_layers}) must be divisible by layers-per-virtual-stage x PP ({n} x {pp})")
    return num_layers // (n * pp)


def global_batch_size(micro_batch: int, num_micro: int, dp: int) -> int:
    """Samples per optimizer step: each DP rank runs `num_micro` micro-batches of `micro_batch` samples
    (DeepSpeed's train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x DP)."""
    return micro_batch * num_micro * dp


def micro_batches(global_batch: Optional[int], micro_batch: int, dp: int, check: bool = True) -> tuple[int, int]:
    """(global batch, micro-batches per step and DP rank): global = micro x DP x micro-batches; unset, one
    micro-batch per DP rank. `check=False`: at least one, rounded down, for a batch the rule refuses."""
    gbs = global_batch or global_batch_size(micro_batch, 1, dp)
    if check:
        _need(gbs % (micro_batch * dp) == 0,
              f"--global-batch-size ({gbs}) must be divisible by micro batch x DP ({micro_batch} x {dp})")
    return gbs, max(1, gbs // (micro_batch * dp))


def check_interleaved(num_micro: int, pp: int, vp: int) -> None:
    """The interleaved schedule (VP > 1) walks the micro-batches in groups of PP: their number must be a
    multiple of PP."""
    _need(vp == 1 or num_micro % pp == 0,
          f"the interleaved pipeline schedule (--num-layers-per-virtual-pipeline-stage, {vp} chunks per stage) "
          f"needs the micro-batches per step ({num_micro} = global batch / (micro batch x DP)) to be a multiple "
          f"of --pipeline-model-parallel-size ({pp}): change --global-batch-size or --micro-batch-size")


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of make-vocab-size-divisible-by x TP."""
    step = multiple * tp
    return (vocab_size + step - 1) // step * step


def stage_layer_ids(num_layers: int, pp: int, vp: int = 1, sizes: Optional[tuple] = None) -> tuple:
    """Global layer ids of every chunk of every stage: `[pp_rank][chunk] -> tuple of ids`.

    Interleaved (Megatron): chunk v of stage p holds virtual stage v*PP + p, so a micro-batch visits every
    stage once per chunk round. Otherwise stage p holds `sizes[p]` consecutive layers (equal by default)."""
    if vp > 1:
        n = num_layers // (pp * vp)
        return tuple(tuple(tuple(range((v * pp + p) * n, (v * pp + p + 1) * n)) for v in range(vp))
                     for p in range(pp))
    sizes = sizes or (num_layers // pp,) * pp
    starts = [sum(sizes[:p]) for p in range(pp)]
    return tuple((tuple(range(starts[p], starts[p] + sizes[p])),) for p in range(pp))


def stage_layers(num_layers: int, pp: int, pp_rank: int, split: Optional[str] = None,
                 layers_per_virtual_stage: Optional[int] = None) -> list[list[int]]:
    """Global layer ids of each model chunk on stage `pp_rank` (what the model builder builds)."""
    vp = virtual_stages(num_layers, pp, layers_per_virtual_stage, split)
    sizes = None if vp > 1 else split_sizes(split, num_layers, pp)
    return [list(ids) for ids in stage_layer_ids(num_layers, pp, vp, sizes)[pp_rank]]


# ----- the layout ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    vp: int                    # model chunks per pipeline stage (> 1: interleaved 1F1B)
    sequence_parallel: bool    # in effect (asked for, and TP > 1)
    micro_batch_size: int
    num_micro: int             # micro-batches per step and DP rank
    global_batch: int
    stages: tuple              # [pp_rank][chunk] -> global layer ids
    padded_vocab: Optional[int] = None   # None when resolved without a vocabulary size

    def stage_layers(self, pp_rank: int) -> list[list[int]]:
        """Global layer ids of each model chunk on stage `pp_rank`."""
        return [list(ids) for ids in self.stages[pp_rank]]


def requested(cfg: Config, world_size: int) -> tuple[int, int, int, int, int, int]:
    """(TP, PP, DP, VP, micro-batch size, micro-batches) that `cfg` asks for at `world_size` ranks, checking only
    that the world size splits into TP x PP x DP: what the planner shows for a config's own layout even when
    `resolve` refuses it (`gpt3d plan` marks it as not valid)."""
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)
    vp = virtual_stages(cfg.model.num_layers, pp, p.num_layers_per_virtual_pipeline_stage, check=False)
    return tp, pp, dp, vp, t.micro_batch_size, micro_batches(t.global_batch_size, t.micro_batch_size, dp, False)[1]


def resolve(cfg: Config, world_size: int, vocab_size: Optional[int] = None) -> Layout:
    """The layout `cfg` runs at `world_size` ranks, or ConfigError (one line) naming the rule it breaks."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = data_parallel_size(world_size, tp, pp)
    check_tensor_parallel(m, tp, p.sequence_parallel)
    sizes = split_sizes(p.pipeline_model_parallel_split, m.num_layers, pp)
    vp = virtual_stages(m.num_layers, pp, p.num_layers_per_virtual_pipeline_stage, p.pipeline_model_parallel_split)
    _need(not p.no_pipeline_parallel or pp == 1,
          f"--no-pipeline-parallel needs --pipeline-model-parallel-size 1, got {pp}")
    gbs, num_micro = micro_batches(t.global_batch_size, t.micro_batch_size, dp)
    check_interleaved(num_micro, pp, vp)
    padded = None if vocab_size is None else padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    return Layout(world=world_size, tp=tp, pp=pp, dp=dp, vp=vp, sequence_parallel=p.sequence_parallel and tp > 1,
                  micro_batch_size=t.micro_batch_size, num_micro=num_micro, global_batch=gbs,
                  stages=stage_layer_ids(m.num_layers, pp, vp, sizes), padded_vocab=padded)
