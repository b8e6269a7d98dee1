"""GPT (left-to-right LM) samples cut from an indexed dataset, Megatron-LM's way.

Three index arrays define the dataset, as in Megatron-LM's GPT dataset (``docs/data.md``):

- the *document index*: the split's document ids tiled over E epochs (E = the fewest with
  ``E * T >= num_samples * seq_length + 1`` tokens) and shuffled with ``RandomState(seed)``; when
  the last epoch contributes fewer than 80 % of an epoch's samples it is shuffled separately, so
  its few samples are not spread over the whole run;
- the *sample index*: ``(document-index position, token offset)`` where each sample starts; sample
  k covers tokens ``k * S ... k * S + S`` of the concatenated document order (``S + 1`` tokens,
  consecutive samples share one token);
- the *shuffle index*: a permutation of sample ids (two separate permutations with a separate
  last epoch).

The sample index is computed with vectorised numpy (``searchsorted`` over cumulative document
lengths) and gives the same array as Megatron's ``helpers.cpp`` loop.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .index_cache import Barrier, cached_arrays
from .indexed_dataset import IndexedDataset

SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


def num_epochs_needed(tokens_per_epoch: int, num_samples: Optional[int], seq_length: int) -> int:
    """Fewest epochs whose tokens cover ``num_samples`` samples of ``seq_length + 1`` tokens."""
    if num_samples is None:
        return 1
    if tokens_per_epoch <= 0:
        raise ValueError("the split has no tokens")
    requested = num_samples * seq_length + 1
    return max(1, -(-requested // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_last_epoch: bool) -> np.ndarray:
    """``documents`` tiled ``num_epochs`` times and shuffled (the last epoch apart if asked)."""
    if not separate_last_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int,
                       drop_last_partial_sequence: bool = True) -> np.ndarray:
    """``[num_samples + 1, 2]`` array of (document-index position, offset) sample starts.

    Sample k starts at token ``k * seq_length`` of the concatenation of the documents in
    ``document_index`` order; the row after it marks where it ends (its last token included).
    """
    total = num_epochs * tokens_per_epoch - 1
    num_samples = total // seq_length if drop_last_partial_sequence else -(-total // seq_length)
    lengths = np.asarray(sizes, dtype=np.int64)[document_index]
    ends = np.cumsum(lengths)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    positions = np.minimum(positions, total)  # a trailing partial sample ends at the last token
    docs = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[docs] - lengths[docs])
    docs[0], offsets[0] = 0, 0
    limit = max(len(document_index), int(np.max(sizes, initial=0)))
    dtype = np.int32 if limit <= np.iinfo(np.int32).max else np.int64
    return np.stack((docs, offsets), axis=1).astype(dtype)


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of ``[0, num_samples)`` followed by one of ``[num_samples, total_size)``."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: Optional[int],
                      seq_length: int, seed: int,
                      drop_last_partial_sequence: bool = True) -> Dict[str, np.ndarray]:
    """The document, sample and shuffle indices for one split (see the module docstring)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    tokens_per_epoch = int(np.sum(np.asarray(sizes, dtype=np.int64)[documents]))
    if tokens_per_epoch < 2:
        raise ValueError(f"the split holds {tokens_per_epoch} tokens; a sample needs 2 or more")
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate_last_epoch = False
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_from_last = num_samples - samples_before_last
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last_epoch = samples_from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_last_epoch)
    sample_index = build_sample_index(sizes, document_index, seq_length, num_epochs,
                                      tokens_per_epoch, drop_last_partial_sequence)
    total = sample_index.shape[0] - 1
    first = samples_before_last if separate_last_epoch else total
    return {"document_index": document_index, "sample_index": sample_index,
            "shuffle_index": build_shuffle_index(first, total, rng)}


def default_cache_dir(prefix: str) -> str:
    """Where index arrays go without ``--data-cache-path``: ``cache/`` next to the data."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens over a set of sequences of an indexed dataset.

    ``documents`` holds *sequence* ids (Megatron-LM's name for them): the GPT stream is the
    concatenation of sequences, so a document split into sentences (``--split-sentences``) is
    several entries and an empty document none.

    ``dataset[i]`` is ``{"text": int64[seq_length + 1]}``; the training step shifts it into inputs
    and labels. ``len(dataset)`` is the number of samples the index holds (at least
    ``num_samples``; one epoch when ``num_samples`` is None).
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, num_samples: Optional[int],
                 seq_length: int, seed: int, split_name: str = "train",
                 cache_dir: Optional[str] = None, barrier: Optional[Barrier] = None) -> None:
        self.indexed = indexed
        self.seq_length = seq_length
        documents = np.asarray(documents, dtype=np.int32)
        if len(documents) == 0:
            raise ValueError(f"{indexed.prefix}: the {split_name} split has no sequences")
        self.description = {
            "class": "GPTDataset", "prefix": os.path.abspath(indexed.prefix),
            "num_sequences": len(indexed), "split": split_name,
            "sequences": [int(documents[0]), int(documents[-1]) + 1, len(documents)],
            "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
        }
        arrays = cached_arrays(
            cache_dir, f"GPTDataset-{split_name}", self.description,
            ("document_index", "sample_index", "shuffle_index"),
            lambda: build_gpt_indices(indexed.sequence_lengths, documents, num_samples, seq_length, seed),
            barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, sample: int) -> np.ndarray:
        """Tokens of sample ``sample`` *before* the shuffle (int64, ``seq_length + 1``)."""
        doc_beg, off_beg = (int(x) for x in self.sample_index[sample])
        doc_end, off_end = (int(x) for x in self.sample_index[sample + 1])
        get = self.indexed.get
        if doc_beg == doc_end:
            parts = [get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)]
        else:
            parts = [get(int(self.document_index[doc_beg]), off_beg)]
            parts += [get(int(self.document_index[i])) for i in range(doc_beg + 1, doc_end)]
            parts.append(get(int(self.document_index[doc_end]), 0, off_end + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        return {"text": self.sample_tokens(int(self.shuffle_index[idx]))}


class MockGPTDataset(torch.utils.data.Dataset):
    """Deterministic random tokens for tests and benchmarks (``--mock-data``).

    Sample i depends only on ``(seed, i)``: ``{"text": int64[seq_length + 1]}`` drawn uniformly
    from ``[0, vocab_size)``.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0) -> None:
        if vocab_size is None or vocab_size < 1:
            raise ValueError("--mock-data needs a positive vocab_size")
        self.num_samples = int(num_samples)
        self.seq_length = seq_length
        self.vocab_size = int(vocab_size)
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, int(idx)])
        tokens = rng.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)
        return {"text": tokens}


def split_ranges(split: str, count: int) -> Tuple[Optional[Tuple[int, int]], ...]:
    """Contiguous ``[begin, end)`` ranges of train/valid/test over ``count`` items, None if empty.

    ``split`` is e.g. ``"969,30,1"`` (missing parts count 0); bounds are
    ``round(cumulative_fraction * count)`` as in Megatron-LM. GPT splits count sequences, masked
    LM documents (``builder.py``).
    """
    weights = _parse_split(split)
    total = sum(weights)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    return tuple(None if hi <= lo else (int(round(lo * count)), int(round(hi * count)))
                 for lo, hi in zip(bounds[:-1], bounds[1:]))


def _parse_split(split: str) -> list:
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected comma-separated numbers like 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: expected one to three non-negative numbers with a "
                         "positive sum")
    return weights + [0.0] * (3 - len(weights))
