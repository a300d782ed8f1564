#!/usr/bin/env bash
# One GPU: the 125M seed config without model parallelism (TP=1, PP=1, DP=1), at gpt3d's fast settings.
# The 256-sample global batch becomes 16 micro-batches of 16 (gradient accumulation), so the
# optimisation is the seed's (same global batch, sample order, dropout 0.1/0.1); only the speed differs:
# - no activation recompute (the config's `recompute_granularity: full` is the seed's, for its TP2 x PP2
#   layout): 125M at micro-batch 16 needs ~17 GiB without it. On a GPU with less, add
#   `--recompute-granularity selective` or `--micro-batch-size 8`; `gpt3d train` also prints, at start,
#   any setting the planner predicts faster that fits (`--auto-tune-layout` takes it);
# - compiled (the default on CUDA; `--no-compile` runs eager), dropout drawn inside the compiled graph.
# Measured numbers: benchmarks/RESULTS.md (benchmarks/compile_check.py).
#   DATA=data/corpus_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt bash examples/train_1gpu.sh
# Extra flags go last and override everything, e.g. `... train_1gpu.sh --train-iters 100`.
set -eo pipefail

CONFIG=${CONFIG:-configs/gpt-125M.yaml}
DATA=${DATA:-data/my-gpt2_text_document}      # prefix of the .bin/.idx written by `gpt3d preprocess`
VOCAB=${VOCAB:-data/gpt2-vocab.json}
MERGES=${MERGES:-data/gpt2-merges.txt}
CKPT=${CKPT:-checkpoints/$(basename "$CONFIG" .yaml)-1gpu}

LOAD=()
if [ -f "$CKPT/latest" ]; then LOAD=(--load "$CKPT"); fi   # resume where the last run stopped

python -m gpt3d train --config "$CONFIG" \
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 16 \
    --recompute-granularity none \
    --data-path "$DATA" --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --save "$CKPT" "${LOAD[@]}" "$@"
