"""fairseq ``transformer_lm`` checkpoints imported (``megatron_normformer/interop/fairseq.py``), and
the two model options the import needs: ``position_embedding_offset`` and ``final_layernorm``.

The checkpoints are written as fairseq's trainer writes them (its state-dict names and top-level
keys, a ``cfg`` of plain containers or the legacy ``args`` Namespace, numpy scalars in
``extra_state``), and the imported model is checked against ``fairseq_logits`` below: fairseq's
forward written out here from fairseq's own semantics at commit 7fb3792 (time-major, separate
q/k/v with q scaled by head_dim^-0.5, ``c_attn`` by einsum over head-sized blocks of the out_proj
output, ``attn_ln``, ``w_resid`` on the FFN residual, positions numbered from padding index + 1),
in float64, independent of the importer's mapping.
"""
import argparse
import math
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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



# -- fairseq, as its trainer writes and runs it -------------------------------------------------
PAD, EOS, UNK = 1, 2, 3
D, HEADS, FFN, LAYERS, MAX_POS = 32, 4, 64, 2, 16
# fairseq's dict.txt of a GPT-2 BPE corpus: GPT-2 ids as decimal strings in frequency order, then
# the padding entries fairseq-preprocess adds.
GPT2_SYMBOLS = [str(i) for i in torch.randperm(50256, generator=torch.Generator().manual_seed(1))[:30].tolist()]
DICT_LINES = GPT2_SYMBOLS + ["madeupword0000", "madeupword0001"]
VOCAB = 4 + len(DICT_LINES)


def fairseq_model_cfg(arch="transformer_lm_gpt", **changes):
    """cfg["model"] as fairseq saves it for ``--arch transformer_lm_gpt`` after
    base_lm_architecture (every TransformerLanguageModelConfig field)."""
    cfg = dict(
        _name=arch, activation_fn="gelu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
        relu_dropout=0.0, decoder_embed_dim=D, decoder_output_dim=D, decoder_input_dim=D,
        decoder_ffn_embed_dim=FFN, decoder_layers=LAYERS, decoder_attention_heads=HEADS,
        decoder_normalize_before=True, no_decoder_final_norm=False, adaptive_softmax_cutoff=None,
        adaptive_softmax_dropout=0.0, adaptive_softmax_factor=4.0, no_token_positional_embeddings=False,
        share_decoder_input_output_embed=True, character_embeddings=False,
        character_filters="[(1, 64), (2, 128), (3, 192), (4, 256), (5, 256), (6, 256), (7, 256)]",
        character_embedding_dim=4, char_embedder_highway_layers=2, adaptive_input=False,
        adaptive_input_factor=4.0, adaptive_input_cutoff=None, tie_adaptive_weights=False,
        tie_adaptive_proj=False, decoder_learned_pos=False, layernorm_embedding=False,
        no_scale_embedding=False, checkpoint_activations=False, offload_activations=False,
        decoder_layerdrop=0.0, decoder_layers_to_keep=None, quant_noise_pq=0.0,
        quant_noise_pq_block_size=8, quant_noise_scalar=0.0, min_params_to_wrap=100000000,
        base_layers=0, base_sublayers=1, base_shuffle=1, scale_fc=False, scale_attn=False,
        scale_heads=False, scale_resids=False, decoder_xformers_att_config=None,
        add_bos_token=False, tokens_per_sample=MAX_POS, max_target_positions=MAX_POS, tpu=False)
    cfg.update(changes)
    return cfg


