"""fairseq ``transformer_lm`` checkpoints imported (``megatron_normformer/interop/fairseq.py``), and
the two model options the import needs: ``position_embedding_offset`` and ``final_layernorm``."""
import argparse

import pytest
import torch

from megatron_normformer.arguments import add_model_args, model_config_from_args
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.memory import stage_parameters, total_parameters
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.model.summary import summarize
from megatron_normformer.parallel.state import SingleProcessState

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50,
            max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)


# -- the two model options --------------------------------------------------------------------
def test_new_fields_default_to_the_old_model():
    cfg = ModelConfig(**TINY)
    assert cfg.position_embedding_offset == 0 and cfg.final_layernorm
    saved = cfg.to_dict()
    del saved["position_embedding_offset"], saved["final_layernorm"]
    assert ModelConfig.from_dict(saved) == ModelConfig.from_dict(cfg.to_dict())
    names = [n for n, _ in GPTModel(cfg, SingleProcessState()).named_parameters()]
    assert "head.final_layernorm.weight" in names


def test_flags_parse():
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--position-embedding-offset", "2", "--no-decoder-final-norm", "--vocab-size", "50"])
    cfg = model_config_from_args(args)
    assert cfg.position_embedding_offset == 2 and not cfg.final_layernorm
    assert model_config_from_args(add_model_args(argparse.ArgumentParser()).parse_args([])).final_layernorm
    with pytest.raises(ConfigError, match="--position-embedding-offset"):
        ModelConfig(**TINY, position_embedding_offset=-1).validate()
    with pytest.raises(ConfigError, match="--no-decoder-final-norm"):
        ModelConfig(**TINY, bidirectional=True, final_layernorm=False).validate()


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_offset_reads_the_table_offset_rows_on(kind):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (2, 10))
    plain = GPTModel(ModelConfig(**{**TINY, "max_position_embeddings": 18},
                                 position_embedding_type=kind), SingleProcessState()).eval()
    shifted = GPTModel(ModelConfig(**TINY, position_embedding_type=kind, position_embedding_offset=2),
                       SingleProcessState()).eval()
    shifted.load_state_dict(plain.state_dict())
    if kind == "learned":
        assert shifted.embedding.position_embeddings.shape[0] == 18
    expected = plain.embedding(torch.cat([tokens[:, :2], tokens], 1))[:, 2:]
    torch.testing.assert_close(shifted.embedding(tokens), expected, rtol=0, atol=0)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(shifted.embedding(tokens[:, :3], ids[:, :]),
                               plain.embedding(tokens[:, :3], ids + 2), rtol=0, atol=0)


def test_without_final_norm_the_head_projects_the_last_layer():
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (2, 8))
    cfg = ModelConfig(**TINY, final_layernorm=False)
    model = GPTModel(cfg, SingleProcessState()).eval()
    assert model.head.final_layernorm is None
    hidden = model.embedding(tokens)
    for layer in model.layers:
        hidden = layer(hidden)
    logits = hidden @ model.embedding.word_embeddings.weight.T
    torch.testing.assert_close(model(tokens), logits)


@pytest.mark.parametrize("changes", [
    dict(position_embedding_type="learned", position_embedding_offset=2),
    dict(final_layernorm=False, untie_embeddings_and_output_weights=True),
    dict(final_layernorm=False, position_embedding_offset=5),
])
def test_planner_counts_the_new_options(changes):
    cfg = ModelConfig(**{**TINY, **changes})
    real = summarize(cfg, 2)
    assert stage_parameters(cfg, 2)[0] == real["parameters_per_tp_rank"]
    assert total_parameters(cfg) - real["vocab_padding_parameters"] == real["total_parameters"]
    base = summarize(ModelConfig(**TINY, position_embedding_type=cfg.position_embedding_type))
    learned = cfg.position_embedding_type == "learned"
    extra = (cfg.position_embedding_offset * 32 if learned else 0) - (0 if cfg.final_layernorm else 64)
    if cfg.untie_embeddings_and_output_weights:
        extra += 50 * 32
    assert real["total_parameters"] - base["total_parameters"] == extra


def test_checkpoints_saved_before_the_fields_resume():
    from megatron_normformer.checkpoint.training import layout_differences

    def run(**model):
        return {"model": model, "parallel": {}, "train": {}, "ds": {"zero_stage": 0}}

    old = ModelConfig(**TINY).to_dict()
    del old["position_embedding_offset"], old["final_layernorm"]
    meta = {"run": run(**old), "world_size": 1}
    assert layout_differences(meta, run(**ModelConfig(**TINY).to_dict()), 1, "CK") == []
    with pytest.raises(ConfigError, match="final_layernorm: checkpoint True vs this run False"):
        layout_differences(meta, run(**ModelConfig(**TINY, final_layernorm=False).to_dict()), 1, "CK")
