"""The ``megatron_normformer`` lm-eval model type, run offline on a local multiple-choice task.

lm-eval's numbers must be the model's own: every loglikelihood it reports equals a direct forward
pass to 1e-5, accuracy equals the fraction of items whose highest-scoring choice is the answer, the
rolling loglikelihood equals the sum over the document's tokens, and generate_until returns the
greedy continuation cut at the stop string. Both lm-eval's Python API and its CLI are exercised.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_normformer.data.tokenizers import SentencePieceTokenizer
from megatron_normformer.checkpoint.inference import build_inference_model
from test_generate_loading import make_checkpoint

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
MC_TASK = """task: nf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
ROLLING_TASK = """task: nf_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""
GEN_TASK = """task: nf_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    base, sp_model, corpus = make_checkpoint(tmp, docs=40, steps=40)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    sentences = [s.strip() for t in texts for s in t.replace("\n", " ").split(". ")
                 if 40 < len(s.strip()) < 160]
    items = []
    for i in range(8):  # context = first words of a sentence, choices = endings of four sentences
        quad = sentences[4 * i: 4 * i + 4]
        label = i % 4
        words = quad[label].split()
        cut = max(3, len(words) // 2)
        choices = [" ".join(s.split()[cut:]) or "end" for s in quad]
        items.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    tasks = tmp / "tasks"
    tasks.mkdir()
    with open(tmp / "items.jsonl", "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    with open(tmp / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t[:900]}) + "\n" for t in [t for t in texts if len(t) > 1200][:3])
    (tasks / "mc.yaml").write_text(MC_TASK.format(items=tmp / "items.jsonl"))
    (tasks / "rolling.yaml").write_text(ROLLING_TASK.format(docs=tmp / "docs.jsonl"))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(items=tmp / "items.jsonl"))
    model_args = (f"checkpoint={base},tokenizer_type=SentencePieceTokenizer,"
                  f"tokenizer_model={sp_model},max_length=128")
    return dict(tmp=tmp, base=base, tok=SentencePieceTokenizer(str(sp_model)), items=items,
                docs=[json.loads(line)["text"] for line in open(tmp / "docs.jsonl")],
                tasks=tasks, model_args=model_args)


def direct_loglikelihood(model, tok, context, continuation):
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    assert whole[:len(ctx)] == ctx and len(whole) <= 129  # no truncation at max_length=128
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), dim=-1)[0]
    positions = range(len(ctx) - 1, len(whole) - 1)
    return sum(logp[p, whole[p + 1]].item() for p in positions)


def direct_rolling(model, tok, text, max_length=128):
    ids = [tok.eod] + tok.encode(text)
    total = 0.0
    for start in range(0, len(ids) - 1, max_length):  # disjoint windows, full context each
        end = min(start + max_length, len(ids) - 1)
        ctx_from = max(0, end - max_length)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[ctx_from:end]])).float(), dim=-1)[0]
        total += sum(logp[p - ctx_from, ids[p + 1]].item() for p in range(start, end))
    return total


@pytest.fixture(scope="module")
def api_results(setup):
    os.environ.update(OFFLINE)
    os.environ["HF_DATASETS_CACHE"] = str(setup["tmp"] / "hf_cache")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron_normformer.inference.lm_eval  # noqa: F401 - registers the model type

    return lm_eval.simple_evaluate(
        model="megatron_normformer", model_args=setup["model_args"],
        tasks=["nf_tiny_mc", "nf_tiny_rolling", "nf_tiny_gen"],
        task_manager=TaskManager(include_path=str(setup["tasks"])),
        batch_size=3, device="cpu", log_samples=True)