def fairseq_state_dict(opts, seed=0):
    """``model.state_dict()`` of fairseq's TransformerLanguageModel for ``opts``, every weight
    random (norm gains, c_attn and w_resid away from 1) so that each one matters."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rand(n, scale=0.2), f"{prefix}.bias": rand(n, scale=0.1)}

    def linear(prefix, n_in, n_out):
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in ** -0.5), f"{prefix}.bias": rand(n_out, scale=0.1)}

    d, f = opts["decoder_embed_dim"], opts["decoder_ffn_embed_dim"]
    embed = rand(VOCAB, d, scale=d ** -0.5)
    embed[PAD] = 0
    sd = OrderedDict([("decoder.version", torch.Tensor([3])), ("decoder.embed_tokens.weight", embed)])
    if opts["decoder_learned_pos"]:
        positions = rand(opts["max_target_positions"] + PAD + 1, d, scale=d ** -0.5)
        positions[PAD] = 0
        sd["decoder.embed_positions.weight"] = positions
    else:  # the buffer fairseq of 2021 registered (its table is rebuilt, never saved)
        sd["decoder.embed_positions._float_tensor"] = torch.FloatTensor(1)
    for i in range(opts["decoder_layers"]):
        p = f"decoder.layers.{i}."
        if opts["scale_heads"]:
            sd[p + "c_attn"] = 0.5 + torch.rand(opts["decoder_attention_heads"], generator=g)
        if opts["scale_resids"]:
            sd[p + "w_resid"] = 0.5 + torch.rand(d, generator=g)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd.update(linear(p + "self_attn." + proj, d, d))
        if opts["scale_attn"]:
            sd.update(norm(p + "attn_ln", d))
        sd.update(norm(p + "self_attn_layer_norm", d))
        if opts["scale_fc"]:
            sd.update(norm(p + "ffn_layernorm", f))
        sd.update(linear(p + "fc1", d, f))
        sd.update(linear(p + "fc2", f, d))
        sd.update(norm(p + "final_layer_norm", d))
    if not opts["no_decoder_final_norm"]:
        sd.update(norm("decoder.layer_norm", d))
    # Shared: the very tensor of embed_tokens (torch.save keeps it one storage).
    sd["decoder.output_projection.weight"] = (
        embed if opts["share_decoder_input_output_embed"] else rand(VOCAB, d, scale=d ** -0.5))
    return sd


def fairseq_checkpoint(path, opts, kind="cfg", sd=None, data_dir=None):
    """torch.save of what fairseq's Trainer.state_dict() holds (``kind`` "cfg"), or of a
    checkpoint from before hydra (``kind`` "args": the Namespace of parse_args_and_arch)."""
    sd = fairseq_state_dict(opts) if sd is None else sd
    moments = {0: {"step": 20, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    common = dict(model=sd, optimizer_history=[dict(
        criterion_name="CrossEntropyCriterion", optimizer_name="FairseqAdam",
        lr_scheduler_state={"best": np.float64(4.25)}, num_updates=20)],
        extra_state={"metrics": {}, "previous_training_time": 31.5, "best": np.float64(4.25),
                     "train_iterator": {"epoch": 1, "iterations_in_epoch": 20, "shuffle": True}},
        last_optimizer_state={"state": moments, "param_groups": [
            {"lr": [0.003], "betas": (0.9, 0.98), "eps": 1e-08, "weight_decay": 0.01, "params": [0]}]})
    task = {"_name": "language_modeling", "data": data_dir or "data-bin/wiki", "sample_break_mode": "none",
            "tokens_per_sample": MAX_POS, "output_dictionary_size": -1, "add_bos_token": False,
            "max_target_positions": None}
    if kind == "cfg":
        state = dict(args=None, cfg={"_name": None, "common": {"fp16": False, "seed": 1}, "model": opts,
                                     "task": task, "criterion": {"_name": "cross_entropy"},
                                     "optimizer": {"_name": "adam", "adam_betas": "(0.9, 0.98)"}},
                     criterion=None, task_state={}, **common)
    else:
        args = argparse.Namespace(**{k: v for k, v in opts.items() if k != "_name"},
                                  arch=opts["_name"], task="language_modeling",
                                  data=task["data"], sample_break_mode="none", optimizer="adam")
        state = dict(args=args, **common)
    torch.save(state, path)
    return sd


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def fairseq_logits(sd, opts, tokens):
    """fairseq's TransformerDecoder forward (eval mode) for [batch, seq] ``tokens``, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    d, heads = opts["decoder_embed_dim"], opts["decoder_attention_heads"]
    head_dim = d // heads
    bsz, seq = tokens.shape
    mask = tokens.ne(PAD).long()
    positions = torch.cumsum(mask, dim=1) * mask + PAD  # utils.make_positions
    if opts["decoder_learned_pos"]:
        pos = sd["decoder.embed_positions.weight"][positions]
    else:  # SinusoidalPositionalEmbedding.get_embedding, in fp32 as fairseq builds it
        half = d // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
        angles = torch.arange(PAD + 1 + seq, dtype=torch.float).unsqueeze(1) * freq.unsqueeze(0)
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        table[PAD] = 0
        pos = table.double()[positions]
    scale = 1.0 if opts["no_scale_embedding"] else math.sqrt(d)
    x = (scale * sd["decoder.embed_tokens.weight"][tokens] + pos).transpose(0, 1)  # T x B x C
    future = torch.triu(torch.full((seq, seq), float("-inf"), dtype=torch.float64), 1)
    act = {"gelu": F.gelu, "relu": F.relu, "relu_squared": lambda t: F.relu(t) ** 2}[opts["activation_fn"]]
    for i in range(opts["decoder_layers"]):
        p = f"decoder.layers.{i}."

        def lin(t, name):
            return F.linear(t, sd[p + name + ".weight"], sd[p + name + ".bias"])

        residual = x
        h = _layer_norm(x, sd, p + "self_attn_layer_norm")
        q = lin(h, "self_attn.q_proj") * head_dim ** -0.5
        k, v = lin(h, "self_attn.k_proj"), lin(h, "self_attn.v_proj")
        q, k, v = (t.contiguous().view(seq, bsz * heads, head_dim).transpose(0, 1) for t in (q, k, v))
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) + future, dim=-1)
        h = torch.bmm(weights, v).transpose(0, 1).contiguous().view(seq, bsz, d)
        h = lin(h, "self_attn.out_proj")
        if opts["scale_heads"]:
            h = torch.einsum("tbhd,h->tbhd", h.view(seq, bsz, heads, head_dim), sd[p + "c_attn"])
            h = h.reshape(seq, bsz, d)
        if opts["scale_attn"]:
            h = _layer_norm(h, sd, p + "attn_ln")
        x = residual + h
        residual = x
        h = act(lin(_layer_norm(x, sd, p + "final_layer_norm"), "fc1"))
        if opts["scale_fc"]:
            h = _layer_norm(h, sd, p + "ffn_layernorm")
        h = lin(h, "fc2")
        if opts["scale_resids"]:
            residual = sd[p + "w_resid"] * residual
        x = residual + h
    if not opts["no_decoder_final_norm"]:
        x = _layer_norm(x, sd, "decoder.layer_norm")
    return F.linear(x.transpose(0, 1), sd["decoder.output_projection.weight"])


