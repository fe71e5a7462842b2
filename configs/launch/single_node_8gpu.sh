#!/usr/bin/env bash
# QRPO on one machine with 8 GPUs, DeepSpeed ZeRO-3: the recipe configs/qrpo_tulu3_8b_ultrafeedback.yaml launched with
# `accelerate launch`. `qrpo-trl qrpo --config configs/qrpo_tulu3_8b_ultrafeedback.yaml` does the same (the recipe
# names its accelerate config and process count); this form is for launchers and options of your own.
# Extra arguments override recipe fields, e.g. `configs/launch/single_node_8gpu.sh --output_dir runs/qrpo --beta 0.001`.
set -euo pipefail
cd "$(dirname "$0")/.."

accelerate launch \
    --config_file configs/accelerate/zero3.yaml \
    --num_processes 8 \
    -m qrpo_trl.cli qrpo \
    --config configs/qrpo_tulu3_8b_ultrafeedback.yaml \
    "$@"
