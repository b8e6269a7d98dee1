"""--split over sequences for GPT (documents for masked LM), on files written as Megatron-LM's
preprocessing writes them, and --train/valid/test-data-path."""
import numpy as np
import pytest

from megatron_normformer.data.builder import build_masked_lm_datasets, build_train_valid_test_datasets
from megatron_normformer.data.gpt_dataset import split_ranges
from megatron_normformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_normformer.data.masked_lm_dataset import SpecialTokens

SEQ = 16
EOD = 0


def megatron_file(prefix, num_docs, sentences, empty=(), seed=0):
    """A ``.bin/.idx`` pair laid out as Megatron's preprocess_data.py lays it out.

    Each document is ``sentences(rng)`` sentences (``--split-sentences`` when above 1) of 1-30
    tokens, EOD appended to its last sentence (``--append-eod``); a document in ``empty`` has no
    tokens and therefore no sequence (``add_document`` with no lengths). Token ``t`` of sequence
    ``s`` is ``s * 100 + t + 1``, so every token names its sequence.
    """
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    s = 0
    for d in range(num_docs):
        if d in empty:
            builder.add_document(np.zeros(0, np.int32), [])
            continue
        lengths, tokens = [], []
        for k in range(sentences(rng)):
            n = int(rng.integers(1, 31))
            sentence = list(s * 100 + 1 + np.arange(n))
            s += 1
            tokens.append(sentence)
            lengths.append(n)
        tokens[-1].append(EOD)
        lengths[-1] += 1
        builder.add_document(np.concatenate(tokens), lengths)
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def reference_indices(sizes, sequences, num_samples, seq_length, seed):
    """Megatron-LM GPTDataset's three index arrays, from its documented steps, loop by loop.

    Epochs until ``num_samples * seq_length + 1`` tokens are covered; the sequence ids tiled per
    epoch and shuffled by ``RandomState(seed)`` (the last epoch on its own when it gives fewer
    than 80 % of an epoch's samples); the sample index walks the shuffled stream taking
    ``seq_length + 1`` tokens per sample with one shared; the shuffle index permutes the samples
    (the last epoch's apart).
    """
    tokens = int(sum(int(sizes[i]) for i in sequences))
    epochs = 1
    while num_samples is not None and epochs * tokens < num_samples * seq_length + 1:
        epochs += 1
    separate = False
    if epochs > 1:
        before = ((epochs - 1) * tokens - 1) // seq_length
        separate = num_samples - before < int(0.8 * ((tokens - 1) // seq_length))
    rs = np.random.RandomState(seed)

    def tiled(k):
        ids = np.array(list(sequences) * k, dtype=np.int32)
        rs.shuffle(ids)
        return ids

    order = np.concatenate([tiled(epochs - 1), tiled(1)]) if separate else tiled(epochs)
    count = (epochs * tokens - 1) // seq_length
    starts = [(0, 0)]
    pos, offset = 0, 0
    while len(starts) <= count:
        remaining = seq_length + 1
        while True:
            left = int(sizes[order[pos]]) - offset
            remaining -= left
            if remaining <= 0:
                offset += remaining + left - 1
                break
            pos, offset = pos + 1, 0
        starts.append((pos, offset))
    first = before if separate else count
    shuffle_a = np.arange(first, dtype=np.uint32)
    rs.shuffle(shuffle_a)
    shuffle_b = np.arange(first, count, dtype=np.uint32)
    if len(shuffle_b):
        rs.shuffle(shuffle_b)
    return order, np.array(starts), np.concatenate([shuffle_a, shuffle_b])


def assert_megatron_order(ds, indexed, sequences, num_samples, seed):
    order, starts, shuffle = reference_indices(indexed.sequence_lengths, sequences, num_samples,
                                               SEQ, seed)
    assert np.array_equal(ds.document_index, order)
    assert np.array_equal(ds.sample_index, starts)
    assert np.array_equal(ds.shuffle_index, shuffle)
    stream = np.concatenate([indexed[int(i)] for i in order])
    for i in range(len(ds)):  # sample i: the shuffled window of the stream
        k = int(shuffle[i])
        assert np.array_equal(ds[i]["text"], stream[k * SEQ:(k + 1) * SEQ + 1])


def test_empty_documents_split_over_sequences(tmp_path):
    empty = set(range(3, 100, 10))
    indexed = megatron_file(str(tmp_path / "d"), 100, lambda rng: 1, empty)
    assert indexed.num_documents == 100 and len(indexed) == 90
    bounds = split_ranges("80,10,10", 90)
    assert bounds == ((0, 72), (72, 81), (81, 90))
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "d")], "80,10,10", SEQ, 1234, [400, 30, None])
    for ds, (lo, hi), n in zip((train, valid, test), bounds, (400, 30, None)):
        assert sorted(set(ds.document_index.tolist())) == list(range(lo, hi))
        assert_megatron_order(ds, indexed, range(lo, hi), n, 1234)
    # one epoch of the test split is every token of its sequences, each once
    tokens = np.concatenate([test[i]["text"][1:] for i in range(len(test))])
    wanted = np.concatenate([indexed[s] for s in range(81, 90)])
    assert len(tokens) == len(wanted) - 1 - (len(wanted) - 1) % SEQ


