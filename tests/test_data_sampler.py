"""Data-parallel sampler: global-batch layout and exact resume; collation."""
import numpy as np
import pytest
import torch

from megatron_normformer.data.samplers import MegatronPretrainingSampler, collate_samples


def batches(total, consumed, micro, dp):
    return [list(MegatronPretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]


def test_global_batches_are_contiguous_slices():
    per_rank = batches(20, 0, 2, 3)
    assert per_rank[0][:2] == [[0, 1], [6, 7]]
    assert per_rank[1][:2] == [[2, 3], [8, 9]]
    assert per_rank[2][:2] == [[4, 5], [10, 11]]
    assert [len(b) for b in per_rank] == [3, 3, 3]  # 18 of 20 samples; the partial batch is dropped
    assert len(MegatronPretrainingSampler(20, 0, 2, 0, 3)) == 3


def test_resume_sees_exactly_the_unseen_samples():
    full = batches(100, 0, 2, 2)
    steps_done = 7
    consumed = steps_done * 2 * 2
    resumed = batches(100, consumed, 2, 2)
    for rank in range(2):
        assert resumed[rank] == full[rank][steps_done:]
    seen = {i for r in range(2) for b in full[r][:steps_done] for i in b}
    rest = {i for r in range(2) for b in resumed[r] for i in b}
    assert seen.isdisjoint(rest) and seen | rest == set(range(100))


def test_bad_arguments_and_collate():
    with pytest.raises(ValueError, match="consumed_samples"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
    batch = collate_samples([{"text": np.arange(3)}, {"text": np.arange(3, 6)}])
    assert batch["text"].dtype == torch.int64
    assert batch["text"].tolist() == [[0, 1, 2], [3, 4, 5]]
