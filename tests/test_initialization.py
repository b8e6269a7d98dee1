"""Initial weights: fairseq's transformer_lm by default (the paper's model), Megatron's on request.

Each weight is checked against the distribution its scheme names (bounds of the uniform draws,
standard deviations of the normal ones, zero biases, the sqrt(d) embedding scale), the draws are
layout-invariant (TP shards are slices of the TP=1 tensor), and configs saved before the schemes
existed load as the Megatron-initialised models they describe.
"""
import argparse
import math

import pytest
import torch

from megatron_normformer.arguments import add_model_args, model_config_from_args
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.model.bert import BertModel
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.init import random_shard
from megatron_normformer.parallel.state import SingleProcessState

D, F, L = 256, 1024, 3
CFG = dict(num_layers=L, hidden_size=D, num_attention_heads=8, ffn_hidden_size=F, vocab_size=1000,
           max_position_embeddings=64)


def params(cfg):
    return dict(GPTModel(cfg, SingleProcessState(), seed=3).named_parameters())


def assert_uniform(t, bound):
    t = t.detach().double().flatten()
    assert t.abs().max() <= bound and t.abs().max() > 0.98 * bound
    # 4 standard errors of a sample std (uniform: kurtosis 1.8) and of a sample mean.
    assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=4 * math.sqrt(0.8 / (4 * t.numel())))
    assert abs(t.mean().item()) < 4 * bound / math.sqrt(3 * t.numel())


def assert_normal(t, std):
    t = t.detach().double().flatten()
    assert t.std().item() == pytest.approx(std, rel=4 * math.sqrt(2 / (4 * t.numel())))
    assert t.abs().max() > 3 * std  # not a uniform of that std (whose max is 1.73 std)


def test_fairseq_is_the_default_and_matches_transformer_lm():
    cfg = ModelConfig(**CFG)
    assert cfg.init_scheme == "fairseq" and cfg.scale_embedding
    p = params(cfg)
    words = p["embedding.word_embeddings.weight"]
    assert_normal(words[: cfg.vocab_size], D ** -0.5)
    assert words[cfg.vocab_size:].abs().sum() == 0  # vocabulary padding
    for i in range(L):
        a, m = f"layers.{i}.attention", f"layers.{i}.mlp"
        assert_uniform(p[f"{a}.qkv.weight"], math.sqrt(3 / (2 * D)))  # xavier, gain 1/sqrt(2)
        assert_uniform(p[f"{a}.qkv.bias"], D ** -0.5)
        assert_uniform(p[f"{a}.dense.weight"], math.sqrt(3 / D))  # xavier, gain 1
        assert p[f"{a}.dense.bias"].abs().sum() == 0
        assert_uniform(p[f"{m}.fc1.weight"], D ** -0.5)  # nn.Linear's default
        assert_uniform(p[f"{m}.fc1.bias"], D ** -0.5)
        assert_uniform(p[f"{m}.fc2.weight"], F ** -0.5)
        assert_uniform(p[f"{m}.fc2.bias"], F ** -0.5)
    # Token vectors enter the first layer at the scale of the sinusoidal positions (RMS 0.71).
    model = GPTModel(cfg, SingleProcessState(), seed=3)
    tokens = torch.arange(64).view(1, 64)
    tok = model.embedding.word_embeddings(tokens) * model.embedding.embed_scale
    assert tok.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=0.1)


def test_megatron_scheme():
    cfg = ModelConfig(**CFG, init_scheme="megatron", init_method_std=0.03)
    assert not cfg.scale_embedding
    p = params(cfg)
    assert_normal(p["embedding.word_embeddings.weight"][: cfg.vocab_size], 0.03)
    for i in range(L):
        a, m = f"layers.{i}.attention", f"layers.{i}.mlp"
        assert_normal(p[f"{a}.qkv.weight"], 0.03)
        assert_normal(p[f"{m}.fc1.weight"], 0.03)
        for out in (f"{a}.dense.weight", f"{m}.fc2.weight"):
            assert_normal(p[out], 0.03 / math.sqrt(2 * L))
        for bias in ("attention.qkv", "attention.dense", "mlp.fc1", "mlp.fc2"):
            assert p[f"layers.{i}.{bias}.bias"].abs().sum() == 0


def test_learned_positions_and_untied_output_follow_the_scheme():
    cfg = ModelConfig(**CFG, position_embedding_type="learned", untie_embeddings_and_output_weights=True)
    p = params(cfg)
    assert_normal(p["embedding.position_embeddings"], D ** -0.5)
    assert_normal(p["head.weight"][: cfg.vocab_size], D ** -0.5)


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize("dim", [0, 1])
def test_shards_are_slices_of_the_full_draw(distribution, dim):
    full = random_shard(5, "w", (8, 6), 0.5, dim, 0, 1, distribution=distribution)  # TP=1
    for world in (2, 4 if dim == 0 else 3):
        shards = [random_shard(5, "w", (8, 6), 0.5, dim, r, world, distribution=distribution)
                  for r in range(world)]
        assert torch.equal(torch.cat(shards, dim=dim), full)


def test_masked_lm_keeps_the_bert_init():
    cfg = ModelConfig(**CFG, bidirectional=True, position_embedding_type="learned")
    assert cfg.init_scheme == "megatron" and not cfg.scale_embedding
    model = BertModel(cfg, SingleProcessState(), seed=3)
    assert_normal(model.lm_head.dense.weight, 0.02)


def test_configs_saved_before_init_schemes_load_as_megatron():
    old = ModelConfig(**CFG, init_scheme="megatron").to_dict()
    del old["init_scheme"]
    old["scale_embedding"] = False
    cfg = ModelConfig.from_dict(old)
    assert cfg.init_scheme == "megatron" and cfg.scale_embedding is False
    assert ModelConfig.from_dict(ModelConfig(**CFG).to_dict()).init_scheme == "fairseq"


def _parse(*argv):
    return model_config_from_args(add_model_args(argparse.ArgumentParser()).parse_args(list(argv)))


def test_flags():
    assert _parse().scale_embedding and _parse().init_scheme == "fairseq"
    assert not _parse("--no-scale-embedding").scale_embedding
    cfg = _parse("--init-scheme", "megatron", "--init-method-std", "0.01")
    assert (cfg.init_scheme, cfg.init_method_std, cfg.scale_embedding) == ("megatron", 0.01, False)
    assert _parse("--init-scheme", "megatron", "--scale-embedding").scale_embedding

def test_init_method_std_of_a_megatron_script_is_reported_unused(capsys):
    cfg = _parse("--init-method-std", "0.006")  # a Megatron launch script's flag runs unchanged
    assert cfg.init_scheme == "fairseq" and cfg.scale_embedding
    assert "--init-method-std 0.006 is not used" in capsys.readouterr().err


def test_resuming_a_checkpoint_from_before_init_schemes():
    from megatron_normformer.checkpoint.training import layout_differences

    def run(**model):
        return {"model": model, "parallel": {}, "train": {}, "ds": {"zero_stage": 0}}

    old = ModelConfig(**CFG, init_scheme="megatron").to_dict()
    del old["init_scheme"]
    meta = {"run": run(**old), "world_size": 1}
    now = ModelConfig(**CFG).to_dict()  # today's defaults: fairseq scheme, scaled embeddings
    with pytest.raises(ConfigError, match="scale_embedding.*add --no-scale-embedding"):
        layout_differences(meta, run(**now), 1, "CK")
    now.update(scale_embedding=False)  # the flag the message names; the scheme itself may differ
    assert layout_differences(meta, run(**now), 1, "CK") == []
