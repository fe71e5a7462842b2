#!/usr/bin/env bash
# QRPO over several machines with DeepSpeed ZeRO-3: the recipe configs/qrpo_tulu3_8b_ultrafeedback.yaml on
# NUM_MACHINES machines of GPUS_PER_MACHINE GPUs, with the global batch kept at the recipe's 256 completions (the
# paper's 128 pairs). Run it on every machine, each with its MACHINE_RANK (0 on the machine at MAIN_PROCESS_IP, an
# address the others reach):
#
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 configs/launch/multi_node_zero3.sh   # on 10.0.0.1
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 configs/launch/multi_node_zero3.sh   # on the other machine
#
# Under SLURM, one task per node:
#
#   export NUM_MACHINES=$SLURM_NNODES MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun --ntasks-per-node=1 bash -c 'MACHINE_RANK=$SLURM_NODEID configs/launch/multi_node_zero3.sh'
#
# Every machine needs the dataset and the Hugging Face cache at the same paths (or a shared file system); the map
# stage tokenises once per machine and scores the reference log-probs once over all processes. Extra arguments
# override recipe fields.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NUM_MACHINES:?set NUM_MACHINES}" "${MACHINE_RANK:?set MACHINE_RANK}" "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP}"
GPUS_PER_MACHINE=${GPUS_PER_MACHINE:-8}
NUM_PROCESSES=$((NUM_MACHINES * GPUS_PER_MACHINE))
PER_DEVICE_BATCH=4  # the recipe's per_device_train_batch_size
if ((256 % (PER_DEVICE_BATCH * NUM_PROCESSES))); then
    echo "a global batch of 256 does not split over $NUM_PROCESSES processes of $PER_DEVICE_BATCH samples" >&2
    exit 1
fi

accelerate launch \
    --config_file configs/accelerate/zero3.yaml \
    --num_machines "$NUM_MACHINES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    -m qrpo_trl.cli qrpo \
    --config configs/qrpo_tulu3_8b_ultrafeedback.yaml \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps $((256 / (PER_DEVICE_BATCH * NUM_PROCESSES))) \
    "$@"
