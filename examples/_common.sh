# Shared by the launch scripts. Override any of these from the environment.
#   LAUNCHER   how to start the processes (default: deepspeed on all local GPUs, or a hostfile)
#   DATA_PATH  preprocessed dataset prefix(es), e.g. "data/pile_text_document"
#   VOCAB_FILE MERGE_FILE  GPT-2 BPE files (the paper's vocabulary: 51,200 after padding)
#   SAVE       checkpoint directory (resumed from automatically when it has a 'latest')
#   TRAIN_TOKENS  run length in tokens (default 300B; set your budget)
#   VARIANT    normformer (default) or baseline
LAUNCHER=${LAUNCHER:-"deepspeed ${HOSTFILE:+--hostfile $HOSTFILE}"}
DATA_PATH=${DATA_PATH:-data/corpus_text_document}
VOCAB_FILE=${VOCAB_FILE:-data/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-data/gpt2-merges.txt}
SAVE=${SAVE:-checkpoints/$NAME}
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
VARIANT=${VARIANT:-normformer}
# Resume when a complete checkpoint exists (a --load without one is an error).
LOAD_ARGS=""
if [ -f "$SAVE/latest" ]; then LOAD_ARGS="--load $SAVE"; fi

COMMON_ARGS="--seq-length 2048 --max-position-embeddings 2048
 --position-embedding-type sinusoidal
 --adam-beta1 0.9 --adam-beta2 0.98 --adam-eps 1e-8 --weight-decay 0.01 --clip-grad 0
 --lr-decay-style linear --min-lr 0 --lr-warmup-iters 750
 --hidden-dropout 0.1 --attention-dropout 0.1
 --train-tokens $TRAIN_TOKENS --bf16
 --data-path $DATA_PATH --split 969,30,1
 --tokenizer-type GPT2BPETokenizer --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE
 --save $SAVE $LOAD_ARGS --save-interval 1000
 --log-interval 10 --eval-interval 1000 --eval-iters 50
 --tensorboard-dir $SAVE/tensorboard --metrics-file $SAVE/metrics.jsonl"
