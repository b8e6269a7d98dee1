"""pretrain_bert.py's command line: the example resolves to the paper's RoBERTa-base recipe
(--dry-run), VARIANT=baseline drops NormFormer only, and pipeline parallelism is a one-line error."""
import json
import os
import subprocess

from train_utils import PYTHON, ROOT, TINY

RECIPE_TOK = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50265"]  # RoBERTa's BPE size


def _dry(variant, world=64):
    env = dict(os.environ, LAUNCHER=PYTHON, RANK="0", WORLD_SIZE=str(world), SAVE="/tmp/nf-dry-bert",
               VARIANT=variant)
    p = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_bert_base.sh"), "--dry-run",
                        *RECIPE_TOK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout[p.stdout.index("{"):])


def test_example_resolves_to_the_roberta_base_recipe():
    for variant, n_scales in (("normformer", 4), ("baseline", 0)):
        cfg = _dry(variant)
        m, o, t = cfg["model"], cfg["optim"], cfg["train"]
        assert cfg["task"] == "bert" and m["bidirectional"]
        assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["ffn_hidden_size"]) == (
            12, 768, 12, 3072)
        assert (m["position_embedding_type"], m["max_position_embeddings"]) == ("learned", 512)
        assert sum(m[k] for k in ("scale_attn", "scale_fc", "scale_heads", "scale_resids")) == n_scales
        assert (o["lr"], o["lr_warmup_iters"], o["lr_decay_style"], o["min_lr"]) == (
            6e-4, 24000, "linear", 0.0)
        assert (o["adam_beta1"], o["adam_beta2"], o["adam_eps"], o["weight_decay"], o["clip_grad"]) == (
            0.9, 0.98, 1e-6, 0.01, 0.0)
        assert (m["hidden_dropout"], m["attention_dropout"]) == (0.1, 0.1)
        ds = cfg["deepspeed_config"]
        assert ds["train_batch_size"] * t["seq_length"] == 2048 * 512 == 1_048_576  # ~1M tokens
        assert cfg["train_iters"] == 500_000
        assert cfg["gradient_accumulation_steps"] == 2048 // (16 * 64)
