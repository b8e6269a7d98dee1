"""Blending: --data-path parsing, weights honoured, builder with two prefixes."""
import numpy as np
import pytest

from megatron_normformer.data.blended_dataset import build_blending_indices, parse_data_path
from megatron_normformer.data.builder import build_train_valid_test_datasets
from megatron_normformer.data.indexed_dataset import IndexedDatasetBuilder


def test_parse_data_path_both_forms():
    assert parse_data_path(["A", "B"]) == (None, ["A", "B"])
    weights, prefixes = parse_data_path(["30", "A", "70", "B"])
    assert prefixes == ["A", "B"] and weights == pytest.approx([0.3, 0.7])
    for bad in (["0.3", "A", "B"], ["0.3", "A", "0.7"], ["A", "0.3"], []):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)
    with pytest.raises(ValueError, match="weights"):
        parse_data_path(["0", "A", "0", "B"])


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.3, 0.5], [0.05, 0.15, 0.3, 0.5]])
def test_blend_follows_weights(weights):
    choice, sample = build_blending_indices(weights, 10_000)
    fractions = np.bincount(choice, minlength=len(weights)) / 10_000
    assert np.abs(fractions - weights).max() < 0.01 * max(weights)
    # every prefix stays within one sample of its target
    counts = np.stack([np.cumsum(choice == j) for j in range(len(weights))], axis=1)
    targets = np.arange(1, 10_001)[:, None] * np.array(weights)[None, :]
    assert np.abs(counts - targets).max() <= 1.0
    for j in range(len(weights)):  # each dataset is read in order 0, 1, 2, ...
        assert (sample[choice == j] == np.arange((choice == j).sum())).all()


def _corpus(prefix, first_token, num_docs=40):
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in range(num_docs):
        builder.add_item(np.full(20, first_token + d))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_builder_blends_two_prefixes(tmp_path):
    _corpus(str(tmp_path / "a"), 100)
    _corpus(str(tmp_path / "b"), 1000)
    train, valid, test = build_train_valid_test_datasets(
        ["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")], "1,0,0", 8, 1, [2000, 0, 0]
    )
    assert valid is None and test is None and len(train) == 2000
    source = np.array([train[i]["dataset_id"] for i in range(2000)])
    assert abs((source == 0).mean() - 0.3) < 0.01
    tokens = np.stack([train[i]["text"] for i in range(2000)])
    assert ((tokens < 1000) == (source == 0)[:, None]).all()  # samples come from their dataset
    # Without weights the datasets are blended by size: equal sizes -> half each.
    train, _, _ = build_train_valid_test_datasets(
        [str(tmp_path / "a"), str(tmp_path / "b")], "1,0,0", 8, 1, [100, 0, 0]
    )
    source = np.array([train[i]["dataset_id"] for i in range(100)])
    assert (source == 0).sum() == 50


def test_masked_lm_blends_like_gpt(tmp_path):
    from megatron_normformer.data.builder import build_masked_lm_datasets
    from megatron_normformer.data.masked_lm_dataset import IGNORE_INDEX, SpecialTokens

    special = SpecialTokens(cls=0, sep=1, pad=2, mask=3, vocab_size=1100)
    _corpus(str(tmp_path / "a"), 100)
    _corpus(str(tmp_path / "b"), 1000)
    paths = ["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")]
    train, valid, test = build_masked_lm_datasets(paths, "1,0,0", 32, 1, [1000, 0, 0], special=special)
    assert valid is None and test is None and len(train) == 1000
    source = np.array([train[i]["dataset_id"] for i in range(1000)])
    assert abs((source == 0).mean() - 0.3) < 0.01
    for i in range(0, 1000, 7):  # the unmasked originals come from the sample's own dataset
        s = train[i]
        original = np.where(s["labels"] != IGNORE_INDEX, s["labels"], s["text"])
        words = original[original > 3]
        assert len(words) and ((words < 1000) == (source[i] == 0)).all()
    again, _, _ = build_masked_lm_datasets(paths, "1,0,0", 32, 1, [1000, 0, 0], special=special)
    for i in (0, 1, 500, 999):  # the same samples and masks from the cached indices
        assert all((train[i][k] == again[i][k]).all() for k in train[i])
