"""Tokenizers behind one interface, built by name as in Megatron-LM (``--tokenizer-type``).

Every tokenizer exposes ``encode``, ``decode``, ``vocab_size`` and the special ids ``eod``,
``pad``, ``mask``, ``cls``, ``sep`` (``None`` where the vocabulary has no such token).

- ``SentencePieceTokenizer``: a ``.model`` file (``tools/train_tokenizer.py`` writes one with
  ``<pad>``, ``</s>`` (eod, sep), ``<s>`` (cls) and a ``<mask>`` control symbol).
- ``GPT2BPETokenizer``: byte-level BPE from ``vocab.json`` + ``merges.txt``, merged by the
  ``tokenizers`` library; the special tokens
  ``<s> </s> <pad> <mask>`` follow the RoBERTa convention and are appended after the vocabulary
  when it lacks them. ``eod`` is ``<|endoftext|>`` when present, else ``</s>``.
- ``HFTokenizer``: a HuggingFace ``tokenizer.json``.
- ``NullTokenizer``: text is space-separated ids; ``eod = vocab_size - 1`` (Megatron's convention).
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex

from megatron_normformer.config.base import ConfigError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HFTokenizer", "NullTokenizer")


def add_tokenizer_args(parser) -> None:
    """Megatron's tokenizer flags, as the tools take them (``build_tokenizer``'s arguments)."""
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model or HF tokenizer.json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built; the message names the flag and the path."""


def tokenizer_from_args(args) -> "Tokenizer":
    """The tokenizer that parsed flags name (``add_tokenizer_args``'s, or the pretraining
    parser's); a file that cannot be read is a ConfigError naming the flag and the path."""
    try:
        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                               args.merge_file, args.vocab_size)
    except (TokenizerError, OSError) as error:
        raise ConfigError(str(error)) from None


class Tokenizer(ABC):
    """Text <-> token ids, plus the special ids the datasets need."""

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of a list of token ids."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    # The special ids, None where the vocabulary has no such token: ``eod`` ends a document
    # (``--append-eod``); ``pad`` pads; masked-LM training's ``mask``, ``cls`` (start of sample)
    # and ``sep`` (separator: end of sample, document boundary).
    eod: Optional[int] = None
    pad: Optional[int] = None
    mask: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None


def _first(*ids: Optional[int]) -> Optional[int]:
    """The first id that is not None."""
    return next((i for i in ids if i is not None), None)