def test_multiple_choice_matches_direct_computation(setup, api_results):
    model, _ = build_inference_model(setup["base"], device="cpu")
    tok = setup["tok"]
    samples = sorted(api_results["samples"]["nf_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 8
    correct = 0
    for sample, item in zip(samples, setup["items"]):
        direct = [direct_loglikelihood(model, tok, item["context"], " " + c) for c in item["choices"]]
        reported = [float(r[0]) for r in sample["filtered_resps"]]
        assert reported == pytest.approx(direct, abs=1e-5)
        assert sample["acc"] == float(max(range(4), key=lambda c: direct[c]) == item["label"])
        correct += sample["acc"]
    assert api_results["results"]["nf_tiny_mc"]["acc,none"] == pytest.approx(correct / 8)


def test_rolling_loglikelihood_matches_direct_sum(setup, api_results):
    model, _ = build_inference_model(setup["base"], device="cpu")
    samples = sorted(api_results["samples"]["nf_tiny_rolling"], key=lambda s: s["doc_id"])
    for sample, text in zip(samples, setup["docs"]):
        reported = sample["filtered_resps"][0]
        reported = float(reported[0] if isinstance(reported, (list, tuple)) else reported)
        assert len(setup["tok"].encode(text)) > 128  # several windows
        assert reported == pytest.approx(direct_rolling(model, setup["tok"], text), abs=1e-4)


def test_generate_until_is_the_greedy_continuation_cut_at_the_stop_string(setup, api_results):
    from megatron_normformer.inference.generation import generate

    model, _ = build_inference_model(setup["base"], device="cpu")
    tok = setup["tok"]
    samples = sorted(api_results["samples"]["nf_tiny_gen"], key=lambda s: s["doc_id"])
    for sample, item in zip(samples, setup["items"]):
        out = generate(model, [tok.encode(item["context"])], 12, eod=tok.eod).tokens[0]
        expected = tok.decode(out).split(".")[0]
        assert sample["resps"][0][0] == expected


def test_lm_eval_cli_reports_the_same_accuracy(setup, api_results):
    out = setup["tmp"] / "cli_out"
    env = dict(os.environ, **OFFLINE, HF_DATASETS_CACHE=str(setup["tmp"] / "hf_cache_cli"))
    done = subprocess.run(
        [sys.executable, "-m", "megatron_normformer.inference.lm_eval", "--model", "megatron_normformer",
         "--model_args", setup["model_args"], "--tasks", "nf_tiny_mc", "--include_path",
         str(setup["tasks"]), "--batch_size", "4", "--device", "cpu", "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result_files = list(out.rglob("results*.json"))
    assert len(result_files) == 1, done.stdout[-2000:]
    acc = json.loads(result_files[0].read_text())["results"]["nf_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(api_results["results"]["nf_tiny_mc"]["acc,none"])


def test_a_rope_gqa_model_scores_what_its_forward_pass_says(setup, tmp_path):
    """Grouped-query attention with rotary positions, SwiGLU and RMSNorm, at max_length 128 past
    its max_position_embeddings of 32 (rotary positions have no table to run off)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron_normformer.inference.lm_eval  # noqa: F401 - registers the model type
    from megatron_normformer.checkpoint.release import full_state_dict, save_consolidated
    from megatron_normformer.config import ModelConfig
    from megatron_normformer.model.gpt import GPTModel
    from megatron_normformer.parallel.state import SingleProcessState

    tok = setup["tok"]
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      position_embedding_type="rope", swiglu=True, normalization="RMSNorm",
                      add_bias_linear=False, scale_attn=True, scale_fc=True, scale_heads=True,
                      scale_resids=True, vocab_size=tok.vocab_size, max_position_embeddings=32,
                      make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, SingleProcessState(), seed=6)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # away from the near-uniform initial distribution
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    base = str(tmp_path / "rope_gqa")
    save_consolidated(base, full_state_dict(model, None, cfg.vocab_size), cfg)
    os.environ.update(OFFLINE)
    os.environ["HF_DATASETS_CACHE"] = str(setup["tmp"] / "hf_cache")
    result = lm_eval.simple_evaluate(
        model="megatron_normformer", tasks=["nf_tiny_mc"], batch_size=3, device="cpu",
        model_args=setup["model_args"].replace(f"checkpoint={setup['base']}", f"checkpoint={base}"),
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True)
    model, _ = build_inference_model(base, device="cpu")
    samples = sorted(result["samples"]["nf_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == 8
    lengths = []
    for sample, item in zip(samples, setup["items"]):
        direct = [direct_loglikelihood(model, tok, item["context"], " " + c) for c in item["choices"]]
        reported = [float(r[0]) for r in sample["filtered_resps"]]
        assert reported == pytest.approx(direct, rel=1e-6, abs=1e-5)
        lengths.append(len(tok.encode(item["context"] + " " + item["choices"][0])))
    assert max(lengths) > cfg.max_position_embeddings
