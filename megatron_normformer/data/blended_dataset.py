"""Blending several datasets by weight (``--data-path 0.3 A 0.7 B``).

Sample i of the blend comes from the dataset whose count lags its target ``weight * i`` the most
(Megatron-LM's greedy rule, ties to the lower dataset id), so every prefix of the blend follows the
weights to within one sample per dataset.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .index_cache import Barrier, cached_arrays


def parse_data_path(data_path: Sequence[str]) -> Tuple[Optional[List[float]], List[str]]:
    """Split ``--data-path`` into (weights, prefixes).

    Accepts prefixes only (``A B``: weights None, the caller blends by dataset size) or
    weight/prefix pairs (``0.3 A 0.7 B``: weights normalised to sum to 1).
    """
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty")

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    numeric = [is_number(x) for x in items]
    if not any(numeric):
        return None, items
    pairs_ok = len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not pairs_ok:
        raise ValueError(f"--data-path {' '.join(items)}: give either prefixes only (A B) or "
                         "weight/prefix pairs (0.3 A 0.7 B)")
    weights = [float(x) for x in items[0::2]]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path weights {weights} must be non-negative with a positive sum")
    total = sum(weights)
    return [w / total for w in weights], items[1::2]


def build_blending_indices(weights: Sequence[float], size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample id within that dataset) for each of ``size`` blended samples.

    Same greedy rule and floating-point arithmetic as Megatron-LM's ``build_blending_indices``:
    at step i pick argmax_j ``weights[j] * max(i, 1) - count[j]``.
    """
    w = [float(x) for x in weights]
    picks = _pick_two(w, size) if len(w) == 2 else _pick_many(w, size)
    choice = np.array(picks, dtype=np.int16)
    return choice, _rank_within_dataset(choice, len(w))


def _pick_many(w: List[float], size: int) -> List[int]:
    k = len(w)
    counts = [0] * k
    picks = [0] * size
    for i in range(size):
        t = float(i) if i > 0 else 1.0
        best, best_err = 0, w[0] * t - counts[0]
        for j in range(1, k):
            err = w[j] * t - counts[j]
            if err > best_err:
                best, best_err = j, err
        picks[i] = best
        counts[best] += 1
    return picks


def _pick_two(w: List[float], size: int) -> List[int]:
    """The two-dataset case of ``_pick_many`` without its inner loop (same arithmetic)."""
    w0, w1 = w
    c0 = c1 = 0
    picks = [0] * size
    for i in range(size):
        t = float(i) if i > 0 else 1.0
        if w1 * t - c1 > w0 * t - c0:
            picks[i] = 1
            c1 += 1
        else:
            c0 += 1
    return picks


def _rank_within_dataset(choice: np.ndarray, k: int) -> np.ndarray:
    """For each position, how many earlier positions chose the same dataset."""
    sample = np.empty(len(choice), dtype=np.int64)
    for j in range(k):
        where = np.flatnonzero(choice == j)
        sample[where] = np.arange(len(where), dtype=np.int64)
    return sample


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    ``blend[i]`` is the underlying sample with ``"dataset_id"`` added.
    """

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int, split_name: str = "train", cache_dir: Optional[str] = None,
                 barrier: Optional[Barrier] = None,
                 descriptions: Optional[Sequence[dict]] = None) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("BlendedDataset needs one weight per dataset")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError("too many datasets to blend")
        self.datasets = list(datasets)
        self.weights = [float(w) / float(sum(weights)) for w in weights]
        self.size = int(size)
        description = {"class": "BlendedDataset",
                       "datasets": list(descriptions) if descriptions else [len(d) for d in datasets],
                       "weights": self.weights, "size": self.size, "split": split_name}
        names = ("dataset_index", "dataset_sample_index")
        arrays = cached_arrays(
            cache_dir, f"BlendedDataset-{split_name}", description, names,
            lambda: dict(zip(names, build_blending_indices(self.weights, self.size))), barrier)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for j, dataset in enumerate(self.datasets):
            where = self.dataset_index == j
            if not where.any():
                continue
            needed = int(self.dataset_sample_index[where].max()) + 1
            if needed > len(dataset):
                raise ValueError(f"blend asks dataset {j} for {needed} samples but it holds {len(dataset)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        j = int(self.dataset_index[idx])
        sample = dict(self.datasets[j][int(self.dataset_sample_index[idx])])
        sample["dataset_id"] = np.int64(j)
        return sample
