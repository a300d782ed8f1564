#!/usr/bin/env bash
# GPT-3 Small (125M): 12 layers, hidden 768, 12 heads, TP=2 x PP=2, 300B tokens.
# The variables and flags of Megatron-DeepSpeed's examples_deepspeed/rebase/ds_pretrain_gpt_125M.sh, launched with torchrun
# and gpt3d (no DeepSpeed needed). Set any variable in the environment to change it, e.g.
#   data_path=/data/pile_text_document NPROC_PER_NODE=8 bash examples/megatron-deepspeed/ds_pretrain_gpt_125M.sh
# Multi-node: NNODES=4 NODE_RANK=<this node> MASTER_ADDR=<node 0> bash examples/megatron-deepspeed/ds_pretrain_gpt_125M.sh
model_size=${model_size:-0.125}
num_layers=${num_layers:-12}
hidden_size=${hidden_size:-768}
num_attn_heads=${num_attn_heads:-12}
global_batch_size=${global_batch_size:-256}
lr=${lr:-6.0e-4}
min_lr=${min_lr:-1.0e-6}
init_std=${init_std:-0.02}
mp_size=${mp_size:-2}
pp_size=${pp_size:-2}
data_path=${data_path:-BookCorpusDataset_text_document}
model_options=${model_options-""}
jobname_suffix=${jobname_suffix-""}
source "$(dirname "${BASH_SOURCE[0]}")/pretrain_gpt_torchrun.sh" "$@"
