#!/usr/bin/env python
"""`make demo`: a short, real NormFormer training run on this machine's CPU.

1. If missing, build the demo data: a corpus from the Python stdlib's docstrings
   (tools/make_demo_corpus.py), a 2,000-piece SentencePiece tokenizer (tools/train_tokenizer.py)
   and the Megatron .bin/.idx dataset (tools/preprocess_data.py), all under data/.
2. Train a small NormFormer (4 layers, hidden 128, all four NormFormer operations) for 300
   iterations with tensor parallelism 2 on 2 processes (torchrun), printing the losses, and
   save the checkpoint to data/demo_ckpt.
3. Compare the final validation perplexity with the unigram perplexity of the training tokens
   (what a model that learned only token frequencies would reach), and print a continuation
   generated from the saved checkpoint.
"""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
PY = sys.executable
BIN = os.path.dirname(PY)


def step(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main():
    os.makedirs(DATA, exist_ok=True)
    corpus, spm, prefix = (os.path.join(DATA, "demo.jsonl"), os.path.join(DATA, "demo_spm"),
                           os.path.join(DATA, "demo"))
    dataset = prefix + "_text_document"
    if not os.path.exists(corpus):
        step([PY, "tools/make_demo_corpus.py", "--output", corpus, "--max-docs", "400"])
    if not os.path.exists(spm + ".model"):
        step([PY, "tools/train_tokenizer.py", "--input", corpus, "--output-prefix", spm,
              "--vocab-size", "2000"])
    if not os.path.exists(dataset + ".idx"):
        step([PY, "tools/preprocess_data.py", "--input", corpus, "--tokenizer-type",
              "SentencePieceTokenizer", "--tokenizer-model", spm + ".model", "--append-eod",
              "--output-prefix", prefix, "--workers", "2"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = [os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "pretrain_gpt.py",
             "--tensor-model-parallel-size", "2",
             "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
             "--seq-length", "128", "--max-position-embeddings", "128",
             "--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids",
             "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "300",
             "--lr", "3e-3", "--lr-warmup-iters", "10", "--hidden-dropout", "0",
             "--attention-dropout", "0",
             "--data-path", dataset, "--split", "95,5,0", "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", spm + ".model", "--num-workers", "0",
             "--log-interval", "10", "--eval-interval", "100", "--eval-iters", "4",
             "--metrics-file", os.path.join(DATA, "demo_metrics.jsonl"),
             # The README's generation / conversion / evaluation examples start from it.
             "--save", os.path.join(DATA, "demo_ckpt")]
    metrics = os.path.join(DATA, "demo_metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    print("+ " + " ".join(train), flush=True)
    subprocess.run(train, cwd=ROOT, check=True, env=env)

    val = [r["val_ppl"] for r in map(json.loads, open(metrics)) if "val_ppl" in r][-1]
    print(f"\nvalidation perplexity {val:.1f}; a unigram model of the training tokens: "
          f"{unigram_perplexity(dataset):.1f}", flush=True)
    step([PY, "tools/generate.py", "--load", os.path.join(DATA, "demo_ckpt"),
          "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm + ".model",
          "--prompt", "Return the", "--max-new-tokens", "32", "--top-p", "0.9", "--temperature", "0.8"])


def unigram_perplexity(prefix: str, train_fraction: float = 0.95) -> float:
    """exp(entropy) of the token distribution of the training documents (``--split 95,5,0``)."""
    sys.path.insert(0, ROOT)
    from megatron_normformer.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    end = int(ds.document_indices[int(round(ds.num_documents * train_fraction))])
    p = np.bincount(np.concatenate([np.asarray(ds[i]) for i in range(end)]))
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


if __name__ == "__main__":
    main()
