#!/usr/bin/env bash
# The reference stage of the QRPO paper (configs/precompute_tulu3_8b_ultrafeedback.yaml: 50 completions per
# UltraFeedback prompt, about 3M) on NUM_MACHINES machines of GPUS_PER_MACHINE GPUs, one process per GPU. Run it on
# every machine, each with its MACHINE_RANK (0 on the machine at MAIN_PROCESS_IP, an address the others reach), and
# CACHE_DIR on storage every machine mounts at the same path:
#
#   NUM_MACHINES=8 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 CACHE_DIR=/shared/qrpo_trl configs/launch/multi_node_precompute.sh
#
# Under SLURM, one task per node:
#
#   export NUM_MACHINES=$SLURM_NNODES MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   srun --ntasks-per-node=1 bash -c 'MACHINE_RANK=$SLURM_NODEID configs/launch/multi_node_precompute.sh'
#
# Every process samples and scores its own chunks and writes them to CACHE_DIR; run it again after a crash (of any
# process, on any number of machines) and only the missing chunks are computed. Extra arguments override recipe fields.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NUM_MACHINES:?set NUM_MACHINES}" "${MACHINE_RANK:?set MACHINE_RANK}" "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP}"
: "${CACHE_DIR:?set CACHE_DIR, a directory every machine sees}"
GPUS_PER_MACHINE=${GPUS_PER_MACHINE:-8}

accelerate launch \
    --config_file configs/accelerate/ddp.yaml \
    --num_machines "$NUM_MACHINES" \
    --num_processes $((NUM_MACHINES * GPUS_PER_MACHINE)) \
    --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    -m qrpo_trl.cli precompute \
    --config configs/precompute_tulu3_8b_ultrafeedback.yaml \
    --reference_cache_dir "$CACHE_DIR" \
    "$@"
