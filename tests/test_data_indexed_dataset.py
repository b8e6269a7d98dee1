"""MMIDIDX reader/builder: round trip, exact bytes, damaged files, merging."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_normformer.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    optimal_dtype,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [[[5, 6, 7], [8]], [[9, 10]], [[11], [12, 13, 14, 15]]]  # documents of sequences


def write(prefix, docs=DOCS, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(np.array(seq))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_round_trip_and_slices(tmp_path):
    ds = IndexedDataset(write(str(tmp_path / "d")))
    flat = [s for d in DOCS for s in d]
    assert len(ds) == 5 and ds.num_documents == 3
    assert [ds[i].tolist() for i in range(5)] == flat
    assert ds.get(4, offset=1, length=2).tolist() == [13, 14]
    assert ds.get(0, offset=1).tolist() == [6, 7]
    assert ds.sequence_lengths.tolist() == [3, 1, 2, 1, 4]
    assert ds.document_indices.tolist() == [0, 2, 3, 5]
    assert ds.dtype == np.uint16
    with pytest.raises(IndexError):
        ds.get(4, offset=3, length=2)


def test_contiguous_slices(tmp_path):
    ds = IndexedDataset(write(str(tmp_path / "d")))
    flat = [s for d in DOCS for s in d]
    for window in (slice(1, 4), slice(None), slice(-2, None), slice(3, 3), slice(2, 99),
                   slice(np.int64(0), np.int64(2))):
        got = ds[window]
        assert [a.tolist() for a in got] == flat[window]
        assert all(a.dtype == np.uint16 for a in got)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:4:2]
    with pytest.raises(TypeError, match="integers or slices"):
        ds[[0, 1]]


def test_idx_bytes_match_hand_built(tmp_path):
    prefix = write(str(tmp_path / "d"))
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 5)
        + struct.pack("<Q", 4)
        + struct.pack("<5i", 3, 1, 2, 1, 4)
        + struct.pack("<5q", 0, 6, 8, 12, 14)  # byte pointers: 2 bytes per token
        + struct.pack("<4q", 0, 2, 3, 5)
    )
    assert open(prefix + ".idx", "rb").read() == expected
    assert open(prefix + ".bin", "rb").read() == struct.pack("<11H", *range(5, 16))


def test_dtype_choice():
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(None) == np.int32


def _damage(prefix, ext, mutate):
    path = prefix + ext
    data = bytearray(open(path, "rb").read())
    open(path, "wb").write(bytes(mutate(data)))


def _set(offset, value):
    def mutate(data):
        data[offset : offset + len(value)] = value
        return data
    return mutate


@pytest.mark.parametrize(
    "ext, mutate, fault",
    [
        (".idx", _set(0, b"XXIDIDX"), "bad magic"),
        (".idx", _set(9, struct.pack("<Q", 2)), "unsupported index version 2"),
        (".idx", _set(17, b"\x09"), "unknown dtype code 9"),
        (".idx", lambda d: d[:-3], "truncated index"),
        (".idx", lambda d: d[:20], "truncated index"),
        (".bin", lambda d: d[:-2], "shorter than"),
        (".bin", lambda d: d + b"\x00", "23 bytes, not a multiple of the 2-byte uint16 tokens"),
    ],
)
def test_damaged_files_raise_clear_errors(tmp_path, ext, mutate, fault):
    prefix = write(str(tmp_path / "d"))
    _damage(prefix, ext, mutate)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    assert fault in str(info.value)
    assert prefix + ext in str(info.value)
    assert isinstance(info.value, ValueError)


# Offsets into the .idx of DOCS: header 34 bytes, 5 int32 sizes, 5 int64 pointers, 4 int64 doc entries.
SIZES, POINTERS, DOCUMENTS = 34, 34 + 4 * 5, 34 + 12 * 5


@pytest.mark.parametrize(
    "mutate, fault",
    [
        # sizes 3 1 2 1 4, pointers 0 6 8 12 14 (uint16), documents 0 2 3 5
        (_set(SIZES + 4 * 2, struct.pack("<i", 3)),
         "sequence 3 has pointer 12, but sequence 2 (pointer 8, size 3 tokens of 2 bytes) ends at 14"),
        (_set(SIZES + 4 * 4, struct.pack("<i", 3)), "token file is 22 bytes, longer than the 20 bytes"),
        (_set(SIZES + 4 * 4, struct.pack("<i", 5)), "token file is 22 bytes, shorter than the 24 bytes"),
        (_set(SIZES + 4 * 1, struct.pack("<i", -1)), "sequence 1 has negative size -1"),
        (_set(POINTERS + 8 * 3, struct.pack("<q", 10)),
         "sequence 3 has pointer 10, but sequence 2 (pointer 8, size 2 tokens of 2 bytes) ends at 12"),
        (_set(POINTERS, struct.pack("<q", 2)), "sequence 0 has pointer 2, expected 0"),
        (_set(DOCUMENTS, struct.pack("<q", 1)), "document index entry 0 is 1, expected 0"),
        (_set(DOCUMENTS + 8 * 2, struct.pack("<q", 1)),
         "document index entry 2 is 1, smaller than entry 1 (2): it must not decrease"),
        (_set(DOCUMENTS + 8 * 3, struct.pack("<q", 6)), "document index entry 3 is 6, outside the 5 sequences"),
    ],
    ids=["size-inside", "last-size-short", "last-size-long", "size-negative", "pointer",
         "first-pointer", "first-document", "document-decreases", "document-beyond"],
)
def test_corrupt_index_entries_are_named_at_open(tmp_path, mutate, fault):
    prefix = write(str(tmp_path / "d"))
    _damage(prefix, ".idx", mutate)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    assert fault in str(info.value)
    assert (prefix + ".idx" if "token file" not in fault else prefix + ".bin") in str(info.value)


def test_entries_are_checked_across_chunks(tmp_path, monkeypatch):
    import megatron_normformer.data.indexed_dataset as indexed

    monkeypatch.setattr(indexed, "_CHUNK", 2)  # the 5 sequences in 3 chunks, the 4 entries in 2
    prefix = write(str(tmp_path / "d"))
    assert len(IndexedDataset(prefix)) == 5
    for mutate, fault in ((_set(POINTERS + 8 * 2, struct.pack("<q", 9)), "sequence 2 has pointer 9"),
                          (_set(DOCUMENTS + 8 * 2, struct.pack("<q", 6)), "entry 2 is 6, outside"),
                          (_set(DOCUMENTS + 8 * 2, struct.pack("<q", 1)), "entry 2 is 1, smaller")):
        write(prefix)
        _damage(prefix, ".idx", mutate)
        with pytest.raises(IndexedDatasetError, match=fault):
            IndexedDataset(prefix)


def test_unfinished_last_document_is_accepted(tmp_path):
    # Megatron's builder leaves sequences after the last end_document outside every document.
    prefix = write(str(tmp_path / "d"))
    _damage(prefix, ".idx", lambda d: d[:-8])
    _damage(prefix, ".idx", _set(26, struct.pack("<Q", 3)))
    assert IndexedDataset(prefix).document_indices.tolist() == [0, 2, 3]


def test_merge_tool(tmp_path):
    os.makedirs(tmp_path / "shards")
    a = write(str(tmp_path / "shards" / "a"))
    b = write(str(tmp_path / "shards" / "b"), docs=[[[1, 2]], [[3]]])
    out = str(tmp_path / "merged")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/merge_datasets.py"), "--input",
                    str(tmp_path / "shards"), "--output-prefix", out], check=True, capture_output=True)
    merged = IndexedDataset(out)
    assert [merged[i].tolist() for i in range(len(merged))] == [[5, 6, 7], [8], [9, 10], [11],
                                                                  [12, 13, 14, 15], [1, 2], [3]]
    assert merged.document_indices.tolist() == [0, 2, 3, 5, 6, 7]
    # Merging a list of prefixes in the given order gives the same bytes as a directory sorted by name.
    out2 = str(tmp_path / "merged2")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/merge_datasets.py"), "--input", a, b,
                    "--output-prefix", out2], check=True, capture_output=True)
    for ext in (".bin", ".idx"):
        assert open(out + ext, "rb").read() == open(out2 + ext, "rb").read()


def test_merge_refuses_an_idx_without_its_bin(tmp_path):
    os.makedirs(tmp_path / "shards")
    write(str(tmp_path / "shards" / "a"))
    b = write(str(tmp_path / "shards" / "b"))
    os.remove(b + ".bin")
    out = str(tmp_path / "merged")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools/merge_datasets.py"), "--input",
                           str(tmp_path / "shards"), "--output-prefix", out],
                          capture_output=True, text=True)
    assert done.returncode == 1 and f"{b}.idx has no {b}.bin" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(out + ".bin")