def _tokens(seed=0, bsz=2, seq=MAX_POS):
    """fairseq indices without <s>, <pad>, <unk> (a language-modelling stream: </s> and symbols)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (bsz, seq), generator=g)
    tokens[:, 5] = EOS
    return tokens


def _imported_logits(path, tokens, dictionary=None):
    from megatron_normformer.checkpoint.inference import load_full_state
    from megatron_normformer.checkpoint.release import build_model

    full, cfg = load_full_state(str(path), fairseq_dict=dictionary)
    model = build_model(full, cfg, SingleProcessState()).eval()
    with torch.no_grad():
        return model.gather_logits(model(tokens)).double(), cfg


NORMFORMER = dict(scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True)
CASES = {
    "all-four-learned": dict(NORMFORMER, decoder_learned_pos=True),
    "all-four-sinusoidal": dict(NORMFORMER),
    "scale-attn": dict(scale_attn=True),
    "scale-fc": dict(scale_fc=True),
    "scale-heads": dict(scale_heads=True),
    "scale-resids": dict(scale_resids=True, decoder_learned_pos=True),
    "untied-no-final-norm": dict(NORMFORMER, share_decoder_input_output_embed=False,
                                 no_decoder_final_norm=True),
    "no-scale-embedding-relu-squared": dict(NORMFORMER, no_scale_embedding=True,
                                            activation_fn="relu_squared", decoder_learned_pos=True),
    "plain-relu": dict(activation_fn="relu"),
}


@pytest.mark.parametrize("kind", ["cfg", "args"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_model_equals_fairseq(tmp_path, case, kind):
    opts = fairseq_model_cfg(**CASES[case])
    sd = fairseq_checkpoint(tmp_path / "checkpoint_best.pt", opts, kind)
    tokens = _tokens()
    ours, cfg = _imported_logits(tmp_path / "checkpoint_best.pt", tokens)
    expected = fairseq_logits(sd, opts, tokens)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5)
    assert cfg.position_embedding_offset == 2 and cfg.vocab_size == VOCAB
    assert cfg.head_scale_position == ("post-proj" if opts["scale_heads"] else "pre-proj")
    assert (cfg.final_layernorm, cfg.scale_embedding) == (not opts["no_decoder_final_norm"],
                                                          not opts["no_scale_embedding"])


def test_head_scale_is_fairseqs_post_projection_placement(tmp_path):
    """The einsum fix of 2021-11-03 matters: before it ("tbhd,h->tbdh") the scaled blocks came
    out transposed; the imported model follows the fixed code, not the pre-projection paper form."""
    opts = fairseq_model_cfg(scale_heads=True)
    sd = fairseq_checkpoint(tmp_path / "c.pt", opts)
    tokens = _tokens(1)
    ours, _ = _imported_logits(tmp_path / "c.pt", tokens)
    for wrong in ("tbdh", "pre-proj"):
        if wrong == "tbdh":
            expected = _pre_fix_logits(sd, opts, tokens)
        else:
            from megatron_normformer.checkpoint.inference import load_full_state
            from megatron_normformer.checkpoint.release import build_model

            full, cfg = load_full_state(str(tmp_path / "c.pt"))
            cfg.head_scale_position = "pre-proj"
            model = build_model(full, cfg, SingleProcessState()).eval()
            with torch.no_grad():
                expected = model.gather_logits(model(tokens)).double()
        assert (ours - expected).abs().max() > 1e-2, wrong


def _pre_fix_logits(sd, opts, tokens):
    """fairseq between c5ff181 and 7fb3792: the head-scaled blocks transposed (h and d swapped)."""
    original = torch.einsum

    def swapped(equation, *operands):
        return original("tbhd,h->tbdh" if equation == "tbhd,h->tbhd" else equation, *operands)

    torch.einsum = swapped
    try:
        return fairseq_logits(sd, opts, tokens)
    finally:
        torch.einsum = original
