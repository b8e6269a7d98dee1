"""Train/valid/test GPT and masked-LM datasets from ``--data-path``, ``--split`` and sample counts.

One prefix: each split is a dataset (``GPTDataset``, ``MaskedLMDataset``) over its contiguous
document range. Several prefixes with weights: each dataset builds ``ceil(ceil(n * w) * 1.005)``
samples per split (a 0.5 % surplus, as Megatron-LM) and a ``BlendedDataset`` draws
``sum(ceil(n * w))`` samples from them. Several prefixes without weights: each contributes one
epoch, weighted by its size.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .blended_dataset import BlendedDataset, blend_cache_dir, parse_data_path
from .gpt_dataset import GPTDataset, MockGPTDataset, default_cache_dir, split_document_ranges
from .index_cache import Barrier
from .indexed_dataset import IndexedDataset, dataset_exists

SPLIT_NAMES = ("train", "valid", "test")
BLEND_SURPLUS = 0.005

Datasets = Tuple[Optional[torch.utils.data.Dataset], ...]


def _open(prefix: str) -> IndexedDataset:
    if not dataset_exists(prefix):
        raise FileNotFoundError(
            f"--data-path {prefix}: expected {prefix}.bin and {prefix}.idx "
            "(give the prefix, without extension)"
        )
    return IndexedDataset(prefix)


# (indexed, first document, end document, split name, samples or None, cache dir) -> dataset
SplitFactory = Callable[[IndexedDataset, int, int, str, Optional[int], str], torch.utils.data.Dataset]


def _gpt_splits(seq_length: int, seed: int, barrier: Optional[Barrier]) -> SplitFactory:
    def make(indexed, first, end, name, num_samples, cache_dir):
        documents = np.arange(first, end, dtype=np.int32)
        return GPTDataset(indexed, documents, num_samples, seq_length, seed, name, cache_dir, barrier)
    return make


def _split_datasets(prefix: str, split: str, num_samples: Sequence[Optional[int]],
                    cache_path: Optional[str], make: SplitFactory) -> List[Optional[torch.utils.data.Dataset]]:
    indexed = _open(prefix)
    ranges = split_document_ranges(split, indexed.num_documents)
    cache_dir = cache_path or default_cache_dir(prefix)
    out = []
    for name, rng, n in zip(SPLIT_NAMES, ranges, num_samples):
        if rng is None or rng[1] <= rng[0] or n == 0:
            out.append(None)
            continue
        out.append(make(indexed, rng[0], rng[1], name, n, cache_dir))
    return out


def _mock_or_check(mock_cls, data_path, mock: bool, train_valid_test_num_samples, seq_length: int,
                   vocab_size, seed: int):
    """The three mock datasets when ``mock``; otherwise check the request and return None."""
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples needs three entries")
    if mock:
        return tuple(None if not n else mock_cls(n, seq_length, vocab_size, seed + i)
                     for i, n in enumerate(train_valid_test_num_samples))
    if not data_path:
        raise ValueError("--data-path is required unless --mock-data is given")
    return None


def build_train_valid_test_datasets(
    data_path: Optional[Sequence[str]],
    split: str,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Sequence[Optional[int]],
    cache_path: Optional[str] = None,
    mock: bool = False,
    vocab_size: Optional[int] = None,
    barrier: Optional[Barrier] = None,
) -> Datasets:
    """Three datasets (None where a split is empty or asked for 0 samples).

    Each sample is ``{"text": int64[seq_length + 1]}`` (blends add ``"dataset_id"``).
    ``num_samples`` None means one epoch of that split. ``cache_path`` (``--data-cache-path``)
    holds the index arrays, default ``cache/`` next to the first prefix. ``mock`` ignores
    ``data_path`` and returns ``MockGPTDataset``s of ``vocab_size``.
    """
    mocks = _mock_or_check(MockGPTDataset, data_path, mock, train_valid_test_num_samples,
                           seq_length, vocab_size, seed)
    if mocks is not None:
        return mocks
    return _build(data_path, split, train_valid_test_num_samples, cache_path, barrier,
                  _gpt_splits(seq_length, seed, barrier))


def _build(data_path, split: str, num_samples: Sequence[Optional[int]], cache_path: Optional[str],
           barrier: Optional[Barrier], make: SplitFactory) -> Datasets:
    """One prefix: its splits as ``make`` builds them; several: blended (module docstring)."""
    weights, prefixes = parse_data_path(data_path)
    if len(prefixes) == 1:
        return tuple(_split_datasets(prefixes[0], split, num_samples, cache_path, make))
    return _blend(weights, prefixes, split, num_samples, cache_path or blend_cache_dir(prefixes),
                  barrier, make)


def _blend(
    weights: Optional[List[float]],
    prefixes: List[str],
    split: str,
    num_samples: Sequence[Optional[int]],
    cache_dir: str,
    barrier: Optional[Barrier],
    make: SplitFactory,
) -> Datasets:
    if weights is None:
        per_dataset = [[None if n != 0 else 0 for n in num_samples] for _ in prefixes]
    else:
        per_dataset = [
            [None if n is None else math.ceil(math.ceil(n * w) * (1 + BLEND_SURPLUS)) for n in num_samples]
            for w in weights
        ]
    parts = [_split_datasets(p, split, sizes, cache_dir, make) for p, sizes in zip(prefixes, per_dataset)]
    result: List[Optional[BlendedDataset]] = []
    for s, name in enumerate(SPLIT_NAMES):
        members = [(j, part[s]) for j, part in enumerate(parts) if part[s] is not None]
        if not members:
            result.append(None)
            continue
        datasets = [d for _, d in members]
        if weights is None:
            w = [float(len(d)) for d in datasets]
            size = sum(len(d) for d in datasets)
            if num_samples[s] is not None:
                size = min(num_samples[s], size)
        else:
            if num_samples[s] is None:
                raise ValueError("blending with weights needs a sample count for every split")
            w = [weights[j] for j, _ in members]
            size = sum(math.ceil(num_samples[s] * weights[j]) for j, _ in members)
        descriptions = [d.description for d in datasets]
        result.append(BlendedDataset(datasets, w, size, name, cache_dir, barrier, descriptions))
    return tuple(result)


def build_masked_lm_datasets(
    data_path: Optional[Sequence[str]],
    split: str,
    seq_length: int,
    seed: int,
    train_valid_test_num_samples: Sequence[Optional[int]],
    special=None,
    cache_path: Optional[str] = None,
    mock: bool = False,
    vocab_size: Optional[int] = None,
    barrier: Optional[Barrier] = None,
) -> Datasets:
    """Train/valid/test masked-LM datasets (None where a split is empty or asked for 0 samples).

    The document ranges and blending are those of ``build_train_valid_test_datasets``; each split
    of each prefix is a ``MaskedLMDataset`` (``special``: the tokenizer's ``SpecialTokens``).
    ``mock`` returns ``MockMaskedLMDataset``s of ``vocab_size``.
    """
    from .masked_lm_dataset import MaskedLMDataset, MockMaskedLMDataset

    mocks = _mock_or_check(MockMaskedLMDataset, data_path, mock, train_valid_test_num_samples,
                           seq_length, vocab_size, seed)
    if mocks is not None:
        return mocks

    def make(indexed, first, end, name, num_samples, cache_dir):
        return MaskedLMDataset(indexed, first, end, seq_length, special, seed, num_samples,
                               split_name=name, cache_dir=cache_dir, barrier=barrier)

    return _build(data_path, split, train_valid_test_num_samples, cache_path, barrier, make)
