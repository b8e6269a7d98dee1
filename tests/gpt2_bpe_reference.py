"""The project's former pure-Python GPT-2 byte-level BPE encoder, kept as the reference the
``tokenizers``-based ``GPT2BPETokenizer`` must agree with (tests/test_tokenizers.py)."""
import json
from typing import Dict, List, Tuple

import regex

from megatron_normformer.data.tokenizers import bytes_to_unicode

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class ReferenceGPT2BPE:
    """Pre-tokenise with GPT-2's regex, map bytes to symbols, merge the lowest-ranked pair
    everywhere until no pair has a rank."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        self.ranks: Dict[Tuple[str, str], int] = {}
        with open(merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if line and not (lineno == 1 and line.startswith("#version")):
                    first, second = line.split(" ")
                    self.ranks.setdefault((first, second), len(self.ranks))
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile(GPT2_PATTERN)

    def _bpe(self, word: str) -> List[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for word in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
        return ids
