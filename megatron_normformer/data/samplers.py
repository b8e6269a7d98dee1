"""Data-parallel batch sampling that resumes exactly where a run stopped.

The global batch (``micro_batch_size * data_parallel_size`` consecutive sample ids) is laid out
contiguously and rank r takes the r-th slice of ``micro_batch_size`` ids, as in Megatron-LM. The
sampler starts at ``consumed_samples``, so a resumed run sees exactly the samples it has not seen.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch


class MegatronPretrainingSampler:
    """Yields this rank's micro-batches of sample ids from ``consumed_samples`` to ``total_samples``."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to consume: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} outside "
                             f"[0, total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Number of micro-batches this sampler yields."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.global_micro
        if self.drop_last or remaining % self.global_micro == 0:
            return full
        start = self.data_parallel_rank * self.micro_batch_size
        return full + int(remaining % self.global_micro > start)

    def _slice(self, batch: List[int]) -> List[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        for begin in range(self.consumed_samples, self.total_samples, self.global_micro):
            batch = list(range(begin, min(begin + self.global_micro, self.total_samples)))
            if len(batch) == self.global_micro:
                yield self._slice(batch)
            elif not self.drop_last and self._slice(batch):
                yield self._slice(batch)


def collate_samples(samples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a dict of tensors (numpy int64 -> torch.int64)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    return {key: torch.from_numpy(np.stack([np.asarray(s[key]) for s in samples])) for key in samples[0]}
