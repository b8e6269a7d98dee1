"""Generation: the KV cache changes nothing but speed, TP=2 decodes what TP=1 decodes, the sampling
filters keep what they promise, and tools/generate.py prints what generate() returns."""
import json

import pytest
import torch

from megatron_normformer.checkpoint.release import load_consolidated
from megatron_normformer.data.tokenizers import SentencePieceTokenizer
from megatron_normformer.inference.generation import generate
from megatron_normformer.checkpoint.inference import build_inference_model
from megatron_normformer.inference.sampling import SamplingConfig, filter_logits
from megatron_normformer.testing import spawn
from test_generate_loading import make_checkpoint, run_tool

SAMPLERS = [SamplingConfig(greedy=True), SamplingConfig(temperature=0.9, top_k=40, top_p=0.9),
            SamplingConfig(temperature=1.3)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    base, sp_model, _ = make_checkpoint(tmp, steps=30)
    return base, sp_model, SentencePieceTokenizer(str(sp_model))


def prompts_of(tok):
    return [tok.encode(t) for t in ("Return the value of the", "Open a",
                                    "This module provides functions for")]


@pytest.mark.parametrize("sampling", SAMPLERS, ids=["greedy", "topk_topp", "temperature"])
def test_cached_and_uncached_decoding_agree(release, sampling):
    base, _, tok = release
    model, _ = build_inference_model(base, device="cpu")
    prompts = prompts_of(tok)
    runs = {cache: generate(model, prompts, 24, sampling, use_cache=cache, seed=11, return_logits=True)
            for cache in (True, False)}
    assert runs[True].tokens == runs[False].tokens
    assert all(len(t) > 0 for t in runs[True].tokens)
    for a, b in zip(runs[True].logits, runs[False].logits):
        assert a.shape == b.shape and a.shape[1] == model.cfg.vocab_size
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone(release):
    base, _, tok = release
    model, _ = build_inference_model(base, device="cpu")
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) > 1  # really padded
    batch = generate(model, prompts, 20, use_cache=True, return_logits=True)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], 20, use_cache=False, return_logits=True)
        assert alone.tokens[0] == batch.tokens[i]
        assert torch.allclose(alone.logits[0], batch.logits[i], atol=1e-5, rtol=0)


def test_seed_fixes_samples_and_eod_stops(release):
    base, _, tok = release
    model, _ = build_inference_model(base, device="cpu")
    p = prompts_of(tok)[:1]
    s = SamplingConfig(temperature=1.0)
    assert generate(model, p, 16, s, seed=3).tokens == generate(model, p, 16, s, seed=3).tokens
    assert generate(model, p, 16, s, seed=3).tokens != generate(model, p, 16, s, seed=4).tokens
    sampled = generate(model, p, 16, s, seed=3).tokens[0]
    k = next(i for i in range(1, 16) if sampled[i] not in sampled[:i])  # a token not seen before
    stopped = generate(model, p, 16, s, seed=3, eod=sampled[k])
    assert stopped.tokens[0] == sampled[:k] and stopped.finish_reasons == ["eod"]
    assert generate(model, p, 8).finish_reasons == ["length"]
    halted = generate(model, p, 16, s, seed=3, stop=lambda row, new: len(new) == 3)
    assert halted.tokens[0] == sampled[:3] and halted.finish_reasons == ["stop"]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]
    assert kept(filter_logits(logits, top_p=0.7)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.71)) == [0, 1, 2]
    assert kept(filter_logits(logits, top_k=4, top_p=0.95)) == [0, 1, 2, 3]


def _tp_generate(base, prompts, sampling):
    from megatron_normformer.parallel.state import ParallelState

    torch.set_num_threads(1)
    pstate = ParallelState(tensor_model_parallel_size=2)
    model, _ = build_inference_model(base, pstate, device="cpu")
    out = generate(model, prompts, 16, sampling, seed=5, return_logits=True)
    return out.tokens, out.logits


@pytest.mark.parametrize("sampling", SAMPLERS[:2], ids=["greedy", "topk_topp"])
def test_tensor_parallel_two_decodes_like_one(release, sampling):
    base, _, tok = release
    prompts = prompts_of(tok)
    model, _ = build_inference_model(base, device="cpu")
    ref = generate(model, prompts, 16, sampling, seed=5, return_logits=True)
    ranks = spawn(_tp_generate, 2, base, prompts, sampling)
    for tokens, logits in ranks:
        assert tokens == ref.tokens
        for a, b in zip(logits, ref.logits):
            assert torch.allclose(a, b, atol=1e-4, rtol=0)


def tool_args(release, *extra):
    base, sp_model, _ = release
    return ["--load", base, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            sp_model, "--max-new-tokens", 12, "--json", *extra]


def test_tool_prints_what_generate_returns(release, tmp_path):
    base, _, tok = release
    model, _ = build_inference_model(base, device="cpu")
    texts = ["Return the value of the", "Open a"]
    expected = generate(model, [tok.encode(t) for t in texts], 12, eod=tok.eod).tokens

    done = run_tool("generate.py", *tool_args(release, "--prompt", texts[0], "--prompt", texts[1],
                                              "--greedy"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["tokens"] for r in rows] == expected
    # The text is the continuation decoded in context (word-initial spaces kept).
    in_context = [tok.decode(tok.encode(t) + e)[len(tok.decode(tok.encode(t))):] for t, e in zip(texts, expected)]
    assert [r["text"] for r in rows] == in_context
    assert [r["text"].strip() for r in rows] == [tok.decode(e).strip() for e in expected]

    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    from_file = run_tool("generate.py", *tool_args(release, "--prompt-file", tmp_path / "prompts.txt",
                                                   "--temperature", "0"))
    from_stdin = run_tool("generate.py", *tool_args(release, "--greedy", "--no-kv-cache"),
                          stdin="\n".join(texts) + "\n")
    for done in (from_file, from_stdin):
        assert done.returncode == 0, done.stderr
        assert [json.loads(line)["tokens"] for line in done.stdout.splitlines()] == expected

    sampled = [run_tool("generate.py", *tool_args(release, "--prompt", texts[0], "--top-p", "0.9",
                                                  "--seed", "7")) for _ in range(2)]
    assert sampled[0].stdout == sampled[1].stdout and sampled[0].returncode == 0


def test_tool_errors_name_the_flag(release, tmp_path):
    done = run_tool("generate.py", *tool_args(release, "--prompt", "x", "--top-p", "0"))
    assert done.returncode == 2 and "--top-p" in done.stderr
    done = run_tool("generate.py", *tool_args(release, "--prompt-file", tmp_path / "missing.txt"))
    assert done.returncode == 2 and "--prompt-file" in done.stderr
    args = tool_args(release, "--prompt", "x")
    args[1] = tmp_path / "nowhere"
    done = run_tool("generate.py", *args)
    assert done.returncode == 2 and "--load" in done.stderr and "Traceback" not in done.stderr
