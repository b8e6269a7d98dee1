#!/bin/bash
# GPT-3 LR (the NormFormer paper stops at 2.7B); GPT-3 13B shape: 1M tokens per update
# (global batch 1024 x 2048), peak LR 1e-4 (NormFormer) / 1e-4 (baseline), linear warm-up 750, linear decay to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=13B
source examples/_common.sh
if [ "$VARIANT" = normformer ]; then LR=1e-4; NF="--scale-attn --scale-fc --scale-heads"; else LR=1e-4; NF=""; fi
$LAUNCHER pretrain_gpt.py --model-size 13B $NF --checkpoint-activations \
  --tensor-model-parallel-size 8 --zero-stage 3 \
  --micro-batch-size 1 --global-batch-size 1024 --lr $LR \
  $COMMON_ARGS "$@"
