"""The command line: example scripts resolve to the paper's recipe (--dry-run), DeepSpeed config
files are reconciled with the flags, and user errors end in one message, not a traceback."""
import json
import os
import subprocess

import pytest

from train_utils import PYTHON, ROOT, TINY

EXAMPLES = os.path.join(ROOT, "examples")
NULL_TOK = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50257"]


def _dry(script, *extra, world=64):
    env = dict(os.environ, LAUNCHER=PYTHON, RANK="0", WORLD_SIZE=str(world), SAVE="/tmp/nf-dry")
    p = subprocess.run(["bash", os.path.join(EXAMPLES, script), "--dry-run", *NULL_TOK, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    return p


RECIPES = {  # script: (layers, hidden, lr, global batch, NormFormer flags, activation)
    "pretrain_gpt_125M.sh": (12, 768, 3e-3, 256, 4, "gelu"),
    "pretrain_gpt_125M_slurm.sbatch": (12, 768, 3e-3, 256, 4, "gelu"),
    "pretrain_gpt_355M.sh": (24, 1024, 1e-3, 256, 4, "gelu"),
    "pretrain_gpt_1.3B.sh": (24, 2048, 6e-4, 512, 3, "gelu"),
    "pretrain_gpt_2.7B_relu_squared.sh": (32, 2560, 6e-4, 512, 3, "relu_squared"),
    "pretrain_gpt_6.7B.sh": (32, 4096, 1.2e-4, 512, 3, "gelu"),
    "pretrain_gpt_13B.sh": (40, 5120, 1e-4, 1024, 3, "gelu"),
}


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_example_scripts_resolve_to_the_recipe(script):
    layers, hidden, lr, batch, n_scales, act = RECIPES[script]
    p = _dry(script, world=32)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads(p.stdout[p.stdout.index("{"):])
    m, o = cfg["model"], cfg["optim"]
    assert (m["num_layers"], m["hidden_size"], m["activation_fn"]) == (layers, hidden, act)
    assert sum(m[k] for k in ("scale_attn", "scale_fc", "scale_heads", "scale_resids")) == n_scales
    assert (o["lr"], o["adam_beta2"], o["weight_decay"], o["clip_grad"]) == (lr, 0.98, 0.01, 0.0)
    assert cfg["deepspeed_config"]["train_batch_size"] == batch
    assert batch * 2048 == {256: 524288, 512: 1048576, 1024: 2097152}[batch]
    assert cfg["train_iters"] == -(-(300_000_000_000 // 2048 + 1) // batch)


def test_baseline_variant_drops_normformer_and_uses_its_lr(monkeypatch):
    monkeypatch.setenv("VARIANT", "baseline")
    p = _dry("pretrain_gpt_125M.sh", world=32)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads(p.stdout[p.stdout.index("{"):])
    assert cfg["optim"]["lr"] == 1e-3 and not cfg["model"]["scale_fc"]


def test_deepspeed_config_file_is_reconciled_with_flags():
    ok = _dry("pretrain_gpt_1.3B.sh", "--deepspeed_config", "examples/ds_config_zero1.json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    ds = json.loads(ok.stdout[ok.stdout.index("{"):])["deepspeed_config"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8 and ds["train_batch_size"] == 512
    bad = _dry("pretrain_gpt_125M.sh", "--deepspeed_config", "examples/ds_config_zero2.json",
               world=32)
    assert bad.returncode == 2
    assert "--micro-batch-size 8 contradicts train_micro_batch_size_per_gpu = 4" in bad.stderr


def _cli(*extra):
    return subprocess.run([PYTHON, "pretrain_gpt.py", *TINY, "--mock-data", *extra], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("extra, message, code", [
    (["--train-iters", "2", "--pipeline-model-parallel-size", "2", "--zero-stage", "2"],
     "DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only", 2),
    (["--train-iters", "2", "--pipeline-model-parallel-size", "2", "--no-pipeline-parallel"],
     "--no-pipeline-parallel contradicts --pipeline-model-parallel-size 2", 2),
    ([], "give exactly one of --train-iters, --train-samples, --train-tokens", 2),
    (["--train-iters", "2", "--global-batch-size", "3", "--micro-batch-size", "2"],
     "--global-batch-size (3) must be a multiple of --micro-batch-size (2)", 2),
    (["--train-iters", "2", "--load", "/nonexistent/ckpt"], "--load /nonexistent/ckpt: no such directory", 2),
    (["--train-iters", "2", "--tensor-model-parallel-size", "3"], "--num-attention-heads (4) must be divisible", 2),
    (["--train-iters", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "15"],
     "--seq-length (15) must be divisible by --tensor-model-parallel-size (2)", 2),
])
def test_user_errors_are_one_clear_message(extra, message, code):
    p = _cli(*extra)
    assert p.returncode == code, p.stderr[-2000:]
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_token_ids_outside_the_vocabulary_stop_with_a_message(tmp_path):
    """Data tokenized with a larger vocabulary than the run's: one message naming --data-path and
    the id, not an IndexError from the embedding (a device-side assert on GPU)."""
    from train_utils import make_null_dataset

    prefix = make_null_dataset(str(tmp_path), vocab=500)
    argv = [PYTHON, "pretrain_gpt.py", *TINY, "--train-iters", "2", "--data-path", prefix,
            "--split", "1,0,0", "--tokenizer-type", "NullTokenizer"]  # TINY: --vocab-size 128
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 1, p.stderr[-2000:]
    assert "outside the model's vocabulary of 128 tokens" in p.stderr and prefix in p.stderr
    assert "Traceback" not in p.stderr
