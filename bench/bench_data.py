#!/usr/bin/env python
"""Benchmarks of the data pipeline; prints a table.

1. GPT sample-index build (document, sample and shuffle index) for a synthetic corpus of
   ``--index-docs`` documents of ~``--doc-tokens`` tokens (default 20M x 500 = 10B tokens).
2. Blending-index build for ``--blend-samples`` samples over 2 and 3 datasets.
3. Opening an ``.idx`` of ``--index-docs`` one-sequence documents (the same 10B-token corpus): the
   full validation of its entries against each other and the ``.bin`` size (a sparse file of the
   right length), against an open that skips it.
4. ``tools/preprocess_data.py`` throughput (docs/s, MB/s) on the stdlib demo corpus (repeated
   ``--corpus-repeats`` times) for 1 and 2 workers, with a SentencePiece model and with a GPT-2
   byte-level BPE vocabulary (``GPT2BPETokenizer``: vocab.json + merges.txt, 8k entries), both
   trained on that corpus. ``--skip-index`` runs this part only.

Example::

    python bench/bench_data.py
"""
import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_normformer.data.blended_dataset import build_blending_indices  # noqa: E402
from megatron_normformer.data.gpt_dataset import build_gpt_indices  # noqa: E402
from megatron_normformer.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    _Index,
    encode_index,
    idx_path,
)


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


def bench_validate(num_docs: int, doc_tokens: int, repeats: int = 3) -> list:
    """Best of ``repeats`` opens with and without validation, the ``.idx`` in the page cache; then
    one validated open with it evicted from the cache."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(doc_tokens // 2, doc_tokens * 3 // 2 + 1, num_docs).astype(np.int32)
    dtype = np.dtype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        with open(idx_path(prefix), "wb") as f:
            f.write(encode_index(dtype, sizes, np.arange(num_docs + 1)))
        with open(prefix + ".bin", "wb") as f:
            f.truncate(int(sizes.sum(dtype=np.int64)) * dtype.itemsize)  # sparse: no disk used
        del sizes
        timings = {}
        for name, open_ in (("unchecked", lambda: _Index(idx_path(prefix), validate=False)),
                            ("validated", lambda: IndexedDataset(prefix))):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                open_()
                best = min(best, time.perf_counter() - start)
            timings[name] = best
        # The .idx out of the page cache (this file's pages only; no privileges needed).
        with open(idx_path(prefix), "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        IndexedDataset(prefix)
        cold = time.perf_counter() - start
        mb = os.path.getsize(idx_path(prefix)) / 2**20
    return [f".idx open + validation: {num_docs / 1e6:.0f}M sequences and documents ({mb:.0f} MB)",
            f"{timings['validated']:.2f} s in the page cache, {cold:.2f} s read from disk "
            f"(without validation {timings['unchecked'] * 1000:.1f} ms)"]


def bench_blend(num_samples: int, k: int) -> list:
    weights = list(np.arange(1, k + 1) / sum(range(1, k + 1)))
    start = time.perf_counter()
    build_blending_indices(weights, num_samples)
    seconds = time.perf_counter() - start
    return [f"blending index: {num_samples / 1e6:.0f}M samples over {k} datasets", f"{seconds:.1f} s"]


def run(cmd: list) -> tuple:
    """(stderr, CPU seconds) of a command; the CPU time includes its worker processes and, unlike
    wall time, is not inflated by other jobs on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stderr, cpu


def train_gpt2_bpe(jsonl: str, out_dir: str, vocab_size: int) -> tuple:
    """vocab.json and merges.txt of a byte-level BPE trained on the texts of ``jsonl`` (the
    GPT-2 file layout, trained with the ``tokenizers`` library)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    vocab, merges = tok.model.save(out_dir, "gpt2")
    return vocab, merges


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
        vocab, merges = train_gpt2_bpe(demo, tmp, 8000)
        size_mb = os.path.getsize(corpus) / 2**20
        tokenizers = {
            "SentencePiece 8k": ["SentencePieceTokenizer", "--tokenizer-model",
                                 os.path.join(tmp, "sp.model")],
            "GPT2BPETokenizer 8k": ["GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges],
        }
        for name, flags in tokenizers.items():
            for workers in workers_list:
                log, cpu = run([py, os.path.join(ROOT, "tools/preprocess_data.py"), "--input", corpus,
                           "--output-prefix", os.path.join(tmp, f"out{workers}"), "--tokenizer-type",
                           *flags, "--append-eod", "--workers", str(workers), "--log-interval", "0"])
                done = [line for line in log.splitlines() if line.startswith("done:")][0]
                rate = done.split("(")[1].split(")")[0]
                rows.append([f"preprocess {size_mb:.1f} MB demo corpus, {name}, "
                             f"{workers} worker(s)", f"{rate}; {size_mb / cpu:.2f} MB per CPU-s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-docs", type=int, default=20_000_000)
    parser.add_argument("--doc-tokens", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-samples", type=int, default=5_000_000)
    parser.add_argument("--corpus-repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-index", action="store_true",
                        help="Preprocessing throughput only (skip the index, blending and .idx "
                             "validation cases).")
    parser.add_argument("--only-validation", action="store_true",
                        help="The .idx validation case only.")
    args = parser.parse_args()
    rows = []
    if args.only_validation:
        rows.append(bench_validate(args.index_docs, args.doc_tokens))
    elif not args.skip_index:
        rows.append(bench_index(args.index_docs, args.doc_tokens, args.seq_length))
        rows += [bench_blend(args.blend_samples, k) for k in (2, 3)]
        rows.append(bench_validate(args.index_docs, args.doc_tokens))
    if not args.only_validation:
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
