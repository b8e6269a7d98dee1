"""Masked-LM samples: RoBERTa FULL-SENTENCES packing with dynamic masking.

Packing: the sequences (sentences) of the chosen documents are taken in order and packed into
samples ``<cls> s1 s2 ... <sep>`` of at most ``seq_length`` tokens. A sample may cross document
boundaries; a ``<sep>`` then separates the two documents. A sentence never straddles two samples;
one longer than a whole sample is truncated to fit.

Masking (dynamic, as RoBERTa): sample ``i`` of epoch ``e`` is masked with a generator seeded by
``(seed, e, i)``, so every epoch sees a fresh mask and a rerun sees the same one. Of the non-special
positions ``int(p * n + u)`` (u uniform in [0, 1)) are chosen; each chosen position becomes
``<mask>`` with probability 0.8, a random non-special token with 0.1, and stays unchanged with 0.1.

A sample is a dict of int64 arrays of length ``seq_length``:
``text`` (the masked input), ``labels`` (the original token where chosen, ``IGNORE_INDEX = -100``
elsewhere, the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``), ``loss_mask``
(1 where chosen) and ``padding_mask`` (1 on real tokens, 0 on padding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from megatron_normformer.config.data import MASKING_PROB

from .index_cache import Barrier, cached_arrays
from .indexed_dataset import IndexedDataset

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a masked-LM sample needs (take them from the tokenizer)."""

    cls: int
    """Start of every sample."""
    sep: int
    """End of every sample and separator between documents."""
    pad: int
    """Fills samples shorter than seq_length."""
    mask: int
    """Replaces 80 % of the chosen positions."""
    vocab_size: int
    """Random replacements are drawn from the non-special ids below this."""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        """Read the special ids from a ``tokenizers.Tokenizer``; all four must exist."""
        ids = {name: getattr(tokenizer, name) for name in ("cls", "sep", "pad", "mask")}
        missing = [name for name, value in ids.items() if value is None]
        if missing:
            raise ValueError(f"masked-LM data needs a tokenizer with {', '.join(missing)} tokens")
        return cls(vocab_size=tokenizer.vocab_size, **ids)


def _document_starts(document_indices: np.ndarray, num_sequences: int) -> np.ndarray:
    """True at every sequence that starts a document."""
    docs = np.asarray(document_indices[:-1], dtype=np.int64)
    starts = np.zeros(num_sequences, dtype=bool)
    starts[docs[docs < num_sequences]] = True
    return starts


