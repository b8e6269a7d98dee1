"""Shared flags and helpers of the training tests: a tiny NormFormer on mock or real data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
        "--seq-length 16 --max-position-embeddings 16 --vocab-size 128 "
        "--scale-attn --scale-fc --scale-heads --scale-resids "
        "--hidden-dropout 0 --attention-dropout 0 --lr 3e-3 --lr-warmup-iters 2 "
        "--num-workers 0 --log-interval 1 --eval-iters 0 --seed 7").split()


def flags(*extra: str, **kw) -> list:
    """TINY plus extras; ``kw`` as ``--flag-name value`` (True -> bare flag)."""
    out = list(TINY) + [str(e) for x in extra for e in str(x).split()]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def train_many(runs):
    """spawn() target: train each argv in turn; return per-run {iteration: loss} and grad norms."""
    from megatron_normformer.training.pretrain import train_from_argv

    out = []
    for argv in runs:
        s = train_from_argv(argv)
        out.append(dict(losses=s.losses, grad_norms=s.grad_norms, val=s.val, test=s.test,
                        fc2=s.fc2_grad_mean_abs, gas=s.gas, dp=s.dp, zero3=s.zero3,
                        ds_config=s.ds_config, skipped=s.skipped_iters))
    return out


def assert_close(a: dict, b: dict, rel: float, what: str = "loss"):
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]), f"{what} at {k}: {a[k]!r} vs {b[k]!r}"


def make_null_dataset(tmpdir: str, vocab: int = 128, docs: int = 300) -> str:
    """A real preprocessed dataset via tools/preprocess_data.py (NullTokenizer text of integers
    drawn from a fixed Markov-ish pattern so the model can learn something)."""
    rng = np.random.default_rng(0)
    jsonl = os.path.join(tmpdir, "corpus.jsonl")
    with open(jsonl, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(5, 60))
            start = int(rng.integers(0, vocab - 1))
            ids = [(start + 3 * i + int(rng.integers(0, 2))) % (vocab - 1) for i in range(n)]
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    prefix = os.path.join(tmpdir, "corpus")
    subprocess.run([PYTHON, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl,
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab), "--append-eod",
                    "--output-prefix", prefix, "--workers", "1"], check=True, capture_output=True)
    return prefix + "_text_document"


def step_in_full(model, cfg, pstate, tokens) -> dict:
    """One forward and backward of a GPT ``model`` on ``tokens`` (inputs and shifted labels): the
    mean loss, the full logits, and every weight and gradient gathered over TP with the vocabulary
    padding dropped (the padding differs with the TP degree), so any layout compares with one process."""
    import torch

    from megatron_normformer.checkpoint.shards import full_tensor

    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    with torch.no_grad():
        logits = model.gather_logits(model(tokens[:, :-1]))
    weights, grads = {}, {}
    for name, p in model.named_parameters():
        w = full_tensor(p, p.detach(), pstate.tp_group)
        g = full_tensor(p, p.grad, pstate.tp_group)
        if name.endswith("word_embeddings.weight") or name == "head.weight":
            w, g = w[: cfg.vocab_size], g[: cfg.vocab_size]
        weights[name], grads[name] = w, g
    return dict(loss=loss.item(), logits=logits, weights=weights, grads=grads)


def rel_error(a, b) -> float:
    """|a - b| / |b| (Frobenius norms)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