def test_sentence_level_file_trains_on_every_sentence(tmp_path):
    indexed = megatron_file(str(tmp_path / "s"), 300, lambda rng: int(rng.integers(1, 4)))
    n = len(indexed)
    assert n > 1.5 * indexed.num_documents
    train, valid, test = build_train_valid_test_datasets(
        [str(tmp_path / "s")], "90,8,2", SEQ, 7, [None, None, None])
    bounds = split_ranges("90,8,2", n)
    assert bounds[2][1] == n  # the splits reach the last sentence, not the document count
    covered = []
    for ds, (lo, hi) in zip((train, valid, test), bounds):
        assert_megatron_order(ds, indexed, range(lo, hi), None, 7)
        seen = np.unique(np.concatenate([ds[i]["text"] for i in range(len(ds))]))
        covered.append(np.unique(seen[seen != EOD] // 100))
    # every sentence is read (the last, partial sample of each split aside)
    assert len(np.concatenate(covered)) >= n - 3


def test_masked_lm_still_splits_documents(tmp_path):
    indexed = megatron_file(str(tmp_path / "m"), 60, lambda rng: 3)
    special = SpecialTokens(cls=1, sep=2, pad=3, mask=4, vocab_size=20000)
    train, valid, _ = build_masked_lm_datasets(
        [str(tmp_path / "m")], "50,10,0", 64, 1, [None, None, 0], special=special)
    assert train.description["documents"] == [0, 50] and valid.description["documents"] == [50, 60]
    assert len(indexed) == 180  # over sequences the ranges would have been 0-150 and 150-180


def test_per_split_data_paths(tmp_path):
    a = megatron_file(str(tmp_path / "a"), 40, lambda rng: 2, seed=1)
    megatron_file(str(tmp_path / "b"), 40, lambda rng: 1, seed=2)
    megatron_file(str(tmp_path / "v"), 20, lambda rng: 1, seed=3)
    pa, pb, pv = (str(tmp_path / x) for x in "abv")
    train, valid, test = build_train_valid_test_datasets(
        None, "969,30,1", SEQ, 5, [300, None, 10],
        per_split_paths=[["0.25", pa, "0.75", pb], [pv], None])
    assert test is None
    # train: a weighted blend of two whole files; valid: one epoch of the whole third file
    assert len(train) == 300
    source = np.array([train[i]["dataset_id"] for i in range(300)])
    assert (source == 0).sum() == 75
    member_a = train.datasets[0]
    assert sorted(set(member_a.document_index.tolist())) == list(range(len(a)))
    assert_megatron_order(member_a, a, range(len(a)), 76, 5)  # ceil(ceil(300 * .25) * 1.005)
    v = IndexedDataset(pv)
    assert sorted(set(valid.document_index.tolist())) == list(range(len(v)))
    assert len(valid) == (int(v.sequence_lengths.sum()) - 1) // SEQ
    # the same data through --data-path with a split giving all of it to train: same samples
    whole, _, _ = build_train_valid_test_datasets([pv], "1,0,0", SEQ, 5, [None, 0, 0])
    assert np.array_equal(whole.document_index, valid.document_index)
    assert np.array_equal(whole.shuffle_index, valid.shuffle_index)

    with pytest.raises(ValueError, match="mutually exclusive"):
        build_train_valid_test_datasets([pa], "1", SEQ, 5, [1, 0, 0], per_split_paths=[[pb], None, None])
    with pytest.raises(FileNotFoundError, match="--valid-data-path"):
        build_train_valid_test_datasets(None, "1", SEQ, 5, [1, 1, 0],
                                        per_split_paths=[[pa], [str(tmp_path / "nope")], None])
    with pytest.raises(ValueError, match="--train-data-path"):
        build_train_valid_test_datasets(None, "1", SEQ, 5, [1, 1, 0],
                                        per_split_paths=[["0.5", pa, pb], None, None])


def test_training_with_per_split_paths(tmp_path):
    """--train-data-path P trains on exactly what --data-path P --split 1,0,0 does; the
    validation set comes from --valid-data-path; giving both kinds of flag is refused."""
    from megatron_normformer.config import ConfigError
    from megatron_normformer.testing import spawn
    from megatron_normformer.training.pretrain import train_from_argv
    from train_utils import flags, make_null_dataset, train_many

    prefix = make_null_dataset(str(tmp_path), docs=120)
    common = dict(train_iters=3, global_batch_size=4, micro_batch_size=4, tokenizer_type="NullTokenizer")
    split, own = spawn(train_many, 1, [
        flags(f"--data-path {prefix} --split 1,0,0", **common),
        flags(f"--train-data-path {prefix} --valid-data-path {prefix}", eval_interval=3,
              **dict(common, eval_iters=1)),
    ])[0]
    assert own["losses"] == split["losses"] and len(split["losses"]) == 3
    assert own["val"] and not split["val"]
    with pytest.raises(ConfigError, match="mutually exclusive"):
        train_from_argv(flags(f"--data-path {prefix} --train-data-path {prefix}", **common))
