#!/usr/bin/env python
"""Benchmarks of the data pipeline; prints a table.

1. GPT sample-index build (document, sample and shuffle index) for a synthetic corpus of
   ``--index-docs`` documents of ~``--doc-tokens`` tokens (default 20M x 500 = 10B tokens).
2. Blending-index build for ``--blend-samples`` samples over 2 and 3 datasets.
3. ``tools/preprocess_data.py`` throughput (docs/s, MB/s) on the stdlib demo corpus (repeated
   ``--corpus-repeats`` times) with a SentencePiece model trained on it, for 1 and 2 workers.

Example::

    python bench/bench_data.py
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_normformer.data.blended_dataset import build_blending_indices  # noqa: E402
from megatron_normformer.data.gpt_dataset import build_gpt_indices  # noqa: E402


def bench_index(num_docs: int, doc_tokens: int, seq_length: int) -> list:
    rng = np.random.default_rng(0)
    sizes = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2 + 1, num_docs).astype(np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // seq_length
    start = time.perf_counter()
    arrays = build_gpt_indices(sizes, np.arange(num_docs, dtype=np.int32), num_samples, seq_length, 1234)
    seconds = time.perf_counter() - start
    return [f"GPT sample index: {num_docs / 1e6:.0f}M docs, {tokens / 1e9:.2f}B tokens, "
            f"seq {seq_length}, {len(arrays['shuffle_index']) / 1e6:.2f}M samples", f"{seconds:.1f} s"]


def bench_blend(num_samples: int, k: int) -> list:
    weights = list(np.arange(1, k + 1) / sum(range(1, k + 1)))
    start = time.perf_counter()
    build_blending_indices(weights, num_samples)
    seconds = time.perf_counter() - start
    return [f"blending index: {num_samples / 1e6:.0f}M samples over {k} datasets", f"{seconds:.1f} s"]


def run(cmd: list) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done.stderr


def bench_preprocess(repeats: int, workers_list: list) -> list:
    rows = []
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        demo = os.path.join(tmp, "demo.jsonl")
        run([py, os.path.join(ROOT, "tools/make_demo_corpus.py"), "--output", demo])
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(demo, "rb") as f:
            text = f.read()
        with open(corpus, "wb") as f:
            for _ in range(repeats):
                f.write(text)
        run([py, os.path.join(ROOT, "tools/train_tokenizer.py"), "--input", demo, "--vocab-size",
             "8000", "--output-prefix", os.path.join(tmp, "sp")])
        size_mb = os.path.getsize(corpus) / 2**20
        for workers in workers_list:
            log = run([py, os.path.join(ROOT, "tools/preprocess_data.py"), "--input", corpus,
                       "--output-prefix", os.path.join(tmp, f"out{workers}"), "--tokenizer-type",
                       "SentencePieceTokenizer", "--tokenizer-model", os.path.join(tmp, "sp.model"),
                       "--append-eod", "--workers", str(workers), "--log-interval", "0"])
            done = [line for line in log.splitlines() if line.startswith("done:")][0]
            rate = done.split("(")[1].split(")")[0]
            rows.append([f"preprocess {size_mb:.1f} MB demo corpus, SentencePiece 8k, "
                         f"{workers} worker(s)", rate])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-docs", type=int, default=20_000_000)
    parser.add_argument("--doc-tokens", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-samples", type=int, default=5_000_000)
    parser.add_argument("--corpus-repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = [bench_index(args.index_docs, args.doc_tokens, args.seq_length)]
    rows += [bench_blend(args.blend_samples, k) for k in (2, 3)]
    rows += bench_preprocess(args.corpus_repeats, args.workers)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark'.ljust(width)} | result")
    print(f"{'-' * width}-|-{'-' * 28}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
