#!/usr/bin/env bash
# Shared second half of the ds_pretrain_gpt_*.sh scripts in this directory: it turns the variables of
# Megatron-DeepSpeed's examples_deepspeed/rebase scripts into the same pretrain_gpt.py command line and
# starts it with torchrun and gpt3d instead of the deepspeed launcher and pretrain_gpt.py. Every variable
# below can be set in the environment; the per-model scripts set the ones that differ between models.
# Arguments given to the script are appended to the command line (they win over the ones before).
set -eo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

### Training duration: 300B tokens; train_samples sizes the sample index (and stops later than the tokens)
seq_len=${seq_len:-2048}
train_tokens_in_billion=${train_tokens_in_billion:-300}
train_tokens=${train_tokens:-$((train_tokens_in_billion * 1000000000))}
train_samples=${train_samples:-$((300 * 1000000000 * 2 / seq_len))}
exit_duration=${exit_duration:-30000000}
### LR: 3B warm-up tokens, cosine decay over the whole run
lr_warmup_tokens_in_million=${lr_warmup_tokens_in_million:-3000}
lr_warmup_tokens=${lr_warmup_tokens:-$((lr_warmup_tokens_in_million * 1000000))}
lr_decay_tokens_in_billion=${lr_decay_tokens_in_billion:-${train_tokens_in_billion}}
lr_decay_tokens=${lr_decay_tokens:-$((lr_decay_tokens_in_billion * 1000000000))}
lr_decay_style=${lr_decay_style:-cosine}
### Parallelism: world size = mp_size x pp_size x data-parallel size
no_pp=${no_pp:-false}
zero_stage=${zero_stage:-1}
num_gpus_pernode=${NPROC_PER_NODE:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)}
[ "${num_gpus_pernode}" -gt 0 ] || num_gpus_pernode=1
num_node=${NNODES:-1}
num_gpus=$((num_gpus_pernode * num_node))
batch_size=${batch_size:-2}
### Misc
log_interval=${log_interval:-10}
eval_iters=${eval_iters:-10}
eval_interval=${eval_interval:-100}
save_interval=${save_interval:-100}
activation_checkpoint=${activation_checkpoint:-true}
log_optimizer_state=${log_optimizer_state:-true}
seed=${seed:-1234}
num_workers=${num_workers:-0}
vocab_path=${vocab_path:-gpt2-vocab.json}
merge_path=${merge_path:-gpt2-merges.txt}
current_time=$(date "+%Y.%m.%d_%H.%M.%S")
host="${HOSTNAME:-$(hostname)}"

prescale_grad="true"
jobname="gpt_${model_size}B_tok${train_tokens_in_billion}B"
jobname="${jobname}_lr${lr}_min${min_lr}_w${lr_warmup_tokens_in_million}M_d${lr_decay_tokens_in_billion}B_${lr_decay_style}"
jobname="${jobname}_gbs${global_batch_size}_mbs${batch_size}_g${num_gpus}"
if [[ $zero_stage -gt 0 ]]; then
    jobname="${jobname}_z${zero_stage}"
    prescale_grad="false"
fi
[[ $mp_size -gt 1 ]] && jobname="${jobname}_mp${mp_size}"
[ "${no_pp}" = "false" ] && jobname="${jobname}_pp${pp_size}"
jobname="${jobname}_seed${seed}_rebase${jobname_suffix}"

output_home=${output_home:-output}
log_path="${output_home}/log/"
checkpoint_path=${checkpoint_path:-"${output_home}/checkpoint/${jobname}"}
tensorboard_dir=${tensorboard_dir:-"${output_home}/tensorboard/"}
tensorboard_path="${tensorboard_dir}${jobname}_${host}_${current_time}"
mkdir -p "${log_path}" "${checkpoint_path}" "${tensorboard_path}"

data_options=" \
    --vocab-file ${vocab_path} \
    --merge-file ${merge_path} \
    --data-path ${data_path} \
    --data-impl mmap"

megatron_options=" \
    --override-opt_param-scheduler \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --tensor-model-parallel-size ${mp_size} \
    --init-method-std ${init_std} \
    --lr-decay-tokens ${lr_decay_tokens} \
    --lr-warmup-tokens ${lr_warmup_tokens} \
    --micro-batch-size ${batch_size} \
    --exit-duration-in-mins ${exit_duration} \
    --global-batch-size ${global_batch_size} \
    --num-layers ${num_layers} \
    --hidden-size ${hidden_size} \
    --num-attention-heads ${num_attn_heads} \
    --seq-length ${seq_len} \
    --max-position-embeddings ${seq_len} \
    --train-tokens ${train_tokens} \
    --train-samples ${train_samples} \
    --lr ${lr} \
    --min-lr ${min_lr} \
    --lr-decay-style ${lr_decay_style} \
    --split 949,50,1 \
    --log-interval ${log_interval} \
    --eval-interval ${eval_interval} \
    --eval-iters ${eval_iters} \
    --save-interval ${save_interval} \
    --weight-decay 0.1 \
    --clip-grad 1.0 \
    --hysteresis 2 \
    --num-workers ${num_workers} \
    --fp16 \
    --seed ${seed} \
    --load ${checkpoint_path} \
    --save ${checkpoint_path} \
    --no-async-tensor-model-parallel-allreduce \
    ${model_options} \
    --tensorboard-queue-size 1 \
    --log-timers-to-tensorboard \
    --log-batch-size-to-tensorboard \
    --log-validation-ppl-to-tensorboard \
    --tensorboard-dir ${tensorboard_path}"
[ "${activation_checkpoint}" = "true" ] && megatron_options="${megatron_options} --checkpoint-activations"
[ "${log_optimizer_state}" = "true" ] && megatron_options="${megatron_options} --log-optimizer-states-to-tensorboard"

config_json="${output_home}/ds_config_gbs${global_batch_size}_mbs${batch_size}_log${log_interval}_zero${zero_stage}.json"
template_json=${template_json:-"${here}/ds_config_gpt_TEMPLATE.json"}
sed -e "s/GBSIZE/${global_batch_size}/" -e "s/MBSIZE/${batch_size}/" -e "s/LOG_INTERVAL/${log_interval}/" \
    -e "s/ZERO_STAGE/${zero_stage}/" -e "s/PRESCALE_GRAD/${prescale_grad}/" "${template_json}" > "${config_json}"

deepspeed_options=" \
    --deepspeed \
    --deepspeed_config ${config_json} \
    --zero-stage ${zero_stage} \
    --pipeline-model-parallel-size ${pp_size}"
[ "${no_pp}" = "true" ] && deepspeed_options="${deepspeed_options} --no-pipeline-parallel"
[ "${activation_checkpoint}" = "true" ] && deepspeed_options="${deepspeed_options} --deepspeed-activation-checkpointing"

# torchrun replaces the deepspeed launcher: one node rendezvous locally; several nodes meet at
# MASTER_ADDR:MASTER_PORT (run this script on every node with its NODE_RANK).
if [ "${num_node}" -eq 1 ]; then
    rdzv=(--standalone)
else
    rdzv=(--nnodes="${num_node}" --node_rank="${NODE_RANK:?set NODE_RANK on every node}"
          --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# shellcheck disable=SC2086  # the option strings are word-split on purpose, as in the seed scripts
torchrun "${rdzv[@]}" --nproc_per_node="${num_gpus_pernode}" -m gpt3d train \
    ${megatron_options} ${data_options} ${deepspeed_options} "$@" 2>&1 \
    | tee -a "${log_path}/${jobname}_${host}_${current_time}.log"
