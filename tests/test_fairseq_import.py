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
import re
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


def _tokens(seed=0, bsz=2, seq=MAX_POS, high=VOCAB):
    """fairseq indices without <s>, <pad>, <unk> (a language-modelling stream: </s> and symbols)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, high, (bsz, seq), generator=g)
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


def test_older_state_dict_names(tmp_path):
    """fairseq before 2019 kept q, k, v in one in_proj matrix and the separate output matrix as
    decoder.embed_out; both read the same."""
    opts = fairseq_model_cfg(**NORMFORMER, share_decoder_input_output_embed=False)
    sd = fairseq_state_dict(opts)
    old = OrderedDict()
    for name, value in sd.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias",
                          "k_proj.bias", "v_proj.bias")):
            continue
        old["decoder.embed_out" if name == "decoder.output_projection.weight" else name] = value
    for i in range(LAYERS):
        p = f"decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            old[p + f"in_proj_{kind}"] = torch.cat([sd[p + f"{x}_proj.{kind}"] for x in "qkv"])
    fairseq_checkpoint(tmp_path / "old.pt", opts, "args", sd=old)
    tokens = _tokens(2)
    ours, _ = _imported_logits(tmp_path / "old.pt", tokens)
    torch.testing.assert_close(ours, fairseq_logits(sd, opts, tokens), rtol=1e-5, atol=2e-5)


def _write_dict(path, lines=DICT_LINES):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{symbol} {1000 - i}\n" for i, symbol in enumerate(lines))
    return str(path)


def test_fairseq_dict_reorders_rows_to_gpt2_ids(tmp_path):
    from megatron_normformer.interop.fairseq import GPT2_EOD, GPT2_VOCAB_SIZE, import_fairseq

    opts = fairseq_model_cfg(**NORMFORMER, share_decoder_input_output_embed=False)
    sd = fairseq_checkpoint(tmp_path / "c.pt", opts)
    dictionary = _write_dict(tmp_path / "dict.txt")
    fairseq_tokens = _tokens(3, high=4 + len(GPT2_SYMBOLS))
    # fairseq index -> GPT-2 id: symbol "k" is BPE id k, </s> the end-of-document id
    to_gpt2 = torch.full((VOCAB,), -1, dtype=torch.long)
    to_gpt2[EOS] = GPT2_EOD
    for index, symbol in enumerate(DICT_LINES, start=4):
        if symbol.isdigit():
            to_gpt2[index] = int(symbol)
    ours, cfg = _imported_logits(tmp_path / "c.pt", to_gpt2[fairseq_tokens], dictionary)
    assert cfg.vocab_size == GPT2_VOCAB_SIZE == 50261
    expected = fairseq_logits(sd, opts, fairseq_tokens)
    columns = (to_gpt2 >= 0).nonzero().squeeze(1)
    torch.testing.assert_close(ours[..., to_gpt2[columns]], expected[..., columns], rtol=1e-5, atol=2e-5)
    # every GPT-2 id the dictionary lacks reads <unk>'s rows, as fairseq reads such a symbol
    imported = import_fairseq(str(tmp_path / "c.pt"), dictionary)
    word, out = imported.full["embedding.word_embeddings.weight"], imported.full["head.weight"]
    absent = torch.ones(GPT2_VOCAB_SIZE, dtype=torch.bool)
    absent[to_gpt2[columns]] = False
    absent[GPT2_EOD + 1:GPT2_EOD + 4] = False  # <s> </s> <pad>: fairseq's own rows
    assert int(absent.sum()) == 50256 - 30 + 1  # + <mask>
    torch.testing.assert_close(word[absent], sd["decoder.embed_tokens.weight"][UNK].expand(int(absent.sum()), -1))
    torch.testing.assert_close(out[GPT2_EOD + 2], sd["decoder.output_projection.weight"][EOS])
    assert any("50226 GPT-2 ids absent" in n and "2 entries without a GPT-2 id dropped" in n
               for n in imported.notes), imported.notes
    assert imported.dictionary is None


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("extra, message", [
    (dict(_name="transformer_wmt_en_de"), "architecture 'transformer_wmt_en_de' is not a transformer_lm"),
    (dict(adaptive_input=True), "--adaptive-input"),
    (dict(adaptive_softmax_cutoff="20000,60000"), "--adaptive-softmax-cutoff"),
    (dict(character_embeddings=True), "--character-embeddings"),
    (dict(layernorm_embedding=True), "--layernorm-embedding"),
    (dict(quant_noise_pq=0.1), "--quant-noise-pq"),
    (dict(decoder_normalize_before=False), "post-LN model is not representable"),
    (dict(decoder_input_dim=16), "--decoder-input-dim 16 differs"),
    (dict(activation_fn="gelu_accurate"), "--activation-fn gelu_accurate is not supported"),
])
def test_unrepresentable_options_are_named(tmp_path, extra, message):
    from megatron_normformer.interop.fairseq import import_fairseq

    opts = fairseq_model_cfg(**extra)
    fairseq_checkpoint(tmp_path / "c.pt", opts, sd=fairseq_state_dict(fairseq_model_cfg()))
    with pytest.raises(ConfigError, match=message):
        import_fairseq(str(tmp_path / "c.pt"))


def test_state_dict_that_disagrees_with_its_cfg_is_named(tmp_path):
    from megatron_normformer.interop.fairseq import import_fairseq

    sd = fairseq_state_dict(fairseq_model_cfg(scale_heads=True))
    fairseq_checkpoint(tmp_path / "extra.pt", fairseq_model_cfg(), sd=sd)
    with pytest.raises(ConfigError, match=r"no counterpart here: \['decoder.layers.0.c_attn'"):
        import_fairseq(str(tmp_path / "extra.pt"))
    del sd["decoder.layers.1.self_attn.q_proj.bias"]
    fairseq_checkpoint(tmp_path / "no_q.pt", fairseq_model_cfg(scale_heads=True), sd=sd)
    with pytest.raises(ConfigError, match="lacks decoder.layers.1.self_attn.q_proj.bias"):
        import_fairseq(str(tmp_path / "no_q.pt"))
    fairseq_checkpoint(tmp_path / "lacks.pt", fairseq_model_cfg(scale_fc=True), sd=fairseq_state_dict(fairseq_model_cfg()))
    with pytest.raises(ConfigError, match="lacks decoder.layers.0.ffn_layernorm.weight"):
        import_fairseq(str(tmp_path / "lacks.pt"))


def test_bad_inputs_get_one_line(tmp_path):
    from megatron_normformer.checkpoint.inference import load_full_state

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello\n")
    fairseq_checkpoint(tmp_path / "c.pt", fairseq_model_cfg())
    fairseq_checkpoint(tmp_path / "mt.pt", fairseq_model_cfg(_name="transformer"))
    for path, message in [(not_a_checkpoint, "nor a fairseq checkpoint (not a file torch.save wrote"),
                          (tmp_path / "mt.pt", "'transformer' is not a transformer_lm")]:
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            load_full_state(str(path))
        assert "\n" not in str(error.value)
    from megatron_normformer.checkpoint.training import read_latest

    with pytest.raises(ConfigError, match="a file, not a training checkpoint directory; make one with "
                                          "tools/convert_checkpoint.py"):
        read_latest(str(tmp_path / "c.pt"))  # pretrain_gpt.py --load checkpoint.pt
    short = _write_dict(tmp_path / "short.txt", DICT_LINES[:-1])
    done = _tool("--load", str(tmp_path / "c.pt"), "--fairseq-dict", short, "--save", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"convert_checkpoint.py: error: --fairseq-dict {short}: 35 entries (4 specials + 31 lines), "
        f"but the checkpoint's embedding has {VOCAB} rows"]


def test_pickled_code_never_runs(tmp_path, monkeypatch):
    """A checkpoint's pickle may name any callable: torch's restricted unpickler refuses modules
    such as os outright, and any other class becomes an inert stand-in holding its data."""
    from megatron_normformer.interop.fairseq import StandIn, read_checkpoint

    target = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(target),))

    class AverageMeter:  # pickled as fairseq's own class, as if fairseq had written it
        def __init__(self):
            self.val, self.sum, self.count = 2.5, 10.0, 4

    meters = type(sys)("fairseq.logging.meters")
    AverageMeter.__module__, AverageMeter.__qualname__ = meters.__name__, "AverageMeter"
    meters.AverageMeter = AverageMeter
    for name in ("fairseq", "fairseq.logging", "fairseq.logging.meters"):
        monkeypatch.setitem(sys.modules, name, meters)
    sd = fairseq_state_dict(fairseq_model_cfg())
    fairseq_checkpoint(tmp_path / "c.pt", fairseq_model_cfg(), sd=sd)
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    state["extra_state"]["payload"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="GLOBAL os.makedirs"):
        read_checkpoint(str(tmp_path / "evil.pt"))
    assert not target.exists()
    state["extra_state"]["payload"] = AverageMeter()
    torch.save(state, tmp_path / "meters.pt")
    for name in ("fairseq", "fairseq.logging", "fairseq.logging.meters"):
        monkeypatch.delitem(sys.modules, name)
    read = read_checkpoint(str(tmp_path / "meters.pt"))
    meter = read["extra_state"]["payload"]
    assert isinstance(meter, StandIn) and meter.state == {"val": 2.5, "sum": 10.0, "count": 4}
    assert repr(meter) == "<fairseq.logging.meters.AverageMeter, not rebuilt>"
    assert isinstance(read["extra_state"]["best"], StandIn)  # numpy's scalar: fairseq's data, unused
    torch.testing.assert_close(read["model"]["decoder.embed_tokens.weight"], sd["decoder.embed_tokens.weight"])


def test_continuation_flags_rebuild_the_config():
    from megatron_normformer.interop.fairseq import continuation_flags

    cfg = ModelConfig(**{**TINY, "vocab_size": 37}, position_embedding_type="learned",
                      position_embedding_offset=2, final_layernorm=False, scale_embedding=False,
                      scale_heads=True, head_scale_position="post-proj", activation_fn="relu_squared",
                      untie_embeddings_and_output_weights=True, scale_fc=True)
    args = add_model_args(argparse.ArgumentParser()).parse_args(continuation_flags(cfg))
    rebuilt = model_config_from_args(args, vocab_size=37)
    assert dataclasses_without_dropout(rebuilt) == dataclasses_without_dropout(cfg)


def dataclasses_without_dropout(cfg):
    return {k: v for k, v in cfg.to_dict().items() if not k.endswith("dropout")}


# -- convert, then train on at TP=2 and PP=2 -----------------------------------------------------
TRAINED = dict(NORMFORMER, decoder_learned_pos=True, no_decoder_final_norm=True)  # tied: no head weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq")
    data = root / "data-bin"
    data.mkdir()
    _write_dict(data / "dict.txt")
    checkpoint = str(root / "checkpoint_last.pt")
    sd = fairseq_checkpoint(checkpoint, fairseq_model_cfg(**TRAINED), data_dir=str(data))
    save = str(root / "tp2pp2")
    done = _tool("--load", checkpoint, "--save", save, "--target-tp", "2", "--target-pp", "2")
    assert done.returncode == 0, done.stderr
    return dict(root=root, checkpoint=checkpoint, save=save, sd=sd, stdout=done.stdout,
                dictionary=str(data / "dict.txt"))


def test_convert_writes_the_layout_and_the_dictionary(converted):
    from megatron_normformer.checkpoint.inference import load_full_state
    from megatron_normformer.checkpoint.release import load_consolidated

    save = converted["save"]
    assert sorted(os.listdir(os.path.join(save, "iter_0000000", "universal"))) == [
        "meta.json", "tp00_pp00.safetensors", "tp00_pp01.safetensors", "tp01_pp00.safetensors",
        "tp01_pp01.safetensors"]
    with open(os.path.join(save, "dict.txt")) as a, open(converted["dictionary"]) as b:
        assert a.read() == b.read()
    assert f"its dictionary is {converted['dictionary']}" in converted["stdout"]
    imported, cfg = load_full_state(converted["checkpoint"])
    resharded, cfg_resharded = load_full_state(save)
    assert cfg_resharded == cfg
    for name, tensor in imported.items():
        torch.testing.assert_close(resharded[name], tensor, rtol=0, atol=0)
    release = str(converted["root"] / "release" / "model")
    done = _tool("--load", converted["checkpoint"], "--output-consolidated", release)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(release + ".dict.txt")
    full, cfg_release = load_consolidated(release)
    assert cfg_release == cfg and full.keys() == imported.keys()


def test_pretrain_continues_the_imported_model_at_tp2_and_pp2(converted):
    """``pretrain_gpt.py`` with the flags the tool prints loads the checkpoint in two layouts; its
    first loss is the imported model's loss on the same batch (fairseq's forward checked above)."""
    from megatron_normformer.checkpoint.inference import load_full_state
    from megatron_normformer.checkpoint.release import build_model
    from megatron_normformer.data.gpt_dataset import MockGPTDataset
    from megatron_normformer.testing import spawn
    from train_utils import train_many

    hint = next(line for line in converted["stdout"].splitlines() if line.startswith("train on with:"))
    argv = hint.split()[hint.split().index("pretrain_gpt.py") + 1:]
    assert "--finetune" in argv and "--position-embedding-offset" in argv
    argv += ("--mock-data --micro-batch-size 2 --global-batch-size 4 --train-iters 1 --seq-length 16 "
             "--lr 1e-3 --num-workers 0 --log-interval 1 --eval-iters 0 --seed 7 "
             "--hidden-dropout 0 --attention-dropout 0").split()
    runs = [argv + ["--tensor-model-parallel-size", "2"], argv + ["--pipeline-model-parallel-size", "2"]]
    losses = [r["losses"][1] for r in spawn(train_many, 2, runs)[0]]

    full, cfg = load_full_state(converted["checkpoint"])
    model = build_model(full, cfg, SingleProcessState()).eval()
    samples = torch.stack([torch.from_numpy(MockGPTDataset(4, 16, VOCAB, seed=7)[i]["text"]) for i in range(4)])
    with torch.no_grad():
        expected = model(samples[:, :-1], samples[:, 1:]).mean().item()
    for loss in losses:
        assert abs(loss - expected) <= 1e-5 * expected, (losses, expected)
