#!/bin/bash
# NormFormer paper, masked LM (Section 3, Table 3): "the RoBERTa-base, Pre-LN architecture and
# hyperparameters used in Liu et al. (2019)", for both the Pre-LN baseline and NormFormer (the paper
# gives no separate NormFormer MLM learning rate, so both use RoBERTa-base's).
#   shape      12 layers x 768, 12 heads, FFN 3072, 512 learned positions  (RoBERTa-base; --model-size bert-base)
#   batch      2048 x 512 tokens = 1M tokens per update                   (NormFormer paper: "batches of 1 million tokens")
#   optimizer  Adam (0.9, 0.98), eps 1e-6, weight decay 0.01, no clipping  (RoBERTa paper, Table 9, base column)
#   schedule   peak LR 6e-4, 24k warm-up updates, linear decay to 0        (RoBERTa paper, Table 9, base column)
#   dropout    0.1 hidden, 0.1 attention                                   (RoBERTa paper, Table 9)
#   masking    15 %, 80/10/10, dynamic; FULL-SENTENCES packing             (RoBERTa paper, Sections 3.1, 4.1, 4.2)
#   tokenizer  RoBERTa's byte-level GPT-2 BPE                               (NormFormer paper, "Pretraining data")
#   length     TRAIN_ITERS=500000: a quarter of roberta-base's budget (500k updates x 8k x 512 tokens)
#              in 1M-token batches, the NormFormer paper's "about 1/4 of the training budget of the
#              original roberta-base" (its "2 million batches" does not square with that quarter).
# VARIANT=baseline drops the four NormFormer operations; everything else is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=bert_base
source examples/_common.sh
TRAIN_ITERS=${TRAIN_ITERS:-500000}
if [ "$VARIANT" = normformer ]; then NF="--scale-attn --scale-fc --scale-heads --scale-resids"; else NF=""; fi
$LAUNCHER pretrain_bert.py --model-size bert-base $NF \
  --seq-length 512 --max-position-embeddings 512 --position-embedding-type learned \
  --tensor-model-parallel-size 1 --zero-stage 1 \
  --micro-batch-size 16 --global-batch-size 2048 \
  --lr 6e-4 --min-lr 0 --lr-decay-style linear --lr-warmup-iters 24000 \
  --adam-beta1 0.9 --adam-beta2 0.98 --adam-eps 1e-6 --weight-decay 0.01 --clip-grad 0 \
  --hidden-dropout 0.1 --attention-dropout 0.1 \
  --train-iters $TRAIN_ITERS --bf16 \
  --data-path $DATA_PATH --split 969,30,1 \
  --tokenizer-type GPT2BPETokenizer --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE \
  --save $SAVE $LOAD_ARGS --save-interval 1000 \
  --log-interval 10 --eval-interval 1000 --eval-iters 50 \
  --tensorboard-dir $SAVE/tensorboard --metrics-file $SAVE/metrics.jsonl "$@"
