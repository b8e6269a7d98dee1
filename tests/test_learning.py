"""The default model learns: on real text, a few hundred steps of ``pretrain_gpt.py`` at its
defaults bring the held-out loss clearly below the unigram entropy of the training tokens, for
Pre-LN and NormFormer alike.

Learning token frequencies alone reaches exactly that entropy, which is where a mis-initialised
model sits (Megatron's N(0, 0.02) token embeddings under sinusoidal positions of RMS 0.71 were the
project's default until issue 12): the same run with ``--init-scheme megatron`` is the negative
control, so the margin is shown to separate a learning model from a plateaued one.
"""
import json
import os
import subprocess

import numpy as np
import pytest

from megatron_normformer.data.indexed_dataset import IndexedDataset
from megatron_normformer.testing import free_port
from test_generate_loading import make_corpus_and_tokenizer, run_tool
from train_utils import PYTHON, ROOT

SPLIT = (9, 1)  # train, valid documents
MARGIN = 0.5  # nats below the unigram entropy that a learning model must reach


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats) of the token distribution of the training documents."""
    ds = IndexedDataset(prefix)
    last_train_doc = int(round(ds.num_documents * SPLIT[0] / sum(SPLIT)))
    end = int(ds.document_indices[last_train_doc])
    tokens = np.concatenate([np.asarray(ds[i]) for i in range(end)])
    p = np.bincount(tokens) / tokens.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learning")
    jsonl, sp_model = make_corpus_and_tokenizer(tmp, docs=100, vocab=512)
    done = run_tool("preprocess_data.py", "--input", jsonl, "--output-prefix", tmp / "c",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--append-eod", "--workers", "1")
    assert done.returncode == 0, done.stderr
    return tmp, str(tmp / "c_text_document"), str(sp_model)


def final_valid_losses(tmp, prefix, sp_model, runs: dict) -> dict:
    """Train every named variant at once (one process each); their last validation losses."""
    common = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "16",
              "--train-iters", "300", "--lr-warmup-iters", "30", "--hidden-dropout", "0",
              "--attention-dropout", "0", "--data-path", prefix, "--split", ",".join(map(str, SPLIT)),
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
              "--num-workers", "0", "--log-interval", "100", "--eval-interval", "300",
              "--eval-iters", "10", "--seed", "3", "--data-cache-path", str(tmp / "cache")]
    procs = {}
    for name, extra in runs.items():
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
        metrics = tmp / f"{name}.jsonl"
        procs[name] = (metrics, subprocess.Popen(
            [PYTHON, os.path.join(ROOT, "pretrain_gpt.py"), *common, *extra, "--metrics-file", str(metrics)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for name, (metrics, proc) in procs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-3000:]
        records = [json.loads(line) for line in open(metrics)]
        out[name] = [r["val_loss"] for r in records if "val_loss" in r][-1]
    return out


def test_default_preln_and_normformer_learn_beyond_unigram(corpus):
    tmp, prefix, sp_model = corpus
    entropy = unigram_entropy(prefix)
    losses = final_valid_losses(tmp, prefix, sp_model, {
        "preln": [],
        "normformer": ["--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids"],
        "megatron_init": ["--init-scheme", "megatron"],  # the old default: the negative control
    })
    report = f"unigram entropy {entropy:.3f}; final valid losses {losses}"
    assert losses["preln"] < entropy - MARGIN, report
    assert losses["normformer"] < entropy - MARGIN, report
    assert losses["megatron_init"] > entropy - MARGIN, report
