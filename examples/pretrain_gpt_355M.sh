#!/bin/bash
# NormFormer paper recipe, GPT-3 355M shape: 0.5M tokens per update
# (global batch 256 x 2048), peak LR 1e-3 (NormFormer) / 1e-3 (baseline), linear warm-up 750, linear decay to 0.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=355M
source examples/_common.sh
if [ "$VARIANT" = normformer ]; then LR=1e-3; NF="--scale-attn --scale-fc --scale-heads --scale-resids"; else LR=1e-3; NF=""; fi
$LAUNCHER pretrain_gpt.py --model-size 355M $NF  \
  --tensor-model-parallel-size 1 --zero-stage 1 \
  --micro-batch-size 8 --global-batch-size 256 --lr $LR \
  $COMMON_ARGS "$@"
