"""A small rule-based English sentence splitter (``--split-sentences``; no model download).

A sentence ends at ``.``, ``!`` or ``?`` (plus closing quotes or brackets) followed by white space
and an upper-case letter, a digit or an opening quote/bracket, unless the word before the full
stop is a common abbreviation (``Mr.``, ``e.g.``), a single letter (an initial) or the stop is part
of an ellipsis. Line breaks between paragraphs (a blank line) always end a sentence.
"""
from __future__ import annotations

import re
from typing import List

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig figs no nos vol pp ed eds approx "
    "dept est inc ltd co corp sec sect ch eq ref ca jan feb mar apr jun jul aug sep sept oct "
    "nov dec".split())

_BOUNDARY = re.compile(r"""([.!?]+["')\]]*)(\s+)(?=["'(\[]?[A-Z0-9])""")
_PARAGRAPH = re.compile(r"\n\s*\n")


def _ends_with_abbreviation(text: str) -> bool:
    match = re.search(r"(\S+)\.$", text)
    if match is None:
        return False
    word = match.group(1).lower().lstrip("(\"'")
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> List[str]:
    """Sentences of ``text`` in order, stripped, empty ones dropped."""
    sentences: List[str] = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            end = match.end(1)
            candidate = paragraph[start:end]
            if match.group(1).startswith("..") or (
                match.group(1) == "." and _ends_with_abbreviation(candidate)
            ):
                continue
            sentences.append(candidate.strip())
            start = match.end()
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]
