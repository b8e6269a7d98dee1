"""Memory-mapped token datasets in the MMIDIDX ``.bin``/``.idx`` format.

The format is byte-compatible with Megatron-LM (``docs/data.md`` has the byte layout):

``PREFIX.idx`` (little-endian, no padding)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version = 1
    uint8     dtype code of the tokens (see ``DTYPE_CODES``)
    uint64    N, the number of sequences
    uint64    D, the number of documents + 1
    int32[N]  sequence lengths (in tokens)
    int64[N]  byte offset of each sequence in the .bin
    int64[D]  document index: 0, then the sequence index that ends each document (last = N)

``PREFIX.bin`` holds the tokens of all sequences back to back.

``IndexedDataset`` reads a pair with ``np.memmap`` (O(1) access to any sequence or a slice of one)
after checking every index entry against the others and the ``.bin`` size; ``IndexedDatasetBuilder``
writes one. A damaged pair raises ``IndexedDatasetError`` naming the file and the first bad entry.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Any, Iterable, List, Optional, Union

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_CHUNK = 1 << 20  # index entries validated at a time (bounds the temporary arrays to ~8 MB each)


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that cannot be read; the message names the file and the fault."""


def idx_path(prefix: str) -> str:
    """Path of the index file of a dataset prefix."""
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    """Path of the token file of a dataset prefix."""
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    """Whether both files of a dataset prefix exist."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Token dtype for a vocabulary: uint16 below 65,500 entries, else int32 (as Megatron)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def dtype_code(dtype: Any) -> int:
    """The MMIDIDX code of a numpy dtype."""
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no MMIDIDX code") from None


def encode_index(
    dtype: Any, sequence_lengths: np.ndarray, document_indices: np.ndarray
) -> bytes:
    """The bytes of an ``.idx`` file for the given sequence lengths and document index."""
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    header = MAGIC + struct.pack("<QBQQ", VERSION, dtype_code(dtype), len(lengths), len(docs))
    return b"".join(
        [
            header,
            lengths.astype("<i4").tobytes(),
            pointers.astype("<i8").tobytes(),
            docs.astype("<i8").tobytes(),
        ]
    )


class _Index:
    """The parsed ``.idx`` file; arrays are views into a read-only memory map.

    ``validate`` checks every entry (vectorised, in chunks of ``_CHUNK``): about 0.1 s per
    million sequences (``docs/data.md``). A corrupt entry raises ``IndexedDatasetError`` naming the
    file and the first bad entry, where it would otherwise surface much later, far from the file.
    """

    def __init__(self, path: str, validate: bool = True) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise IndexedDatasetError(f"{path}: index file not found")
        size = os.path.getsize(path)
        if size < HEADER_SIZE:
            raise IndexedDatasetError(
                f"{path}: truncated index: {size} bytes, the header alone is {HEADER_SIZE}")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[: len(MAGIC)]
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{path}: bad magic {magic!r}, expected {MAGIC!r}: not an MMIDIDX index")
        version, code, n, d = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise IndexedDatasetError(f"{path}: unsupported index version {version}, expected 1")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 12 * n + 8 * d
        if size < expected:
            raise IndexedDatasetError(
                f"{path}: truncated index: {size} bytes, the header announces {n} sequences "
                f"and {d - 1} documents, which need {expected} bytes")
        if size > expected:
            raise IndexedDatasetError(
                f"{path}: {size - expected} unexpected trailing bytes after the document index "
                "(multimodal indices are not supported)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count = int(n)
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = buf
        self.sequence_lengths = buf[HEADER_SIZE : HEADER_SIZE + 4 * n].view("<i4")
        self.sequence_pointers = buf[HEADER_SIZE + 4 * n : HEADER_SIZE + 12 * n].view("<i8")
        self.document_indices = buf[HEADER_SIZE + 12 * n : expected].view("<i8")
        if validate:
            self._check_sequences()
            self._check_documents()

    def _corrupt(self, what: str) -> IndexedDatasetError:
        return IndexedDatasetError(f"{self.path}: corrupt index: {what}")

    def _check_sequences(self) -> None:
        """Sizes non-negative and each pointer the previous one plus its size in bytes (so every
        sequence lies in the ``.bin`` once the last one ends at its size), chunk by chunk."""
        n, itemsize = self.sequence_count, self.dtype.itemsize
        sizes, pointers = self.sequence_lengths, self.sequence_pointers
        if n and pointers[0] != 0:
            raise self._corrupt(f"sequence 0 has pointer {int(pointers[0])}, expected 0")
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            chunk = sizes[start:stop]
            negative = np.flatnonzero(chunk < 0)
            if len(negative):
                i = start + int(negative[0])
                raise self._corrupt(f"sequence {i} has negative size {int(sizes[i])}")
            ends = pointers[start:stop] + chunk.astype(np.int64) * itemsize
            following = pointers[start + 1 : stop + 1]
            wrong = np.flatnonzero(ends[: len(following)] != following)
            if len(wrong):
                i = start + int(wrong[0])
                raise self._corrupt(
                    f"sequence {i + 1} has pointer {int(pointers[i + 1])}, but sequence {i} "
                    f"(pointer {int(pointers[i])}, size {int(sizes[i])} tokens of {itemsize} "
                    f"bytes) ends at {int(ends[i - start])}")

    def _check_documents(self) -> None:
        """The document index starts at 0, stays within [0, N] and never decreases. Its last entry
        may be below N: Megatron's builder leaves sequences after the last ``end_document`` out of
        every document."""
        n, docs = self.sequence_count, self.document_indices
        if len(docs) == 0 or docs[0] != 0:
            first = "missing" if len(docs) == 0 else int(docs[0])
            raise self._corrupt(f"document index entry 0 is {first}, expected 0")
        for start in range(0, len(docs), _CHUNK):
            chunk = docs[start : start + _CHUNK]
            outside = np.flatnonzero((chunk < 0) | (chunk > n))
            if len(outside):
                i = start + int(outside[0])
                raise self._corrupt(f"document index entry {i} is {int(docs[i])}, outside the "
                                    f"{n} sequences")
            following = docs[start + 1 : start + 1 + len(chunk)]
            falls = np.flatnonzero(following < chunk[: len(following)])
            if len(falls):
                i = start + int(falls[0]) + 1
                raise self._corrupt(f"document index entry {i} is {int(docs[i])}, smaller than "
                                    f"entry {i - 1} ({int(docs[i - 1])}): it must not decrease")


class IndexedDataset:
    """Read-only view of a ``PREFIX.bin``/``PREFIX.idx`` pair.

    ``ds[i]`` is sequence i as a numpy array (a view into the memory map), ``ds[a:b]`` the list of
    sequences a to b (contiguous slices only, as Megatron-LM); ``ds.get(i, offset, length)`` a
    slice of one sequence. Pickles by path, so DataLoader workers reopen the files.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open(validate=True)

    def _open(self, validate: bool) -> None:
        self._index = _Index(idx_path(self.prefix), validate)
        path = bin_path(self.prefix)
        if not os.path.isfile(path):
            raise IndexedDatasetError(f"{path}: token file not found")
        size = os.path.getsize(path)
        need = self._needed_bin_bytes()
        if size < need:
            raise IndexedDatasetError(
                f"{path}: token file is {size} bytes, shorter than the {need} bytes "
                f"its index {idx_path(self.prefix)} describes")
        itemsize = self._index.dtype.itemsize
        if size % itemsize:
            raise IndexedDatasetError(
                f"{path}: token file is {size} bytes, not a multiple of the {itemsize}-byte "
                f"{self._index.dtype} tokens its index {idx_path(self.prefix)} announces")
        if size > need:
            raise IndexedDatasetError(
                f"{path}: token file is {size} bytes, longer than the {need} bytes its index "
                f"{idx_path(self.prefix)} describes (an index of another token file?)")
        if size == 0:
            self._bin = np.zeros(0, dtype=self._index.dtype)
        else:
            self._bin = np.memmap(path, dtype=self._index.dtype, mode="r")

    def _needed_bin_bytes(self) -> int:
        """Where the last sequence ends: with a validated index, every sequence lies before it."""
        index = self._index
        if index.sequence_count == 0:
            return 0
        last = index.sequence_count - 1
        ptr = int(index.sequence_pointers[last])
        return ptr + int(index.sequence_lengths[last]) * index.dtype.itemsize

    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        # A copy of a dataset validated when it was opened (a DataLoader worker's): no second pass.
        self.prefix = prefix
        self._open(validate=False)

    def __len__(self) -> int:
        return self._index.sequence_count

    def __getitem__(self, idx: Union[int, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(idx, slice):
            return self._sequences(idx)
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(
                f"IndexedDataset indices must be integers or slices, got {type(idx).__name__}")
        return self.get(int(idx))

    def _sequences(self, window: slice) -> List[np.ndarray]:
        """Sequences ``window.start`` to ``window.stop`` (step 1) as a list of views."""
        start, stop, step = window.indices(len(self))
        if step != 1:
            raise ValueError(f"{self.prefix}: slices of an IndexedDataset must be contiguous "
                             f"(step 1), got step {step}")
        if stop <= start:
            return []
        itemsize = self._index.dtype.itemsize
        first = int(self._index.sequence_pointers[start]) // itemsize
        lengths = np.asarray(self._index.sequence_lengths[start:stop], dtype=np.int64)
        tokens = self._bin[first : first + int(lengths.sum())]
        return np.split(tokens, np.cumsum(lengths[:-1]))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``idx`` (to its end if length is None)."""
        n = self._index.sequence_count
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {n} sequences in {self.prefix}")
        seq_len = int(self._index.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"slice offset={offset} length={length} out of range for sequence {idx} "
                             f"of length {seq_len} in {self.prefix}")
        start = int(self._index.sequence_pointers[idx]) // self._index.dtype.itemsize + offset
        return self._bin[start : start + length]

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the ``.bin`` file."""
        return self._index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 length of every sequence."""
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the ``.bin``."""
        return self._index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 document boundaries: 0, then the sequence index that ends each document."""
        return self._index.document_indices

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self._index.document_indices) - 1


class IndexedDatasetBuilder:
    """Writes a ``.bin`` as sequences arrive and the matching ``.idx`` on ``finalize``.

    Call ``add_item`` per sequence and ``end_document`` after the last sequence of each document
    (or ``add_document`` for both at once).
    """

    def __init__(self, bin_file: str, dtype: Any = np.int32) -> None:
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject dtypes the format cannot name
        self.bin_file = bin_file
        self._data = open(bin_file, "wb")
        self._lengths: List[int] = []
        self._documents: List[int] = [0]

    def add_item(self, tokens: Union[np.ndarray, Iterable[int], Any]) -> None:
        """Append one sequence (a numpy array, list or torch tensor of token ids)."""
        if hasattr(tokens, "numpy"):
            tokens = tokens.numpy()
        array = np.asarray(tokens, dtype=self.dtype)
        self._data.write(array.tobytes(order="C"))
        self._lengths.append(int(array.size))

    def end_document(self) -> None:
        """Mark the sequences added since the previous call as one document."""
        self._documents.append(len(self._lengths))

    def add_document(self, tokens: Any, lengths: Iterable[int]) -> None:
        """Append one document made of consecutive sequences of the given ``lengths``."""
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(f"lengths sum to {sum(lengths)} but the document has {array.size} tokens")
        self._data.write(array.tobytes(order="C"))
        self._lengths.extend(lengths)
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append a whole existing dataset (same dtype) after the documents written so far."""
        other = _Index(idx_path(other_prefix))
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{idx_path(other_prefix)}: dtype {other.dtype} differs from the output's {self.dtype}")
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._documents.extend((other.document_indices[1:] + offset).tolist())
        with open(bin_path(other_prefix), "rb") as f:
            shutil.copyfileobj(f, self._data)

    def finalize(self, idx_file: str) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self._data.close()
        if self._documents[-1] != len(self._lengths):
            self.end_document()  # sequences after the last end_document form a final document
        with open(idx_file, "wb") as f:
            f.write(encode_index(self.dtype, np.asarray(self._lengths), np.asarray(self._documents)))
