"""Train/valid/test GPT and masked-LM datasets from ``--data-path``, ``--split`` and sample counts.

``--split`` cuts each prefix into three contiguous ranges, as Megatron-LM does: GPT over its
*sequences* (the units a GPT sample index walks: sentences of a ``--split-sentences`` file, none
for an empty document), masked LM over its *documents* (its samples pack whole documents).

One prefix: each split is a dataset (``GPTDataset``, ``MaskedLMDataset``) over its range. Several
prefixes with weights: each dataset builds ``ceil(ceil(n * w) * 1.005)`` samples per split (a
0.5 % surplus, as Megatron-LM) and a ``BlendedDataset`` draws ``sum(ceil(n * w))`` samples from
them. Several prefixes without weights: each contributes one epoch, weighted by its size.

``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path`` instead give each split its
own prefixes (each list blended as above), every prefix used whole; ``--split`` is then unused.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .blended_dataset import BlendedDataset, parse_data_path
from .gpt_dataset import GPTDataset, MockGPTDataset, default_cache_dir, split_ranges
from .index_cache import Barrier
from .indexed_dataset import IndexedDataset, dataset_exists
from .masked_lm_dataset import MaskedLMDataset, MockMaskedLMDataset

SPLIT_NAMES = ("train", "valid", "test")
PER_SPLIT_FLAGS = ("--train-data-path", "--valid-data-path", "--test-data-path")
BLEND_SURPLUS = 0.005

Datasets = Tuple[Optional[torch.utils.data.Dataset], ...]
PathList = Optional[Sequence[str]]


def _open(prefix: str, flag: str) -> IndexedDataset:
    if not dataset_exists(prefix):
        raise FileNotFoundError(f"{flag} {prefix}: expected {prefix}.bin and {prefix}.idx "
                                "(give the prefix, without extension)")
    return IndexedDataset(prefix)


class SplitFactory(NamedTuple):
    """How one task cuts a prefix: ``count`` the units ``--split`` divides, ``make`` one split.

    ``make(indexed, begin, end, split name, samples or None, cache dir)`` builds the dataset over
    units ``[begin, end)``; ``mock(samples, seq_length, vocab_size, seed)`` is ``--mock-data``'s.
    """

    count: Callable[[IndexedDataset], int]
    make: Callable[..., torch.utils.data.Dataset]
    mock: Callable[..., torch.utils.data.Dataset]


# Every prefix of a per-split path is used whole, for its own split only.
WHOLE = {name: tuple(None if other != name else (0.0, 1.0) for other in SPLIT_NAMES)
         for name in SPLIT_NAMES}


def _split_datasets(prefix: str, split, num_samples: Sequence[Optional[int]],
                    cache_path: Optional[str], factory: SplitFactory,
                    flag: str = "--data-path") -> List[Optional[torch.utils.data.Dataset]]:
    """The three splits of one prefix; ``split`` a ``--split`` string or fraction bounds."""
    indexed = _open(prefix, flag)
    count = factory.count(indexed)
    if isinstance(split, str):
        ranges = split_ranges(split, count)
    else:
        ranges = [None if b is None else (int(round(b[0] * count)), int(round(b[1] * count)))
                  for b in split]
    cache_dir = cache_path or default_cache_dir(prefix)
    out = []
    for name, rng, n in zip(SPLIT_NAMES, ranges, num_samples):
        if rng is None or rng[1] <= rng[0] or n == 0:
            out.append(None)
            continue
        out.append(factory.make(indexed, rng[0], rng[1], name, n, cache_dir))
    return out


def build_train_valid_test_datasets(data_path: PathList, split: str, seq_length: int, seed: int,
                                    train_valid_test_num_samples: Sequence[Optional[int]],
                                    cache_path: Optional[str] = None, mock: bool = False,
                                    vocab_size: Optional[int] = None,
                                    barrier: Optional[Barrier] = None,
                                    per_split_paths: Optional[Sequence[PathList]] = None) -> Datasets:
    """Three datasets (None where a split is empty or asked for 0 samples).

    Each sample is ``{"text": int64[seq_length + 1]}`` (blends add ``"dataset_id"``).
    ``num_samples`` None means one epoch of that split. ``cache_path`` (``--data-cache-path``)
    holds the index arrays, default ``cache/`` next to the first prefix. ``mock`` ignores
    ``data_path`` and returns ``MockGPTDataset``s of ``vocab_size``. ``per_split_paths``: the
    train, valid and test path lists (``--train-data-path`` ...; None for a split without one)
    instead of ``data_path`` and ``split``.
    """
    def make(indexed, first, end, name, num_samples, cache_dir):
        sequences = np.arange(first, end, dtype=np.int32)
        return GPTDataset(indexed, sequences, num_samples, seq_length, seed, name, cache_dir, barrier)

    return _build(SplitFactory(len, make, MockGPTDataset), data_path, split, seq_length, seed,
                  train_valid_test_num_samples, cache_path, mock, vocab_size, barrier,
                  per_split_paths)


def build_masked_lm_datasets(data_path: PathList, split: str, seq_length: int, seed: int,
                             train_valid_test_num_samples: Sequence[Optional[int]], special=None,
                             cache_path: Optional[str] = None, mock: bool = False,
                             vocab_size: Optional[int] = None, barrier: Optional[Barrier] = None,
                             per_split_paths: Optional[Sequence[PathList]] = None) -> Datasets:
    """Train/valid/test masked-LM datasets (None where a split is empty or asked for 0 samples).

    Blending and ``per_split_paths`` are those of ``build_train_valid_test_datasets``, but
    ``split`` divides documents; each split of each prefix is a ``MaskedLMDataset``
    (``special``: the tokenizer's ``SpecialTokens``).
    ``mock`` returns ``MockMaskedLMDataset``s of ``vocab_size``.
    """
    def make(indexed, first, end, name, num_samples, cache_dir):
        return MaskedLMDataset(indexed, first, end, seq_length, special, seed, num_samples,
                               split_name=name, cache_dir=cache_dir, barrier=barrier)

    return _build(SplitFactory(lambda indexed: indexed.num_documents, make, MockMaskedLMDataset),
                  data_path, split, seq_length, seed, train_valid_test_num_samples, cache_path,
                  mock, vocab_size, barrier, per_split_paths)


def _build(factory: SplitFactory, data_path, split: str, seq_length: int, seed: int,
           num_samples: Sequence[Optional[int]], cache_path: Optional[str], mock: bool,
           vocab_size: Optional[int], barrier: Optional[Barrier], per_split_paths) -> Datasets:
    """The mock datasets, ``data_path`` cut by ``split``, or each split from its own paths
    (module docstring)."""
    if len(num_samples) != 3:
        raise ValueError("train_valid_test_num_samples needs three entries")
    if mock:
        return tuple(None if not n else factory.mock(n, seq_length, vocab_size, seed + i)
                     for i, n in enumerate(num_samples))
    per_split = per_split_paths is not None and any(p is not None for p in per_split_paths)
    if per_split and data_path:
        raise ValueError("--data-path and --train-data-path/--valid-data-path/--test-data-path "
                         "are mutually exclusive")
    if per_split and len(per_split_paths) != 3:
        raise ValueError("per_split_paths needs three entries (train, valid, test)")
    if not data_path and not per_split:
        raise ValueError("--data-path (or --train-data-path) is required unless --mock-data is given")
    if data_path:
        return _build_blend(data_path, split, num_samples, cache_path, barrier, factory)
    out = []
    for s, (name, paths) in enumerate(zip(SPLIT_NAMES, per_split_paths)):
        if not paths or num_samples[s] == 0:
            out.append(None)
            continue
        sizes = [n if i == s else 0 for i, n in enumerate(num_samples)]
        built = _build_blend(paths, WHOLE[name], sizes, cache_path, barrier, factory,
                             PER_SPLIT_FLAGS[s])
        out.append(built[s])
    return tuple(out)


def _build_blend(data_path, split, num_samples: Sequence[Optional[int]], cache_path: Optional[str],
                 barrier: Optional[Barrier], factory: SplitFactory,
                 flag: str = "--data-path") -> Datasets:
    """One prefix: its splits as ``factory`` builds them; several: blended."""
    try:
        weights, prefixes = parse_data_path(data_path)
    except ValueError as error:
        raise ValueError(str(error).replace("--data-path", flag)) from None
    if len(prefixes) == 1:
        return tuple(_split_datasets(prefixes[0], split, num_samples, cache_path, factory, flag))
    cache_dir = cache_path or default_cache_dir(prefixes[0])
    if weights is None:
        per_dataset = [[None if n != 0 else 0 for n in num_samples] for _ in prefixes]
    else:
        per_dataset = [
            [None if n is None else math.ceil(math.ceil(n * w) * (1 + BLEND_SURPLUS)) for n in num_samples]
            for w in weights
        ]
    parts = [_split_datasets(p, split, sizes, cache_dir, factory, flag)
             for p, sizes in zip(prefixes, per_dataset)]
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
