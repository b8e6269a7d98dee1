#!/bin/bash
# GPT-3 LR (the NormFormer paper stops at 2.7B); GPT-3 6.7B shape: 1M tokens per update
# (global batch 512 x 2048), peak LR 1.2e-4 (NormFormer) / 1.2e-4 (baseline), linear warm-up 750, linear decay to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=6.7B
source examples/_common.sh
if [ "$VARIANT" = normformer ]; then LR=1.2e-4; NF="--scale-attn --scale-fc --scale-heads"; else LR=1.2e-4; NF=""; fi
$LAUNCHER pretrain_gpt.py --model-size 6.7B $NF --checkpoint-activations \
  --tensor-model-parallel-size 8 --zero-stage 3 \
  --micro-batch-size 2 --global-batch-size 512 --lr $LR \
  $COMMON_ARGS "$@"
