#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=<0..3> DATA=... VOCAB=... MERGES=... bash examples/train_multinode.sh
# MASTER_ADDR hosts the rendezvous (any node reachable by all); ranks are handed out by the rendezvous,
# NODE_RANK only names this node's log. The default 13B config needs TP=4 x PP=8 = 32 GPUs (4 nodes of 8);
# more nodes add data parallelism. The checkpoint directory must be on a filesystem shared by all nodes.
set -eo pipefail

CONFIG=${CONFIG:-configs/gpt-13B.yaml}
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:?set NNODES to the number of nodes}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
JOB_ID=${JOB_ID:-gpt3d-$(basename "$CONFIG" .yaml)}     # same on every node of one job
DATA=${DATA:-data/my-gpt2_text_document}
VOCAB=${VOCAB:-data/gpt2-vocab.json}
MERGES=${MERGES:-data/gpt2-merges.txt}
CKPT=${CKPT:-checkpoints/$(basename "$CONFIG" .yaml)}
LOGDIR=${LOGDIR:-runs/$(basename "$CONFIG" .yaml)}

LOAD=()
if [ -f "$CKPT/latest" ]; then LOAD=(--load "$CKPT"); fi

mkdir -p "$LOGDIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB_ID" \
    -m gpt3d train --config "$CONFIG" \
    --data-path "$DATA" --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --save "$CKPT" --run-dir "$LOGDIR" "${LOAD[@]}" "$@" 2>&1 | tee "$LOGDIR/node$NODE_RANK.log"
