"""Tokenise a jsonl corpus into MMIDIDX datasets (the engine of ``tools/preprocess_data.py``).

Each input line is a JSON object; every ``--json-keys`` field becomes its own dataset
``{output_prefix}_{key}_document`` (``_sentence`` with ``--split-sentences``, Megatron-LM's
naming). Lines are tokenised by a pool of workers and written in input order, so the output is
byte-identical for any ``--workers``. Files are written under temporary names and renamed only
when the whole input succeeded.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from .sentences import split_sentences
from .tokenizers import Tokenizer, build_tokenizer


class PreprocessError(ValueError):
    """Input the tool cannot process; the message names the file and line."""


@dataclass
class PreprocessConfig:
    """What ``tools/preprocess_data.py`` was asked to do (its flags)."""

    input: str
    """jsonl file (``.gz`` accepted)."""
    output_prefix: str
    """Outputs are ``{output_prefix}_{key}_{document|sentence}.bin/.idx``."""
    tokenizer_type: str
    """One of ``tokenizers.TOKENIZER_TYPES``."""
    json_keys: Sequence[str] = ("text",)
    """Fields to tokenise, one dataset each."""
    tokenizer_model: Optional[str] = None
    """SentencePiece ``.model`` or HF ``tokenizer.json``."""
    vocab_file: Optional[str] = None
    """GPT-2 ``vocab.json``."""
    merge_file: Optional[str] = None
    """GPT-2 ``merges.txt``."""
    vocab_size: Optional[int] = None
    """NullTokenizer vocabulary size."""
    append_eod: bool = False
    """Append the end-of-document token to every document."""
    split_sentences: bool = False
    """One sequence per sentence (rule-based splitter)."""
    workers: int = 1
    """Tokeniser processes."""
    log_interval: int = 10000
    """Report progress every this many lines."""
    skip_bad_lines: bool = False
    """Skip (and count) malformed lines instead of stopping."""
    chunk_size: int = 64
    """Lines per task sent to a worker."""


@dataclass
class PreprocessSummary:
    """Counts reported when the run ends."""

    documents: Dict[str, int] = field(default_factory=dict)
    tokens: Dict[str, int] = field(default_factory=dict)
    empty: Dict[str, int] = field(default_factory=dict)
    lines: int = 0
    bad_lines: int = 0
    blank_lines: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)


_WORKER: Dict[str, object] = {}


def _tokenizer_of(config: PreprocessConfig) -> Tokenizer:
    return build_tokenizer(config.tokenizer_type, config.tokenizer_model, config.vocab_file,
                           config.merge_file, config.vocab_size)


def _init_worker(config: PreprocessConfig) -> None:
    _WORKER["config"] = config
    _WORKER["tokenizer"] = _tokenizer_of(config)
    _WORKER["dtype"] = optimal_dtype(_WORKER["tokenizer"].vocab_size)


Encoded = Tuple[str, int, int, object]


def _encode_line(item: Tuple[int, bytes]) -> Encoded:
    """("ok" | "bad" | "blank", line number, byte count, {key: (tokens, lengths)} or message)."""
    lineno, raw = item
    if not raw.strip():
        return "blank", lineno, len(raw), None
    config: PreprocessConfig = _WORKER["config"]  # type: ignore[assignment]
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return "bad", lineno, len(raw), f"malformed JSON ({error})"
    if not isinstance(record, dict):
        return "bad", lineno, len(raw), f"expected a JSON object, got {type(record).__name__}"
    out = {}
    for key in config.json_keys:
        if key not in record:
            return "bad", lineno, len(raw), f"missing key {key!r}"
        try:
            out[key] = _encode_text(record[key], config)
        except ValueError as error:
            return "bad", lineno, len(raw), f"key {key!r}: {error}"
    return "ok", lineno, len(raw), out


def _encode_text(value: object, config: PreprocessConfig) -> Tuple[np.ndarray, List[int]]:
    tokenizer: Tokenizer = _WORKER["tokenizer"]  # type: ignore[assignment]
    if isinstance(value, str):
        sentences = split_sentences(value) if config.split_sentences else [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        sentences = value
    else:
        raise ValueError(f"expected a string or a list of strings, got {type(value).__name__}")
    ids: List[int] = []
    lengths: List[int] = []
    for sentence in sentences:
        sentence_ids = tokenizer.encode(sentence)
        if sentence_ids:
            ids.extend(sentence_ids)
            lengths.append(len(sentence_ids))
    if ids and config.append_eod:
        ids.append(tokenizer.eod)
        lengths[-1] += 1
    return np.asarray(ids, dtype=_WORKER["dtype"]), lengths


def output_prefix_for(output_prefix: str, key: str, split_sentences_: bool) -> str:
    """``{output_prefix}_{key}_document`` or ``..._sentence`` (Megatron-LM's names)."""
    level = "sentence" if split_sentences_ else "document"
    return f"{output_prefix}_{key}_{level}"


def _read_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, line


def _encoded_stream(config: PreprocessConfig, pool) -> Iterator[Encoded]:
    lines = _read_lines(config.input)
    if pool is None:
        _init_worker(config)
        return map(_encode_line, lines)
    return pool.imap(_encode_line, lines, config.chunk_size)


class _Outputs:
    """One builder per key, writing to temporary names until ``commit``."""

    def __init__(self, config: PreprocessConfig, dtype: np.dtype) -> None:
        directory = os.path.dirname(os.path.abspath(config.output_prefix))
        os.makedirs(directory, exist_ok=True)
        self.final = {k: output_prefix_for(config.output_prefix, k, config.split_sentences)
                      for k in config.json_keys}
        self.tmp_suffix = f".tmp{os.getpid()}"
        self.builders = {
            k: IndexedDatasetBuilder(p + ".bin" + self.tmp_suffix, dtype) for k, p in self.final.items()
        }

    def commit(self) -> List[str]:
        for key, prefix in self.final.items():
            self.builders[key].finalize(prefix + ".idx" + self.tmp_suffix)
        for prefix in self.final.values():
            for ext in (".bin", ".idx"):
                os.replace(prefix + ext + self.tmp_suffix, prefix + ext)
        return list(self.final.values())

    def discard(self) -> None:
        for key, prefix in self.final.items():
            self.builders[key]._data.close()
            for ext in (".bin", ".idx"):
                path = prefix + ext + self.tmp_suffix
                if os.path.exists(path):
                    os.remove(path)


def _log_progress(summary: PreprocessSummary, start: float) -> None:
    elapsed = max(time.time() - start, 1e-9)
    print(f"processed {summary.lines} lines ({summary.lines / elapsed:.0f} docs/s, "
          f"{summary.bytes / elapsed / 2**20:.2f} MB/s)", file=sys.stderr, flush=True)


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenise ``config.input`` into one dataset per json key; see the module docstring."""
    if not os.path.isfile(config.input):
        raise PreprocessError(f"--input {config.input}: file not found")
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    tokenizer = _tokenizer_of(config)  # fail early on a bad tokenizer flag
    if config.append_eod and tokenizer.eod is None:
        raise PreprocessError(f"--append-eod: {config.tokenizer_type} has no end-of-document token")
    summary = PreprocessSummary(documents={k: 0 for k in config.json_keys},
                                tokens={k: 0 for k in config.json_keys},
                                empty={k: 0 for k in config.json_keys})
    outputs = _Outputs(config, optimal_dtype(tokenizer.vocab_size))
    pool = None
    start = time.time()
    try:
        if config.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(
                config.workers, initializer=_init_worker, initargs=(config,))
        for status, lineno, nbytes, payload in _encoded_stream(config, pool):
            summary.lines += 1
            summary.bytes += nbytes
            _consume(config, summary, outputs, status, lineno, payload)
            if config.log_interval > 0 and summary.lines % config.log_interval == 0:
                _log_progress(summary, start)
        summary.outputs = outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.seconds = time.time() - start
    return summary


def _consume(config, summary, outputs, status, lineno, payload) -> None:
    if status == "blank":
        summary.blank_lines += 1
        return
    if status == "bad":
        if not config.skip_bad_lines:
            raise PreprocessError(f"{config.input}:{lineno}: {payload} (use --skip-bad-lines to skip)")
        summary.bad_lines += 1
        return
    for key, (tokens, lengths) in payload.items():
        if not lengths:
            summary.empty[key] += 1
            continue
        outputs.builders[key].add_document(tokens, lengths)
        summary.documents[key] += 1
        summary.tokens[key] += len(tokens)


def format_summary(summary: PreprocessSummary) -> str:
    """The closing report printed by the tool."""
    elapsed = max(summary.seconds, 1e-9)
    lines = [
        f"done: {summary.lines} lines in {summary.seconds:.1f} s "
        f"({summary.lines / elapsed:.0f} docs/s, {summary.bytes / elapsed / 2**20:.2f} MB/s); "
        f"{summary.bad_lines} bad lines skipped, {summary.blank_lines} blank lines"
    ]
    for key, prefix in zip(summary.documents, summary.outputs):
        lines.append(
            f"  {prefix}.bin/.idx: {summary.documents[key]} documents, {summary.tokens[key]} tokens, "
            f"{summary.empty[key]} empty documents skipped")
    return "\n".join(lines)
