"""GPT sample index: coverage, sample shape, determinism, caching, splits, builder."""
import os

import numpy as np
import pytest

from megatron_normformer.data import gpt_dataset
from megatron_normformer.data.builder import build_train_valid_test_datasets
from megatron_normformer.data.gpt_dataset import (
    GPTDataset,
    MockGPTDataset,
    build_gpt_indices,
    split_ranges,
)
from megatron_normformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

SEQ = 16


def make_corpus(prefix, num_docs=50, seed=0):
    """Documents whose tokens encode (document, position) so every token is identifiable."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    docs = []
    for d in range(num_docs):
        n = int(rng.integers(1, 40))
        tokens = d * 1000 + np.arange(n)
        docs.append(tokens)
        builder.add_item(tokens)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix), docs


def stream(ds):
    """Samples in unshuffled order, glued without their shared token."""
    parts = [ds.sample_tokens(0)]
    parts += [ds.sample_tokens(k)[1:] for k in range(1, len(ds))]
    return np.concatenate(parts)


def test_samples_walk_the_document_order(tmp_path):
    indexed, docs = make_corpus(str(tmp_path / "c"))
    tokens = sum(len(d) for d in docs)
    num_samples = 3 * tokens // SEQ + 1  # one sample more than 3 epochs hold: 4 epochs
    ds = GPTDataset(indexed, np.arange(50), num_samples, SEQ, seed=7, cache_dir=None)
    assert len(ds) >= num_samples
    epochs = len(ds.document_index) // 50
    assert epochs == 4
    # every document appears exactly once per epoch
    assert np.bincount(ds.document_index, minlength=50).tolist() == [epochs] * 50
    # the samples are the concatenation of the documents in document-index order
    order = np.concatenate([docs[d] for d in ds.document_index])
    glued = stream(ds)
    assert len(glued) == len(ds) * SEQ + 1
    assert (glued == order[: len(glued)]).all()
    for i in range(len(ds)):
        sample = ds[i]["text"]
        assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
    assert sorted(np.asarray(ds.shuffle_index).tolist()) == list(range(len(ds)))


def test_one_epoch_covers_every_token_once(tmp_path):
    indexed, docs = make_corpus(str(tmp_path / "c"))
    ds = GPTDataset(indexed, np.arange(10, 40), None, SEQ, seed=3)
    tokens = sum(len(docs[d]) for d in range(10, 40))
    assert sorted(ds.document_index.tolist()) == list(range(10, 40))
    glued = stream(ds)
    assert len(ds) == (tokens - 1) // SEQ
    assert len(glued) == tokens - (tokens - 1) % SEQ  # only the last partial sample is dropped
    # tokens within a document come in order: position increases by one inside each document
    same_doc = glued[1:] // 1000 == glued[:-1] // 1000
    assert (np.diff(glued)[same_doc] == 1).all()
    assert len(np.unique(glued)) == len(glued)


def test_separate_last_epoch():
    sizes = np.full(100, 10, dtype=np.int32)
    # 1000 tokens per epoch, 99 samples of 10 per epoch; 1.1 epochs -> the last one kept apart
    arrays = build_gpt_indices(sizes, np.arange(100, dtype=np.int32), 110, 10, seed=1)
    doc_index = arrays["document_index"]
    assert len(doc_index) == 200
    assert sorted(doc_index[100:].tolist()) == list(range(100))
    shuffle = arrays["shuffle_index"]
    first = (1000 - 1) // 10
    assert sorted(shuffle[:first].tolist()) == list(range(first))
    assert sorted(shuffle[first:].tolist()) == list(range(first, len(shuffle)))


def test_same_seed_same_order_other_seed_differs(tmp_path):
    indexed, _ = make_corpus(str(tmp_path / "c"))
    a = GPTDataset(indexed, np.arange(50), 100, SEQ, seed=5)
    b = GPTDataset(indexed, np.arange(50), 100, SEQ, seed=5)
    c = GPTDataset(indexed, np.arange(50), 100, SEQ, seed=6)
    assert all((a[i]["text"] == b[i]["text"]).all() for i in range(100))
    assert any((a[i]["text"] != c[i]["text"]).any() for i in range(100))


def test_cache_is_reused_not_rebuilt(tmp_path, monkeypatch):
    indexed, _ = make_corpus(str(tmp_path / "c"))
    cache = str(tmp_path / "cache")
    first = GPTDataset(indexed, np.arange(50), 200, SEQ, seed=1, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("index rebuilt despite a cache hit")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", fail)
    second = GPTDataset(indexed, np.arange(50), 200, SEQ, seed=1, cache_dir=cache)
    assert isinstance(second.sample_index, np.memmap)
    assert (np.asarray(second.shuffle_index) == np.asarray(first.shuffle_index)).all()
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    with pytest.raises(AssertionError, match="rebuilt"):  # other inputs -> other hash -> build
        GPTDataset(indexed, np.arange(50), 200, SEQ, seed=2, cache_dir=cache)


def test_split_ranges_follow_rounded_cumulative_fractions():
    assert split_ranges("969,30,1", 1000) == ((0, 969), (969, 999), (999, 1000))
    assert split_ranges("98,2", 50) == ((0, 49), (49, 50), None)
    assert split_ranges("1,1,1", 10) == ((0, 3), (3, 7), (7, 10))
    with pytest.raises(ValueError, match="--split"):
        split_ranges("a,b", 10)


def test_builder_single_prefix_and_mock(tmp_path):
    make_corpus(str(tmp_path / "c"), num_docs=100)
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "c")], "90,10,0", SEQ, 1234, [300, 20, 0]
    )
    assert test is None and len(train) >= 300 and len(valid) >= 20
    assert set(train.document_index.tolist()) == set(range(90))
    assert set(valid.document_index.tolist()) == set(range(90, 100))
    assert os.path.isdir(tmp_path / "cache")
    mock = build_train_valid_test_datasets(None, "1,0,0", SEQ, 1, [8, 0, 0], mock=True, vocab_size=50)
    assert mock[1] is None and len(mock[0]) == 8
    again = MockGPTDataset(8, SEQ, 50, seed=1)
    assert (mock[0][3]["text"] == again[3]["text"]).all() and mock[0][3]["text"].max() < 50
    with pytest.raises(FileNotFoundError, match="--data-path"):
        build_train_valid_test_datasets([str(tmp_path / "missing")], "1", SEQ, 1, [1, 0, 0])
