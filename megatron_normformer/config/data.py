"""Where the data comes from and how it is tokenized and split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

DATA_IMPLS = ("mmap", "infer", "lazy", "cached")
TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HFTokenizer", "NullTokenizer")
MASKING_PROB = 0.15  # RoBERTa's: the fraction of a masked-LM sample's positions that are predicted


@dataclass
class DataConfig:
    """Where the tokens come from."""

    data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Dataset prefix(es), optionally weighted: ``PREFIX`` or ``0.3 A 0.7 B`` (``--data-path``)."""
    split: str = "969,30,1"
    """Train/valid/test proportions of each ``--data-path`` dataset, as Megatron-LM: of its
    sequences for GPT, of its documents for masked LM (``--split``)."""
    train_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own training data instead of ``--data-path``'s split, weighted like ``--data-path``; every
    prefix is used whole (``--train-data-path``)."""
    valid_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own validation data, as ``--train-data-path`` (``--valid-data-path``)."""
    test_data_path: Optional[List[str]] = field(default=None, metadata={"nargs": "*"})
    """Own test data, as ``--train-data-path`` (``--test-data-path``)."""
    mock_data: bool = False
    """Random tokens instead of a dataset, for tests and benchmarks (``--mock-data``)."""
    data_cache_path: Optional[str] = None
    """Directory of the cached sample-index arrays; next to the data by default."""
    tokenizer_type: Optional[str] = field(default=None, metadata={"choices": TOKENIZER_TYPES})
    """Tokenizer that produced the data; its vocabulary size sizes the model."""
    tokenizer_model: Optional[str] = None
    """SentencePiece model or HF tokenizer.json file (``--tokenizer-model``)."""
    vocab_file: Optional[str] = None
    """GPT-2 BPE vocabulary (``--vocab-file``)."""
    merge_file: Optional[str] = None
    """GPT-2 BPE merges (``--merge-file``)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (``--num-workers``)."""
    data_impl: str = "mmap"
    """Format of the indexed dataset (``--data-impl``): ``mmap`` (Megatron's MMIDIDX), the only one
    read here; ``infer`` is accepted and means the same."""

    def per_split_paths(self):
        """The train, valid and test path lists, or None when ``--data-path`` is used instead."""
        paths = [self.train_data_path, self.valid_data_path, self.test_data_path]
        return paths if any(p is not None for p in paths) else None

    def describe_paths(self) -> str:
        """The data flags as given, for messages."""
        flags = (("--data-path", self.data_path), ("--train-data-path", self.train_data_path),
                 ("--valid-data-path", self.valid_data_path),
                 ("--test-data-path", self.test_data_path))
        return " ".join(f"{flag} {' '.join(value)}" for flag, value in flags if value)
