#!/usr/bin/env bash
# One node, 8 GPUs, 3D layout: TP=2 (inside NVLink) x PP=2 x DP=2 with ZeRO-1 and sequence parallelism,
# the seed's 1.3B case. World size = TP x PP x DP, so NPROC_PER_NODE must be a multiple of TP x PP = 4.
#   DATA=data/corpus_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt bash examples/train_1node.sh
set -eo pipefail

CONFIG=${CONFIG:-configs/gpt-1.3B.yaml}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
DATA=${DATA:-data/my-gpt2_text_document}
VOCAB=${VOCAB:-data/gpt2-vocab.json}
MERGES=${MERGES:-data/gpt2-merges.txt}
CKPT=${CKPT:-checkpoints/$(basename "$CONFIG" .yaml)}

LOAD=()
if [ -f "$CKPT/latest" ]; then LOAD=(--load "$CKPT"); fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# --standalone: a local rendezvous on a free port, nothing to configure.
torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m gpt3d train --config "$CONFIG" \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
    --data-path "$DATA" --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --save "$CKPT" "${LOAD[@]}" "$@"
