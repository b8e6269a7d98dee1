"""The project's tokenizers as Hugging Face fast tokenizers (``tokenizer.json``), same ids.

``AutoTokenizer.from_pretrained(DIR)`` loads what :func:`write_hf_tokenizer` writes as a
``PreTrainedTokenizerFast`` (no remote code) that encodes every text to the ids
:mod:`megatron_normformer.data.tokenizers` gives it:

- SentencePiece: the model's own pieces, scores or merges, normaliser (its precompiled character
  map, whitespace rules, dummy prefix) and byte fallback, rebuilt as a ``tokenizers`` Unigram or
  BPE pipeline. SentencePiece never matches control, unknown, unused or byte pieces in text, so
  they get a score no segmentation takes; decoding drops the dummy prefix as SentencePiece does.
- GPT-2 BPE: GPT-2's byte-level pre-tokenisation and the merges in rank order (a repeated pair
  keeps its first rank, as ours does), with the RoBERTa specials our tokenizer appends.
- A ``tokenizer.json`` (HFTokenizer) is carried over as it is.

Both of the first two encode special-token text such as ``</s>`` as ordinary text, as ours do, so
the HF tokenizer is told ``split_special_tokens``. The special tokens keep their ids: a causal
model's end-of-document token is its eos and also its bos (it saw documents separated by EOD only,
so EOD is what precedes a document: what lm-eval conditions an empty context on); a masked LM's
are its cls/bos and sep/eos.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron_normformer.data.tokenizers import (
    GPT2BPETokenizer,
    HFTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
)

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
UNREACHABLE = 1e6
"""How far below the lowest real piece score the pieces SentencePiece never matches are put."""


@dataclass
class TokenizerFiles:
    """The flags a tokenizer was built from (``--tokenizer-type`` and its files)."""

    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None


def _sentencepiece(model_file: str):
    """A ``tokenizers.Tokenizer`` that segments as the SentencePiece model ``model_file`` does, and
    its unknown piece."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer as Pipeline, decoders, models, normalizers
    from tokenizers import pre_tokenizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerError(f"--tokenizer-model {model_file}: whitespace-as-suffix models have no "
                             "Hugging Face equivalent")
    if trainer.model_type == UNIGRAM:
        lowest = min(p.score for p in pieces if p.type == NORMAL)
        vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else lowest - UNREACHABLE)
                 for p in pieces]
        pipeline = Pipeline(models.Unigram(vocab, trainer.unk_id, trainer.byte_fallback))
    elif trainer.model_type == BPE:
        ids = {p.piece: i for i, p in enumerate(pieces)}
        pipeline = Pipeline(models.BPE(ids, _sentencepiece_merges(pieces, ids), unk_token=trainer.unk_piece,
                                       fuse_unk=True, byte_fallback=trainer.byte_fallback))
    else:
        raise TokenizerError(f"--tokenizer-model {model_file}: SentencePiece model type "
                             f"{trainer.model_type} (word or char) is not exported; unigram and "
                             "bpe are")

    # SentencePiece's normaliser, in its order: character map, extra spaces, escaping, dummy prefix.
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # spaces only: other whitespace the map left stays
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if norm.add_dummy_prefix:
        # Metaspace adds no prefix to text that already starts with one; SentencePiece always does.
        steps.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
        pipeline.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always",
                                                          split=False)
    pipeline.normalizer = normalizers.Sequence(steps)

    steps = [decoders.ByteFallback()] if trainer.byte_fallback else []
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        # SentencePiece drops one leading "\u2581" of each piece while the text is still empty: with no
        # piece holding two (extra whitespace removed in training), every one before the first
        # character. Otherwise one, as transformers' own conversion does.
        run = "" if any("\u2581\u2581" in p.piece for p in pieces) else "+"
        steps.append(decoders.Replace(Regex("\\A\u2581" + run), ""))
    steps.append(decoders.Replace("\u2581", " "))
    pipeline.decoder = decoders.Sequence(steps)

    pipeline.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                         for p in pieces if p.type == USER_DEFINED])
    pipeline.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                 for p in pieces if p.type in (CONTROL, UNKNOWN)])
    return pipeline, trainer.unk_piece


