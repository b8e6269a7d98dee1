"""tools/preprocess_data.py and tools/make_demo_corpus.py run as a user would run them."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_normformer.data.indexed_dataset import IndexedDataset
from megatron_normformer.data.tokenizers import SentencePieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def tool(name, *args):
    return subprocess.run([PY, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The first 120 documents of the demo corpus and a SentencePiece model trained on them."""
    tmp = tmp_path_factory.mktemp("demo")
    done = tool("make_demo_corpus.py", "--output", tmp / "demo.jsonl", "--max-docs", 120)
    assert done.returncode == 0, done.stderr
    done = tool("train_tokenizer.py", "--input", tmp / "demo.jsonl", "--vocab-size", 1000,
                "--output-prefix", tmp / "sp")
    assert done.returncode == 0, done.stderr
    return tmp


def preprocess(corpus, prefix, *extra):
    return tool("preprocess_data.py", "--input", corpus, "--output-prefix", prefix, *extra)


def sp_args(demo):
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", demo / "sp.model"]


@pytest.mark.parametrize("level, extra", [("document", []), ("sentence", ["--split-sentences"])])
def test_one_and_two_workers_give_identical_files(demo, tmp_path, level, extra):
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        done = preprocess(demo / "demo.jsonl", prefix, *sp_args(demo), "--append-eod",
                          "--workers", workers, "--log-interval", 50, *extra)
        assert done.returncode == 0, done.stderr
        assert "docs/s" in done.stderr and "MB/s" in done.stderr
        outputs.append(f"{prefix}_text_{level}")
    for ext in (".bin", ".idx"):
        assert open(outputs[0] + ext, "rb").read() == open(outputs[1] + ext, "rb").read()
    ds = IndexedDataset(outputs[0])
    texts = [json.loads(line)["text"] for line in open(demo / "demo.jsonl")]
    assert ds.num_documents == 120
    tok = SentencePieceTokenizer(str(demo / "sp.model"))
    first_doc = np.concatenate([ds[i] for i in range(ds.document_indices[0], ds.document_indices[1])])
    if level == "document":
        assert len(ds) == 120
        assert first_doc.tolist() == tok.encode(texts[0]) + [tok.eod]
    else:
        assert len(ds) > 3 * 120  # several sentences per document
        assert first_doc[-1] == tok.eod and ds.dtype == np.uint16


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 100]
GOOD = ['{"text": "1 2 3"}', '{"text": "4 5"}']


def outputs_in(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("out"))


def test_malformed_line_stops_with_its_line_number_and_no_output(tmp_path):
    write_lines(tmp_path / "in.jsonl", GOOD + ['{"text": "6 7"'] + GOOD)
    done = preprocess(tmp_path / "in.jsonl", tmp_path / "out", *NULL, "--workers", 2)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'in.jsonl'}:3: malformed JSON" in done.stderr
    assert outputs_in(tmp_path) == []


def test_missing_key_names_the_line_and_key(tmp_path):
    write_lines(tmp_path / "in.jsonl", GOOD + ['{"body": "6 7"}'])
    done = preprocess(tmp_path / "in.jsonl", tmp_path / "out", *NULL)
    assert done.returncode == 1 and "in.jsonl:3: missing key 'text'" in done.stderr
    assert outputs_in(tmp_path) == []


def test_skip_bad_lines_counts_them_and_empty_documents(tmp_path):
    lines = GOOD + ['{"text": "6 7"', '{"other": 1}', '{"text": ""}', '{"text": "8"}']
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    done = preprocess(tmp_path / "in.jsonl.gz", tmp_path / "out", *NULL, "--append-eod",
                      "--skip-bad-lines")
    assert done.returncode == 0, done.stderr
    assert "2 bad lines skipped" in done.stderr and "1 empty documents skipped" in done.stderr
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, 99], [4, 5, 99], [8, 99]]
    assert outputs_in(tmp_path) == ["out_text_document.bin", "out_text_document.idx"]


def test_several_json_keys(tmp_path):
    write_lines(tmp_path / "in.jsonl", ['{"a": "1 2", "b": "3"}', '{"a": "4", "b": "5 6"}'])
    done = preprocess(tmp_path / "in.jsonl", tmp_path / "out", *NULL, "--json-keys", "a", "b")
    assert done.returncode == 0, done.stderr
    a = IndexedDataset(str(tmp_path / "out_a_document"))
    b = IndexedDataset(str(tmp_path / "out_b_document"))
    assert [a[0].tolist(), a[1].tolist(), b[0].tolist(), b[1].tolist()] == [[1, 2], [4], [3], [5, 6]]


def test_bad_tokenizer_file_is_a_one_line_error(tmp_path):
    write_lines(tmp_path / "in.jsonl", GOOD)
    done = preprocess(tmp_path / "in.jsonl", tmp_path / "out", "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "nope.model")
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: --tokenizer-model {tmp_path / 'nope.model'}: file not found"


def test_demo_corpus_is_large_and_deterministic(tmp_path, demo):
    done = tool("make_demo_corpus.py", "--output", tmp_path / "full.jsonl")
    assert done.returncode == 0, done.stderr
    texts = [json.loads(line)["text"] for line in open(tmp_path / "full.jsonl")]
    assert sum(map(len, texts)) >= 1_000_000
    assert len(set(texts)) == len(texts)
    head = open(demo / "demo.jsonl").read().splitlines()
    assert open(tmp_path / "full.jsonl").read().splitlines()[:120] == head
