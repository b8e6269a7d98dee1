"""tools/evaluate_ppl.py: perplexity is exp of the mean token loss computed directly."""
import json
import math

import pytest
import torch

from megatron_normformer.data.indexed_dataset import IndexedDataset
from megatron_normformer.checkpoint.inference import build_inference_model
from test_generate_loading import make_checkpoint, run_tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppl")
    base, sp_model, corpus = make_checkpoint(tmp, steps=20)
    done = run_tool("preprocess_data.py", "--input", corpus, "--output-prefix", tmp / "demo",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--append-eod")
    assert done.returncode == 0, done.stderr
    return tmp, base, str(tmp / "demo_text_document")


def direct_loss(model, windows):
    with torch.no_grad():
        losses = [model(w[None, :-1], w[None, 1:]).double() for w in windows]
    return torch.cat([l.flatten() for l in losses]).mean().item()


def test_full_pass_ppl_is_exp_of_direct_mean_loss(setup):
    tmp, base, prefix = setup
    done = run_tool("evaluate_ppl.py", "--load", base, "--data-path", prefix, "--split", "90,10,0",
                    "--seq-length", 32, "--micro-batch-size", 3, "--json-output", tmp / "full.json",
                    "--data-cache-path", tmp / "cache")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp / "full.json").read_text())
    assert "ppl" in done.stdout and result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)

    # The valid split holds every token of its sequences once: one 33-token window per 32 tokens.
    ds = IndexedDataset(prefix)
    first_valid = int(round(len(ds) * 0.9))
    n_tokens = sum(len(ds[i]) for i in range(first_valid, len(ds)))
    n = (n_tokens - 1) // 32
    assert result["samples"] == n and result["tokens"] == n * 32
    # Directly: the same samples, one at a time, losses averaged in float64.
    from megatron_normformer.data import build_train_valid_test_datasets

    valid = build_train_valid_test_datasets([prefix], "90,10,0", 32, 1234, [0, None, 0],
                                            str(tmp / "cache"))[1]
    windows = [torch.as_tensor(valid[i]["text"]) for i in range(len(valid))]
    model, _ = build_inference_model(base, device="cpu")
    assert result["loss"] == pytest.approx(direct_loss(model, windows), abs=1e-6)


def test_eval_iters_scores_that_many_micro_batches(setup):
    tmp, base, prefix = setup
    done = run_tool("evaluate_ppl.py", "--load", base, "--data-path", prefix, "--split", "90,10,0",
                    "--seq-length", 32, "--micro-batch-size", 2, "--eval-iters", 3,
                    "--json-output", tmp / "iters.json", "--data-cache-path", tmp / "cache")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp / "iters.json").read_text())
    assert result["iters"] == 3 and result["samples"] == 6 and result["tokens"] == 6 * 32
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def test_missing_data_path_is_named(setup):
    tmp, base, _ = setup
    done = run_tool("evaluate_ppl.py", "--load", base, "--data-path", tmp / "nope")
    assert done.returncode == 2 and "--data-path" in done.stderr and "Traceback" not in done.stderr
