"""The issue's "done when": a launch script written for Megatron-DeepSpeed's pretrain_gpt.py (its
usual GPT-2 flags: GPT-2 BPE files without --tokenizer-type, --data-impl mmap, --split 949,50,1,
--distributed-backend nccl, cosine decay with a warm-up fraction, a DeepSpeed config file,
--checkpoint-activations, the fusion switches, --save and --load on one directory, ...) with the
NormFormer switches added runs unchanged under the deepspeed launcher, on CPU with bf16 (fp16 needs
fp16 kernels, which not every CPU has). Its second launch resumes from its own checkpoint; the end-of-document flags,
the batch-size ramp and the samples-based schedule ride along."""
import json
import os
import subprocess

from megatron_normformer.data.tokenizers import bytes_to_unicode
from megatron_normformer.testing import free_port
from train_utils import PYTHON, ROOT

SCRIPT = r"""#!/bin/bash
set -e
DATA_PATH=$WORK/corpus_text_document
VOCAB_PATH=$WORK/gpt2-vocab.json
MERGE_PATH=$WORK/gpt2-merges.txt
CHECKPOINT_PATH=$WORK/checkpoints/gpt2_tiny_ds
config_json=$WORK/ds_config.json

gpt_options=" \
        --tensor-model-parallel-size 1 \
        --pipeline-model-parallel-size 1 \
        --num-layers 2 \
        --hidden-size 64 \
        --num-attention-heads 4 \
        --seq-length 32 \
        --max-position-embeddings 32 \
        --micro-batch-size 2 \
        --global-batch-size 8 \
        --rampup-batch-size 2 2 8 \
        --train-samples 40 \
        --lr-decay-samples 32 \
        --lr-warmup-samples 4 \
        --lr 6.0e-4 \
        --min-lr 6.0e-5 \
        --lr-decay-style cosine \
        --save $CHECKPOINT_PATH \
        --load $CHECKPOINT_PATH \
        --data-path $DATA_PATH \
        --vocab-file $VOCAB_PATH \
        --merge-file $MERGE_PATH \
        --data-impl mmap \
        --split 949,50,1 \
        --distributed-backend nccl \
        --weight-decay 1e-2 \
        --clip-grad 1.0 \
        --adam-beta1 0.9 \
        --adam-beta2 0.95 \
        --init-method-std 0.006 \
        --hidden-dropout 0.1 \
        --attention-dropout 0.1 \
        --checkpoint-activations \
        --checkpoint-num-layers 1 \
        --log-interval 1 \
        --save-interval 3 \
        --eval-interval 3 \
        --eval-iters 1 \
        --exit-interval 4 \
        --num-workers 0 \
        --seed 1234 \
        --bf16 \
        --eod-mask-loss \
        --reset-position-ids \
        --reset-attention-mask \
        --log-params-norm \
        --log-timers-to-tensorboard \
        --log-batch-size-to-tensorboard \
        --log-validation-ppl-to-tensorboard \
        --no-masked-softmax-fusion \
        --no-bias-gelu-fusion \
        --no-bias-dropout-fusion \
        --override-opt_param-scheduler \
        --distributed-timeout-minutes 10 \
        --metrics-file $WORK/metrics.jsonl \
        --scale-attn --scale-fc --scale-heads \
"

deepspeed_options=" \
        --deepspeed \
        --deepspeed_config ${config_json} \
        --zero-stage 1 \
        --deepspeed-activation-checkpointing \
"

run_cmd="deepspeed --num_gpus 1 --master_port $PORT pretrain_gpt.py ${gpt_options} ${deepspeed_options}"
echo ${run_cmd}
eval ${run_cmd}
"""

DS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "steps_per_print": 10,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 1},
    "bf16": {"enabled": True},
    "wall_clock_breakdown": False,
}


def _gpt2_files(work):
    """A byte-level GPT-2 vocabulary (every byte, a few merges, <|endoftext|>)."""
    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e"), ("\u0120", "the"), ("a", "n"), ("i", "n")]
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(work, "gpt2-vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(work, "gpt2-merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def test_megatron_deepspeed_launch_script_runs_unchanged(tmp_path):
    work = str(tmp_path)
    _gpt2_files(work)
    words = "the cat sat on the mat and then the dog ran in the sun".split()
    with open(os.path.join(work, "corpus.jsonl"), "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(3 + i % 9))})
                    + "\n")
    subprocess.run([PYTHON, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    os.path.join(work, "corpus.jsonl"), "--output-prefix",
                    os.path.join(work, "corpus"), "--tokenizer-type", "GPT2BPETokenizer",
                    "--vocab-file", os.path.join(work, "gpt2-vocab.json"), "--merge-file",
                    os.path.join(work, "gpt2-merges.txt"), "--append-eod", "--workers", "1"],
                   check=True, capture_output=True)
    with open(os.path.join(work, "ds_config.json"), "w") as f:
        json.dump(DS_CONFIG, f)
    script = os.path.join(work, "ds_pretrain_gpt2.sh")
    with open(script, "w") as f:
        f.write(SCRIPT)
    env = dict(os.environ, WORK=work, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    outs = []
    for _ in range(2):  # first launch: iterations 1-4 (--exit-interval 4); second: the rest
        done = subprocess.run(["bash", script], cwd=ROOT, env=dict(env, PORT=str(free_port())),
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        outs.append(done.stdout)
    assert "no checkpoint yet; starting from scratch" in outs[0]
    assert "resumed from" in outs[1] and "at iteration 4" in outs[1]
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "lm_loss" in line]
    # Megatron's ramp (2 -> 8 in steps of 2, one per 8/3 samples) then 8 per iteration.
    assert [r["iteration"] for r in rows] == list(range(1, 8))
    assert [r["global_batch_size"] for r in rows] == [2, 2, 4, 8, 8, 8, 8]
    assert rows[-1]["consumed_samples"] == 40
    assert all(r["params_norm"] > 0 and r["lm_loss"] < 7 for r in rows)
