"""Tokenizers: SentencePiece trained here, hand-checked GPT-2 BPE, HF tokenizer.json, Null."""
import json
import os
import subprocess
import sys

import pytest

from megatron_normformer.data.tokenizers import (
    GPT2BPETokenizer,
    HFTokenizer,
    NullTokenizer,
    TokenizerError,
    build_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    for cmd in (["make_demo_corpus.py", "--output", tmp / "demo.jsonl", "--max-docs", 100],
                ["train_tokenizer.py", "--input", tmp / "demo.jsonl", "--vocab-size", 800,
                 "--model-type", "unigram", "--output-prefix", tmp / "sp"]):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", cmd[0]), *map(str, cmd[1:])],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return str(tmp / "sp.model")


def test_sentencepiece_round_trip_and_specials(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    text = "Return the value of the object as a string."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) // 2  # it learned multi-character pieces
    assert tok.vocab_size == 800
    assert (tok.pad, tok.cls, tok.eod, tok.sep, tok.mask) == (0, 2, 3, 3, 4)
    assert tok.mask not in tok.encode("<mask> <s> </s>")  # control symbols never come from text


def test_characters_outside_the_vocabulary_round_trip_as_bytes(sp_model, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    text = "PY_MAJOR_VERSION \u2713 \u00e9t\u00e9 \u65e5\u672c"  # rare capitals, a check mark, CJK
    assert tok.decode(tok.encode(text)) == text
    # Without byte fallback the same text loses characters to <unk> ("\u2047").
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                           os.path.join(os.path.dirname(sp_model), "demo.jsonl"), "--vocab-size", "800",
                           "--model-type", "unigram", "--no-byte-fallback",
                           "--output-prefix", str(tmp_path / "nobytes")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    plain = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "nobytes.model"))
    assert "\u2047" in plain.decode(plain.encode(text))


def write_bpe(tmp_path):
    vocab = {"h": 0, "e": 1, "l": 2, "o": 3, "\u0120": 4, "he": 5, "ll": 6, "hell": 7, "hello": 8,
             "\u0120h": 9, "<|endoftext|>": 10, "\u00c3": 11, "\u00a9": 12, "\u00c3\u00a9": 13}
    merges = ["#version: 0.2", "h e", "l l", "he ll", "hell o", "\u0120 h", "\u00c3 \u00a9"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_gpt2_bpe_matches_hand_computed_ids(tmp_path):
    vocab, merges = write_bpe(tmp_path)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    # "hello" merges fully; " hello" is Ġ + hello because "Ġ hello" is no merge; "lol" has none.
    assert tok.encode("hello hello") == [8, 4, 8]
    assert tok.encode("lol") == [2, 3, 2]
    assert tok.encode("\u00e9") == [13]  # é = bytes c3 a9 -> "Ã©"
    assert tok.decode([8, 4, 8, 13]) == "hello hello\u00e9"
    assert tok.eod == 10
    assert (tok.cls, tok.sep, tok.pad, tok.mask, tok.vocab_size) == (14, 15, 16, 17, 18)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<mask>": 4, "hello": 5, "world": 6}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer("HFTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world hello") == [5, 6, 5]
    assert tok.decode([5, 6]) == "hello world"
    assert (tok.cls, tok.sep, tok.eod, tok.pad, tok.mask, tok.vocab_size) == (1, 2, 2, 3, 4, 7)


def test_null_tokenizer_follows_megatron():
    tok = NullTokenizer(100)
    assert tok.encode("5 6 7") == [5, 6, 7] and tok.decode([5, 6, 7]) == "5 6 7"
    assert tok.eod == 99 and tok.vocab_size == 100 and tok.pad is None and tok.mask is None
    with pytest.raises(ValueError, match="outside"):
        tok.encode("100")


def test_build_errors_name_flag_and_path(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer-type 'Bert'"):
        build_tokenizer("Bert")
    with pytest.raises(TokenizerError, match="needs --vocab-file"):
        build_tokenizer("GPT2BPETokenizer")
    missing = str(tmp_path / "merges.txt")
    (tmp_path / "bpe").mkdir()
    vocab, _ = write_bpe(tmp_path / "bpe")
    with pytest.raises(TokenizerError, match=f"--merge-file {missing}: file not found"):
        GPT2BPETokenizer(vocab, missing)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="--tokenizer-model .*bad.model: not a SentencePiece"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "bad.model"))
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
