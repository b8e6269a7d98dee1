"""Masked-LM data: FULL-SENTENCES packing, masking statistics and reproducibility."""
import numpy as np

from megatron_normformer.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_normformer.data.masked_lm_dataset import (
    IGNORE_INDEX,
    MaskedLMDataset,
    SpecialTokens,
    pack_full_sentences,
)

SPECIAL = SpecialTokens(cls=0, sep=1, pad=2, mask=3, vocab_size=500)


def corpus(prefix, num_docs=300, seed=0):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for _ in range(num_docs):
        for _ in range(int(rng.integers(1, 5))):
            builder.add_item(rng.integers(4, 500, int(rng.integers(3, 30))))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def test_packing_by_hand():
    lengths = np.array([3, 4, 2, 5, 9])
    docs = np.array([0, 2, 4, 5])  # doc0 = seq 0,1; doc1 = seq 2,3; doc2 = seq 4
    # capacity 10: [3+4] then doc boundary costs a <sep>: 7+1+2 = 10 fits, 5 does not
    assert pack_full_sentences(lengths, docs, 0, 3, 12).tolist() == [[0, 3], [3, 4], [4, 5]]


def test_packed_sample_layout(tmp_path):
    ds = corpus(str(tmp_path / "c"))
    mlm = MaskedLMDataset(ds, 0, ds.num_documents, 64, SPECIAL, seed=1)
    first, end = mlm.samples[0]
    tokens = mlm.packed_tokens(0)
    assert tokens[0] == SPECIAL.cls and tokens[-1] == SPECIAL.sep and len(tokens) <= 64
    boundaries = sum(1 for s in range(first + 1, end) if s in set(ds.document_indices.tolist()))
    assert len(tokens) == 2 + boundaries + sum(len(ds[s]) for s in range(first, end))
    # every sequence of the split is in exactly one sample, in order
    assert mlm.samples[0, 0] == 0 and mlm.samples[-1, 1] == len(ds)
    assert (mlm.samples[1:, 0] == mlm.samples[:-1, 1]).all()


def test_masking_statistics_and_reproducibility(tmp_path):
    ds = corpus(str(tmp_path / "c"))
    mlm = MaskedLMDataset(ds, 0, ds.num_documents, 64, SPECIAL, seed=3, num_samples=3000)
    candidates = chosen = masked = randomised = kept = 0
    for i in range(len(mlm)):
        s = mlm[i]
        real = s["padding_mask"] == 1
        assert (s["text"][~real] == SPECIAL.pad).all()
        picked = s["labels"] != IGNORE_INDEX
        assert (picked == (s["loss_mask"] == 1)).all()
        original = np.where(picked, s["labels"], s["text"])
        candidates += int((real & ~np.isin(original, [0, 1, 2, 3])).sum())
        chosen += int(picked.sum())
        masked += int((s["text"][picked] == SPECIAL.mask).sum())
        kept += int((s["text"][picked] == s["labels"][picked]).sum())
        randomised += int(((s["text"][picked] != SPECIAL.mask)
                           & (s["text"][picked] != s["labels"][picked])).sum())
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    assert abs(randomised / chosen - 0.1) < 0.01
    assert abs(kept / chosen - 0.1) < 0.01
    again = MaskedLMDataset(ds, 0, ds.num_documents, 64, SPECIAL, seed=3, num_samples=3000)
    for i in (0, 17, 2999):
        for key in ("text", "labels", "loss_mask", "padding_mask"):
            assert (again[i][key] == mlm[i][key]).all()
    # dynamic masking: the same packed sample in another epoch gets another mask
    per_epoch = mlm.samples_per_epoch
    p0 = int(np.flatnonzero(mlm._permutation(0) == 0)[0])
    p1 = int(np.flatnonzero(mlm._permutation(1) == 0)[0]) + per_epoch
    assert (mlm[p0]["labels"] != mlm[p1]["labels"]).any()