def pack_full_sentences(sequence_lengths: np.ndarray, document_indices: np.ndarray, first_doc: int,
                        end_doc: int, seq_length: int) -> np.ndarray:
    """``[num_samples, 2]`` (first sequence, end sequence) of each packed sample.

    Greedy packing of documents ``[first_doc, end_doc)``: a sample holds whole sequences plus one
    ``<sep>`` per document boundary inside it, plus ``<cls>`` and the final ``<sep>``.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    docs = np.asarray(document_indices, dtype=np.int64)
    capacity = seq_length - 2
    if capacity < 1:
        raise ValueError(f"seq_length {seq_length} leaves no room between <cls> and <sep>")
    # A sequence that starts a document (other than the sample's first) costs one extra <sep>.
    starts_doc = _document_starts(docs, len(lengths))
    seq_beg, seq_end = int(docs[first_doc]), int(docs[end_doc])
    samples = []
    begin, used = seq_beg, 0
    for s in range(seq_beg, seq_end):
        length = int(lengths[s])
        if length == 0:
            continue
        cost = length + (1 if used and starts_doc[s] else 0)
        if used and used + cost > capacity:
            samples.append((begin, s))
            begin, used, cost = s, 0, length
        used += cost
    if used:
        samples.append((begin, seq_end))
    return np.array(samples, dtype=np.int64).reshape(-1, 2)


class MaskedLMDataset(torch.utils.data.Dataset):
    """FULL-SENTENCES packed, dynamically masked samples over a range of documents.

    ``num_samples`` may exceed one epoch; sample ``i`` is packed sample
    ``permutation_e[i % P]`` of epoch ``e = i // P`` (P packed samples per epoch, a fresh
    permutation per epoch seeded by ``(seed, e)``).
    """

    def __init__(self, indexed: IndexedDataset, first_doc: int, end_doc: int, seq_length: int,
                 special: SpecialTokens, seed: int = 1234, num_samples: Optional[int] = None,
                 masking_prob: float = MASKING_PROB, split_name: str = "train",
                 cache_dir: Optional[str] = None, barrier: Optional[Barrier] = None) -> None:
        self.indexed = indexed
        self.seq_length = seq_length
        self.seed = seed
        self.masking_prob = masking_prob
        self._use_special(special)
        description = {"class": "MaskedLMDataset", "prefix": os.path.abspath(indexed.prefix),
                       "num_sequences": len(indexed), "documents": [first_doc, end_doc],
                       "seq_length": seq_length, "split": split_name}
        self.samples = cached_arrays(
            cache_dir, f"MaskedLMDataset-{split_name}", description, ("samples",),
            lambda: {"samples": pack_full_sentences(indexed.sequence_lengths, indexed.document_indices,
                                                    first_doc, end_doc, seq_length)},
            barrier)["samples"]
        self.samples_per_epoch = len(self.samples)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{indexed.prefix}: the {split_name} split has no tokens")
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        self.description = dict(description, num_samples=self.num_samples, seed=seed)  # blends' cache key
        self._permutations: Dict[int, np.ndarray] = {}
        self._starts_doc = _document_starts(indexed.document_indices, len(indexed))

    def _use_special(self, special: SpecialTokens) -> None:
        self.special = special
        specials = {special.cls, special.sep, special.pad, special.mask}
        self._specials = np.array(sorted(specials), dtype=np.int64)
        self._random_ids = np.setdiff1d(np.arange(special.vocab_size, dtype=np.int64), self._specials)

    def __len__(self) -> int:
        return self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations = {epoch: rng.permutation(self.samples_per_epoch)}
        return self._permutations[epoch]

    def packed_tokens(self, packed: int) -> np.ndarray:
        """Unmasked, unpadded tokens of packed sample ``packed``: ``<cls> ... <sep>``."""
        first, end = (int(x) for x in self.samples[packed])
        parts = [np.array([self.special.cls], dtype=np.int64)]
        used = 0
        for s in range(first, end):
            sequence = self.indexed.get(s)
            if len(sequence) == 0:
                continue
            if used and self._starts_doc[s]:
                parts.append(np.array([self.special.sep], dtype=np.int64))
            parts.append(sequence.astype(np.int64))
            used += len(sequence)
        capacity = self.seq_length - 2
        body = np.concatenate(parts[1:]) if len(parts) > 1 else np.zeros(0, np.int64)
        body = body[:capacity]  # only a single over-long sentence can exceed the capacity
        return np.concatenate((parts[0], body, [self.special.sep]))

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        epoch, within = divmod(int(idx), self.samples_per_epoch)
        packed = int(self._permutation(epoch)[within])
        tokens = self.packed_tokens(packed)
        rng = np.random.default_rng([self.seed, epoch, int(idx)])
        return self._mask(tokens, rng)

    def _mask(self, tokens: np.ndarray, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        n = len(tokens)
        candidates = np.flatnonzero(~np.isin(tokens, self._specials))
        num = min(len(candidates), int(self.masking_prob * len(candidates) + rng.random()))
        chosen = np.sort(rng.choice(candidates, size=num, replace=False))
        action = rng.random(num)
        text = np.full(self.seq_length, self.special.pad, dtype=np.int64)
        text[:n] = tokens
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        labels[chosen] = tokens[chosen]
        to_mask = chosen[action < 0.8]
        to_random = chosen[(action >= 0.8) & (action < 0.9)]
        text[to_mask] = self.special.mask
        text[to_random] = rng.choice(self._random_ids, size=len(to_random))
        loss_mask = np.zeros(self.seq_length, dtype=np.int64)
        loss_mask[chosen] = 1
        padding_mask = np.zeros(self.seq_length, dtype=np.int64)
        padding_mask[:n] = 1
        return {"text": text, "labels": labels, "loss_mask": loss_mask, "padding_mask": padding_mask}


class MockMaskedLMDataset(MaskedLMDataset):
    """Deterministic random masked-LM samples for tests and benchmarks (``--mock-data``).

    Sample i depends only on ``(seed, i)``: ``<cls>``, between ``seq_length // 2 - 2`` and
    ``seq_length - 2`` random non-special tokens, ``<sep>``, then padding; masked as the real
    dataset masks. Special ids follow fairseq's dictionary order (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2)
    with ``<mask>`` the last id.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 0,
                 masking_prob: float = MASKING_PROB) -> None:
        if vocab_size is None or vocab_size < 8:
            raise ValueError("--mock-data for masked LM needs --vocab-size of at least 8")
        if seq_length < 4:
            raise ValueError(f"seq_length {seq_length} is too short for a masked-LM sample")
        self.num_samples = int(num_samples)
        self.seq_length = seq_length
        self.seed = seed
        self.masking_prob = masking_prob
        self._use_special(SpecialTokens(cls=0, pad=1, sep=2, mask=vocab_size - 1, vocab_size=vocab_size))

    def __getitem__(self, idx: int) -> Dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, int(idx)])
        n = int(rng.integers(self.seq_length // 2 - 2, self.seq_length - 1))
        body = rng.choice(self._random_ids, size=n)
        tokens = np.concatenate(([self.special.cls], body, [self.special.sep])).astype(np.int64)
        return self._mask(tokens, rng)
