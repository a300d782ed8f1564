#!/usr/bin/env bash
# GPT-3 XL (1.3B) with rotary embeddings on 25% of each head's dims, TP=4 x PP=8.
# The variables and flags of Megatron-DeepSpeed's examples_deepspeed/rebase/ds_pretrain_gpt_1.3B_rope.sh, launched with torchrun
# and gpt3d (no DeepSpeed needed). Set any variable in the environment to change it, e.g.
#   data_path=/data/pile_text_document NPROC_PER_NODE=8 bash examples/megatron-deepspeed/ds_pretrain_gpt_1.3B_rope.sh
# Multi-node: NNODES=4 NODE_RANK=<this node> MASTER_ADDR=<node 0> bash examples/megatron-deepspeed/ds_pretrain_gpt_1.3B_rope.sh
model_size=${model_size:-1.3}
num_layers=${num_layers:-24}
hidden_size=${hidden_size:-2048}
num_attn_heads=${num_attn_heads:-16}
global_batch_size=${global_batch_size:-512}
lr=${lr:-2.0e-4}
min_lr=${min_lr:-1.0e-6}
init_std=${init_std:-0.013}
mp_size=${mp_size:-4}
pp_size=${pp_size:-8}
data_path=${data_path:-pile_text_document}
model_options=${model_options-"--use-rotary-position-embeddings --rotary-percent 0.25"}
jobname_suffix=${jobname_suffix-"_rope0.25"}
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_torchrun.sh" "$@"
