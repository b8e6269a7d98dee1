#!/bin/bash
# NormFormer paper recipe, GPT-3 2.7B shape: 1M tokens per update
# (global batch 512 x 2048), peak LR 6e-4 (NormFormer) / 6e-4 (baseline), linear warm-up 750, linear decay to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=2.7B_relu_squared
source examples/_common.sh
if [ "$VARIANT" = normformer ]; then LR=6e-4; NF="--scale-attn --scale-fc --scale-heads"; else LR=6e-4; NF=""; fi
$LAUNCHER pretrain_gpt.py --model-size 2.7B $NF --activation-fn relu_squared \
  --tensor-model-parallel-size 4 --zero-stage 2 \
  --micro-batch-size 4 --global-batch-size 512 --lr $LR \
  $COMMON_ARGS "$@"