def _require_file(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerError(f"{tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path}: file not found")
    return path


# ---------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        _require_file(model_file, "--tokenizer-model", "SentencePieceTokenizer")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as error:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({error})"
            ) from None
        eos = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self.eod = _first(self._piece("<eod>", "<EOD>"), eos)
        self.sep = _first(self._piece("<sep>", "<SEP>"), eos)
        self.cls = _first(self._piece("<cls>", "<CLS>"), bos)
        self.mask = self._piece("<mask>", "<MASK>")
        self.pad = _first(pad, self._piece("<pad>", "<PAD>"))

    def _piece(self, *pieces: str) -> Optional[int]:
        unk = self._sp.unk_id()
        for piece in pieces:
            idx = self._sp.PieceToId(piece)
            if idx != unk and self._sp.IdToPiece(idx) == piece:
                return idx
        return None

    def encode(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()


# ---------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE

ROBERTA_SPECIALS = ("<s>", "</s>", "<pad>", "<mask>")
# GPT-2's pre-tokenisation: contractions, letter runs, number runs, other runs, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WORD_CACHE_SIZE = 500_000  # pre-tokenised words remembered with their ids (cleared when full)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1))
                 + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE from a GPT-2 style ``vocab.json`` and ``merges.txt``.

    Text is cut into words by GPT-2's pattern (the ``regex`` package), each word's UTF-8 bytes
    mapped to GPT-2's byte symbols and merged by rank in the ``tokenizers`` library's BPE model
    (Rust); a word's ids are remembered, so a frequent word costs one dictionary lookup. Text that
    looks like a special token (``<|endoftext|>``, ``<mask>``) is encoded as ordinary text, as
    GPT-2's own encoder does.

    The library's own pipeline (its byte-level pre-tokeniser) gives the same ids but measured
    slower than this split here: its pre-tokeniser alone ran at 1.1 MB/s per core on English text,
    the ``regex`` pattern at 5.3 MB/s (docs/data.md).
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder: Dict[str, int] = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TokenizerError(f"--vocab-file {vocab_file}: not a JSON vocabulary ({error})") from None
        merges = _read_merges(merge_file, self.encoder)
        self._bpe = _rust_bpe(dict(self.encoder), merges)
        self._pattern = regex.compile(GPT2_PATTERN)
        self._words: Dict[str, List[int]] = {}
        self.byte_encoder = bytes_to_unicode()
        next_id = max(self.encoder.values(), default=-1) + 1
        for token in ROBERTA_SPECIALS:
            if token not in self.encoder:
                self.encoder[token] = next_id
                next_id += 1
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.eod = self.encoder.get("<|endoftext|>", self.encoder["</s>"])
        self.pad, self.mask = self.encoder["<pad>"], self.encoder["<mask>"]
        self.cls, self.sep = self.encoder["<s>"], self.encoder["</s>"]

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        words = self._words
        for word in self._pattern.findall(text):
            word_ids = words.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(words) >= WORD_CACHE_SIZE:
                    words.clear()
                words[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> List[int]:
        symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        pieces = self._bpe.tokenize(symbols)
        if sum(len(p.value) for p in pieces) != len(symbols):
            # the library drops what the vocabulary cannot spell; refuse instead
            missing = next(c for c in symbols if c not in self.encoder)
            raise ValueError(f"BPE piece {missing!r} is not in the vocabulary")
        return [p.id for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)


def _read_merges(merge_file: str, vocab: Dict[str, int]) -> List[Tuple[str, str]]:
    """The merges in rank order (a repeated pair keeps its first rank); each pair and its result
    must be in the vocabulary."""
    merges: List[Tuple[str, str]] = []
    seen = set()
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(
                    f"--merge-file {merge_file}:{lineno}: expected two symbols, got {line!r}")
            for symbol in (parts[0], parts[1], parts[0] + parts[1]):
                if symbol not in vocab:
                    raise TokenizerError(f"--merge-file {merge_file}:{lineno}: {symbol!r} is not "
                                         "in the --vocab-file vocabulary")
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    return merges


def _rust_bpe(vocab: Dict[str, int], merges: List[Tuple[str, str]]):
    """The ``tokenizers`` library's BPE model: ``tokenize(symbols)`` merges by rank."""
    try:
        from tokenizers import models
    except ImportError:
        raise TokenizerError("GPT2BPETokenizer needs the 'tokenizers' package: "
                             "pip install tokenizers") from None
    return models.BPE(vocab=vocab, merges=merges)


# ---------------------------------------------------------------------------------------------
# HuggingFace tokenizer.json


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` loaded with the ``tokenizers`` package."""

    def __init__(self, tokenizer_file: str) -> None:
        _require_file(tokenizer_file, "--tokenizer-model", "HFTokenizer")
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                "HFTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(tokenizer_file)
        except Exception as error:  # the Rust side raises a generic Exception
            raise TokenizerError(
                f"--tokenizer-model {tokenizer_file}: not a tokenizer.json ({error})"
            ) from None
        find = self._first_id
        self.eod = find("<|endoftext|>", "</s>", "<eos>", "[SEP]")
        self.pad = find("<pad>", "[PAD]", "<|pad|>")
        self.mask = find("<mask>", "[MASK]")
        self.cls = find("<s>", "[CLS]", "<cls>")
        self.sep = find("</s>", "[SEP]", "<sep>")

    def _first_id(self, *tokens: str) -> Optional[int]:
        for token in tokens:
            idx = self._tok.token_to_id(token)
            if idx is not None:
                return int(idx)
        return None

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------
# Null tokenizer


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids; ``eod = vocab_size - 1`` as in Megatron-LM."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise TokenizerError(f"NullTokenizer needs --vocab-size >= 2, got {vocab_size}")
        self._vocab_size = int(vocab_size)
        self.eod = self._vocab_size - 1

    def encode(self, text: str) -> List[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer expects space-separated integers, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self._vocab_size})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Tokenizer:
    """Build a tokenizer from Megatron-style ``--tokenizer-type`` and file flags."""
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")