def _sentencepiece_merges(pieces, ids: Dict[str, int]) -> List[Tuple[str, str]]:
    """SentencePiece's BPE merges the adjacent pair whose union is the highest-scoring piece: every
    split of a normal piece into two pieces, ranked by that score (then by id)."""
    ranked = []
    for p in pieces:
        if p.type != NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in ids and right in ids:
                ranked.append((-p.score, ids[p.piece], cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _gpt2_bpe(tokenizer: GPT2BPETokenizer, merge_file: str):
    """GPT-2's byte-level BPE with our vocabulary (the appended RoBERTa specials included)."""
    from tokenizers import AddedToken, Tokenizer as Pipeline, decoders, models, pre_tokenizers

    merges, seen = [], set()
    with open(merge_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            pair = tuple(line.split(" "))
            if pair not in seen:  # a repeated pair keeps its first rank
                seen.add(pair)
                merges.append(pair)
    pipeline = Pipeline(models.BPE(dict(tokenizer.encoder), merges))
    pipeline.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pipeline.decoder = decoders.ByteLevel()
    specials = [tokenizer.decoder[i] for i in sorted({tokenizer.eod, tokenizer.cls, tokenizer.sep,
                                                      tokenizer.pad, tokenizer.mask})]
    pipeline.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return pipeline


def _special_tokens(tokenizer: Tokenizer, token_of, masked_lm: bool) -> Dict[str, str]:
    """transformers' special-token roles -> token text, for the ids our tokenizer has."""
    roles = {"pad_token": tokenizer.pad, "mask_token": tokenizer.mask}
    if masked_lm:
        roles.update(bos_token=tokenizer.cls, cls_token=tokenizer.cls, eos_token=tokenizer.sep,
                     sep_token=tokenizer.sep)
    else:
        roles.update(bos_token=tokenizer.eod, eos_token=tokenizer.eod)
    return {role: token_of(i) for role, i in roles.items() if i is not None}


def write_hf_tokenizer(tokenizer: Tokenizer, files: TokenizerFiles, out_dir: str, masked_lm: bool,
                       max_length: int) -> Optional[Dict[str, str]]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``out_dir``; return the special tokens by role, or None for a NullTokenizer (nothing to write:
    its ids are the text)."""
    if isinstance(tokenizer, NullTokenizer):
        return None
    path = os.path.join(out_dir, "tokenizer.json")
    unk, split_specials = None, True
    if isinstance(tokenizer, SentencePieceTokenizer):
        pipeline, unk = _sentencepiece(files.tokenizer_model)
    elif isinstance(tokenizer, GPT2BPETokenizer):
        pipeline = _gpt2_bpe(tokenizer, files.merge_file)
    elif isinstance(tokenizer, HFTokenizer):
        from tokenizers import Tokenizer as Pipeline

        # Ours matches special-token text as the tokenizers library does: keep that.
        pipeline, split_specials = Pipeline.from_file(files.tokenizer_model), False
    else:
        raise TokenizerError(f"{type(tokenizer).__name__} has no Hugging Face export")
    pipeline.save(path)
    specials = _special_tokens(tokenizer, pipeline.id_to_token, masked_lm)
    if unk is not None:
        specials["unk_token"] = unk
    # The models take no token_type_ids (transformers 4's fast tokenizers return them unless told).
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length,
                  split_special_tokens=split_specials, clean_up_tokenization_spaces=False,
                  add_bos_token=False, add_eos_token=False,
                  model_input_names=["input_ids", "attention_mask"],
                  padding_side="right" if masked_lm else "left")  # generate() wants prompts left-padded
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    return specials
