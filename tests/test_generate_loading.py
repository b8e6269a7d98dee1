"""Checkpoint loading for inference, plus the tiny trained model the inference tests share.

The helpers build a real (if tiny) setup: a SentencePiece tokenizer and a short corpus from
``tools/make_demo_corpus.py``, a 2-layer NormFormer trained for a few AdamW steps on it, saved in the
consolidated release format.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.checkpoint.release import full_state_dict, save_consolidated
from megatron_normformer.data.tokenizers import SentencePieceTokenizer
from megatron_normformer.checkpoint.inference import build_inference_model, load_full_state
from megatron_normformer.inference.cli import check_tokenizer
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run_tool(name, *args, env=None, stdin=None):
    """Run ``tools/<name>`` as a user would; returns the CompletedProcess."""
    return subprocess.run([PY, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, env=env, input=stdin)


def make_corpus_and_tokenizer(tmp, docs=40, vocab=400):
    """(jsonl path, SentencePiece model path) of the first ``docs`` demo-corpus documents."""
    done = run_tool("make_demo_corpus.py", "--output", tmp / "demo.jsonl", "--max-docs", docs)
    assert done.returncode == 0, done.stderr
    done = run_tool("train_tokenizer.py", "--input", tmp / "demo.jsonl", "--vocab-size", vocab,
                    "--output-prefix", tmp / "sp")
    assert done.returncode == 0, done.stderr
    return tmp / "demo.jsonl", tmp / "sp.model"


def tiny_config(vocab_size, normformer=True, max_positions=128, **kw):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                  vocab_size=vocab_size, max_position_embeddings=max_positions,
                  make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0,
                  scale_attn=normformer, scale_fc=normformer, scale_heads=normformer,
                  scale_resids=normformer)
    fields.update(kw)
    return ModelConfig(**fields)


def train_tiny(cfg, token_ids, steps=30, seq=32, batch=8, lr=3e-3, seed=0):
    """A GPTModel after ``steps`` AdamW steps on random windows of ``token_ids``."""
    torch.manual_seed(seed)
    model = GPTModel(cfg, SingleProcessState(), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.as_tensor(token_ids, dtype=torch.long)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = model(window[:, :-1], window[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_checkpoint(tmp, docs=40, steps=30, normformer=True):
    """(consolidated checkpoint base path, tokenizer model path, corpus path)."""
    corpus, sp_model = make_corpus_and_tokenizer(tmp, docs)
    tok = SentencePieceTokenizer(str(sp_model))
    ids = []
    for line in open(corpus):
        ids += tok.encode(json.loads(line)["text"]) + [tok.eod]
    cfg = tiny_config(tok.vocab_size, normformer)
    model = train_tiny(cfg, ids, steps=steps)
    base = str(tmp / "release")
    save_consolidated(base, full_state_dict(model, None, cfg.vocab_size), cfg)
    return base, sp_model, corpus


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("release"), steps=5)


def test_consolidated_file_or_base_loads_the_saved_weights(release):
    base, _, _ = release
    full, cfg = load_full_state(base)
    for path in (base, base + ".safetensors"):
        model, cfg2 = build_inference_model(path, device="cpu")
        assert cfg2 == cfg and not model.training
        for name, p in model.named_parameters():
            ref = full[name]
            assert torch.equal(p.detach()[: ref.shape[0]], ref), name


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nothing")):
        build_inference_model(str(tmp_path / "nothing"))


def test_tokenizer_larger_than_the_model_vocabulary_is_rejected(release):
    _, sp_model, _ = release
    tok = SentencePieceTokenizer(str(sp_model))
    with pytest.raises(ConfigError, match="--tokenizer-type"):
        check_tokenizer(tok, tiny_config(tok.vocab_size - 1))
