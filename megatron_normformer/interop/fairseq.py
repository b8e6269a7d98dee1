"""fairseq ``transformer_lm`` checkpoints as this project's model (``--load checkpoint.pt``).

fairseq is not needed. The file is read with ``torch.load(weights_only=True)``: tensors and plain
containers are rebuilt by torch's restricted unpickler; ``argparse.Namespace`` (the ``args`` of
checkpoints written before fairseq's hydra configs) is allowed by name, and every other class the
pickle names (fairseq's meters in ``extra_state``, ...) becomes an inert :class:`StandIn` that keeps
its data and runs none of that class's code. So a checkpoint cannot execute code when imported.

The semantics followed are those of fairseq at commit 7fb3792 (2021-11-03, "Fix einsum
transpose"), unchanged through fairseq's last release: ``c_attn`` scales head-sized blocks of the
``out_proj`` output, bias included (``head_scale_position="post-proj"``). Checkpoints trained with
``--scale-heads`` between c5ff181 (2021-10-19) and that fix applied the scale with the two last axes
swapped; they are not told apart here (nothing in a checkpoint says which code wrote it).

What is mapped (docs/interop.md has the table): separate ``q/k/v_proj`` (or the older fused
``in_proj_*``) into the fused QKV layout of ``checkpoint/release.py``; ``c_attn``, ``attn_ln``,
``ffn_layernorm``, ``w_resid``; sinusoidal or learned positions read from row p + padding index + 1
(``position_embedding_offset``); the final ``layer_norm`` or none (``--no-decoder-final-norm``);
a tied or separate ``output_projection``; ``--no-scale-embedding``; gelu / relu / relu_squared.
An option this model cannot represent stops the import with a message naming it.

``--fairseq-dict dict.txt`` reorders the vocabulary rows so that ``GPT2BPETokenizer`` ids (GPT-2's
``vocab.json``, ``<|endoftext|>`` = 50256, then the RoBERTa specials that tokenizer appends) index
them directly; without it fairseq's own indices are kept and its dictionary travels with the output.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.data.tokenizers import ROBERTA_SPECIALS

# fairseq's Dictionary: these four first, then the lines of dict.txt in order.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
PAD, EOS, UNK = 1, 2, 3
# GPT2BPETokenizer over GPT-2's vocab.json: BPE ids 0..50255, <|endoftext|> (the end-of-document
# id), then the RoBERTa specials it appends: 50261 ids in all.
GPT2_EOD = 50256
GPT2_VOCAB_SIZE = GPT2_EOD + 1 + len(ROBERTA_SPECIALS)

# Options (when set) this model has no counterpart for, and what they are.
_UNSUPPORTED = (
    ("adaptive_input", "adaptive input embeddings"),
    ("adaptive_softmax_cutoff", "an adaptive softmax"),
    ("tie_adaptive_weights", "tied adaptive input / softmax"),
    ("character_embeddings", "character CNN token embeddings"),
    ("layernorm_embedding", "a LayerNorm on the embeddings"),
    ("no_token_positional_embeddings", "a model without position embeddings"),
    ("quant_noise_pq", "quantization noise (an extra projection after the embedding)"),
    ("quant_noise_scalar", "scalar quantization noise"),
    ("cross_self_attention", "cross+self attention"),
    ("base_layers", "BASE layers"),
    ("decoder_layers_to_keep", "pruned layers (prune with fairseq first)"),
    ("decoder_xformers_att_config", "xFormers attention"),
    ("alibi", "ALiBi attention biases"),
)
# base_lm_architecture's values for options an older checkpoint may not record.
_DEFAULTS = dict(activation_fn="relu", decoder_embed_dim=512, decoder_ffn_embed_dim=2048,
                 decoder_layers=6, decoder_attention_heads=8, decoder_learned_pos=False,
                 decoder_normalize_before=True, no_decoder_final_norm=False,
                 share_decoder_input_output_embed=False, no_scale_embedding=False,
                 scale_attn=False, scale_fc=False, scale_heads=False, scale_resids=False,
                 dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, relu_dropout=0.0)


class StandIn:
    """A pickled object of a class this process does not import: its constructor arguments and
    state kept as data; none of the class's code runs."""

    pickled_as = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.pickled_as}, not rebuilt>"


class FairseqImport(NamedTuple):
    full: Dict[str, torch.Tensor]
    """Full fp32 tensors by this project's TP=1 names (``checkpoint/release.py``)."""
    cfg: ModelConfig
    dictionary: Optional[str]
    """The fairseq dict.txt that indexes the vocabulary rows (None after --fairseq-dict, or none found)."""
    notes: List[str]
    """What the import decided that a user should know (one line each)."""


# -- reading the file -------------------------------------------------------------------------

def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"pickled_as": name})


def read_checkpoint(path: str) -> dict:
    """The dict fairseq's trainer saved at ``path``, read without running code from the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--load {path}: no such file")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise ConfigError(f"--load {path}: reading a fairseq checkpoint safely needs torch >= 2.5 "
                          f"(this is {torch.__version__})")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):
        names = []  # not a zip archive: the legacy format, or not a torch file at all
    allowed = [argparse.Namespace] + [(_stand_in(n), n) for n in names if n != "argparse.Namespace"]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a checkpoint we can read"
        # torch's weights-only message opens with generic advice; a line naming a global says why
        reason = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line),
                      "not a file torch.save wrote, or a damaged one")
        raise ConfigError(f"--load {path}: neither a consolidated checkpoint (.safetensors), a "
                          f"training checkpoint directory nor a fairseq checkpoint ({reason[:200]})")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"--load {path}: not a fairseq checkpoint (no 'model' state dict)")
    return state


def _options(state: dict, path: str) -> Tuple[dict, dict]:
    """(model options, task options) from either kind fairseq writes: ``cfg`` (plain containers,
    hydra era) or the legacy ``args`` Namespace."""
    cfg, args = state.get("cfg"), state.get("args")
    if isinstance(cfg, dict):
        model, task = cfg.get("model"), cfg.get("task") or {}
    elif isinstance(args, argparse.Namespace):
        model = task = args
    else:
        raise ConfigError(f"--load {path}: a fairseq checkpoint needs its 'cfg' dict or legacy "
                          "'args' Namespace, and has neither")
    model, task = (vars(x) if isinstance(x, argparse.Namespace) else x for x in (model, task))
    if not isinstance(model, dict) or not isinstance(task, dict):
        raise ConfigError(f"--load {path}: its cfg holds objects that only fairseq can rebuild; "
                          "re-save it with fairseq")
    arch = model.get("_name") or model.get("arch")
    if not (arch == "transformer_lm" or str(arch).startswith("transformer_lm_")):
        raise ConfigError(f"--load {path}: fairseq architecture {arch!r} is not a transformer_lm "
                          "(only decoder-only transformer_lm models can be imported)")
    return {**_DEFAULTS, **{k: v for k, v in model.items() if v is not None}}, task


# -- the config -------------------------------------------------------------------------------

def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def model_config(opts: dict, task: dict, model_state: Dict[str, torch.Tensor], path: str) -> ModelConfig:
    """Our ModelConfig for fairseq options ``opts``; a one-line ConfigError names any option we
    cannot represent."""
    for option, what in _UNSUPPORTED:
        if opts.get(option):
            raise ConfigError(f"--load {path}: fairseq {_flag(option)} ({what}) is not supported")
    if not opts["decoder_normalize_before"]:
        raise ConfigError(f"--load {path}: fairseq --decoder-normalize-before is off: a post-LN "
                          "model is not representable here (NormFormer is pre-LN)")
    d = opts["decoder_embed_dim"]
    for option in ("decoder_input_dim", "decoder_output_dim"):
        if opts.get(option, d) != d:
            raise ConfigError(f"--load {path}: fairseq {_flag(option)} {opts[option]} differs from "
                              f"--decoder-embed-dim {d} (a projection this model does not have)")
    if opts["activation_fn"] not in ("gelu", "relu", "relu_squared"):
        raise ConfigError(f"--load {path}: fairseq --activation-fn {opts['activation_fn']} is not "
                          "supported (gelu, relu, relu_squared are)")
    embed = model_state.get("decoder.embed_tokens.weight")
    if embed is None:
        raise ConfigError(f"--load {path}: no decoder.embed_tokens.weight (not a transformer_lm state dict)")
    offset = PAD + 1  # fairseq's position numbers start after its padding index
    if opts["decoder_learned_pos"]:
        table = model_state.get("decoder.embed_positions.weight")
        if table is None:
            raise ConfigError(f"--load {path}: --decoder-learned-pos but no decoder.embed_positions.weight")
        max_positions = table.shape[0] - offset
    else:
        max_positions = (opts.get("max_target_positions") or task.get("max_target_positions")
                         or opts.get("tokens_per_sample") or task.get("tokens_per_sample") or 1024)
    scale_heads = bool(opts["scale_heads"])
    return ModelConfig(
        num_layers=opts["decoder_layers"], hidden_size=d,
        num_attention_heads=opts["decoder_attention_heads"],
        ffn_hidden_size=opts["decoder_ffn_embed_dim"], vocab_size=embed.shape[0],
        max_position_embeddings=int(max_positions),
        position_embedding_type="learned" if opts["decoder_learned_pos"] else "sinusoidal",
        position_embedding_offset=offset, activation_fn=opts["activation_fn"],
        scale_attn=bool(opts["scale_attn"]), scale_fc=bool(opts["scale_fc"]),
        scale_heads=scale_heads, scale_resids=bool(opts["scale_resids"]),
        head_scale_position="post-proj" if scale_heads else "pre-proj",
        untie_embeddings_and_output_weights=not opts["share_decoder_input_output_embed"],
        final_layernorm=not opts["no_decoder_final_norm"],
        hidden_dropout=float(opts["dropout"]), attention_dropout=float(opts["attention_dropout"]),
        layernorm_epsilon=1e-5, init_scheme="fairseq",
        scale_embedding=not opts["no_scale_embedding"]).validate()


# -- the tensors ------------------------------------------------------------------------------

def _fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads, (q, k, v), head_dim, ...] flattened: the fused QKV layout (weights and biases)."""
    per_head = [t.reshape(heads, t.shape[0] // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(3 * q.shape[0], *q.shape[1:])


def convert_tensors(sd: Dict[str, torch.Tensor], cfg: ModelConfig, path: str) -> Dict[str, torch.Tensor]:
    """fairseq's ``decoder.*`` state dict -> full tensors by our names. Every tensor must be used
    and every expected one present, else a one-line ConfigError names them."""
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    used = {"decoder.version", "decoder.embed_positions._float_tensor", "decoder.embed_positions.weights"}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ConfigError(f"--load {path}: the fairseq state dict lacks {name} (which its cfg implies)")
        used.add(name)
        return sd[name].detach().float()

    full = {"embedding.word_embeddings.weight": take("decoder.embed_tokens.weight")}
    if cfg.position_embedding_type == "learned":
        full["embedding.position_embeddings"] = take("decoder.embed_positions.weight")
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        if attn + "in_proj_weight" in sd:  # fairseq before 2019: q, k, v in one matrix
            for kind in ("weight", "bias"):
                full[dst + f"attention.qkv.{kind}"] = _fused_qkv(
                    *take(attn + f"in_proj_{kind}").chunk(3), heads)
        else:
            for kind in ("weight", "bias"):
                full[dst + f"attention.qkv.{kind}"] = _fused_qkv(
                    *(take(attn + f"{p}_proj.{kind}") for p in "qkv"), heads)
        pairs = [("self_attn_layer_norm", "input_layernorm"), ("self_attn.out_proj", "attention.dense"),
                 ("final_layer_norm", "pre_mlp_layernorm"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]
        if cfg.scale_attn:
            pairs.append(("attn_ln", "post_attention_layernorm"))
        if cfg.scale_fc:
            pairs.append(("ffn_layernorm", "mlp.ffn_layernorm"))
        for theirs, ours in pairs:
            for kind in ("weight", "bias"):
                full[f"{dst}{ours}.{kind}"] = take(f"{src}{theirs}.{kind}")
        if cfg.scale_heads:
            full[dst + "attention.head_scale"] = take(src + "c_attn")
        if cfg.scale_resids:
            full[dst + "resid_scale"] = take(src + "w_resid")
    if cfg.final_layernorm:
        for kind in ("weight", "bias"):
            full[f"head.final_layernorm.{kind}"] = take(f"decoder.layer_norm.{kind}")
    if cfg.untie_embeddings_and_output_weights:
        # fairseq before 2020 called the separate output matrix embed_out.
        name = "decoder.embed_out" if "decoder.embed_out" in sd else "decoder.output_projection.weight"
        full["head.weight"] = take(name)
    else:
        used.add("decoder.output_projection.weight")  # the tied embedding, saved under both names
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ConfigError(f"--load {path}: fairseq tensors with no counterpart here: {unexpected[:4]}"
                          + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""))
    return full


# -- the dictionary ---------------------------------------------------------------------------

def read_dictionary(path: str, flag: str = "--fairseq-dict") -> List[str]:
    """fairseq's Dictionary as its symbols by index: the four specials, then one symbol per line
    of ``path`` (``<symbol> <count>``, optionally `` #fairseq:overwrite``), as fairseq loads it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file")
    symbols, seen = list(FAIRSEQ_SPECIALS), set(FAIRSEQ_SPECIALS)
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            parts = raw.rstrip().rsplit(" ", 1)
            overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
            if overwrite:
                parts = parts[0].rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ConfigError(f"{flag} {path} line {lineno}: expected '<symbol> <count>', "
                                  f"got {raw.rstrip()[:60]!r}")
            if parts[0] in seen and not overwrite:
                raise ConfigError(f"{flag} {path} line {lineno}: {parts[0]!r} appears twice "
                                  "(fairseq refuses it too without #fairseq:overwrite)")
            seen.add(parts[0])
            symbols.append(parts[0])
    return symbols


def _gpt2_id(symbol: str) -> Optional[int]:
    """The GPT-2 BPE id a fairseq GPT-2 dictionary symbol stands for (its decimal spelling)."""
    if symbol.isascii() and symbol.isdigit() and str(int(symbol)) == symbol and int(symbol) < GPT2_EOD:
        return int(symbol)
    return None


def to_gpt2_ids(full: Dict[str, torch.Tensor], cfg: ModelConfig, symbols: List[str], path: str
                ) -> Tuple[Dict[str, torch.Tensor], ModelConfig, List[str]]:
    """Vocabulary rows reordered so that GPT2BPETokenizer's ids index them: BPE id k takes the row
    of the symbol ``"k"``, the end-of-document id (50256) fairseq's ``</s>``, the RoBERTa specials
    ``<s>``, ``</s>``, ``<pad>`` fairseq's own, anything the dictionary lacks ``<unk>``'s row (what
    fairseq reads for a symbol it does not know)."""
    rows = full["embedding.word_embeddings.weight"].shape[0]
    if len(symbols) != rows:
        raise ConfigError(f"--fairseq-dict {path}: {len(symbols)} entries (4 specials + "
                          f"{len(symbols) - 4} lines), but the checkpoint's embedding has {rows} rows")
    source = torch.full((GPT2_VOCAB_SIZE,), UNK, dtype=torch.long)
    found = torch.zeros(GPT2_EOD, dtype=torch.bool)
    dropped = []
    for index, symbol in enumerate(symbols[len(FAIRSEQ_SPECIALS):], start=len(FAIRSEQ_SPECIALS)):
        gpt2 = _gpt2_id(symbol)
        if gpt2 is None:
            dropped.append(symbol)
        else:  # a later "#fairseq:overwrite" entry wins, as in fairseq
            source[gpt2], found[gpt2] = index, True
    if not found.any():
        raise ConfigError(f"--fairseq-dict {path}: no symbol is a GPT-2 BPE id (decimal numbers): "
                          "not a fairseq GPT-2 dictionary")
    source[GPT2_EOD] = EOS
    for i, token in enumerate(ROBERTA_SPECIALS):
        source[GPT2_EOD + 1 + i] = symbols.index(token) if token in symbols else UNK
    full = dict(full)
    for name in ("embedding.word_embeddings.weight", "head.weight"):
        if name in full:
            full[name] = full[name][source].contiguous()
    absent = int((~found).sum())
    notes = [f"--fairseq-dict: vocabulary rows reordered to GPT2BPETokenizer ids over GPT-2's "
             f"vocab.json ({GPT2_VOCAB_SIZE} rows); fairseq's </s> is the end-of-document id {GPT2_EOD}",
             f"--fairseq-dict: {absent} GPT-2 ids absent from {path} take <unk>'s row (fairseq reads "
             f"them as <unk>); {len(dropped)} entries without a GPT-2 id dropped"
             + (f" ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''})" if dropped else "")]
    return full, dataclasses.replace(cfg, vocab_size=GPT2_VOCAB_SIZE), notes


def _find_dictionary(path: str, task: dict) -> Optional[str]:
    """fairseq's dict.txt beside the checkpoint, or in the data directory its task names."""
    places = [os.path.dirname(os.path.abspath(path))]
    if task.get("data"):
        places.append(str(task["data"]).split(":")[0])
    return next((p for p in (os.path.join(d, "dict.txt") for d in places) if os.path.isfile(p)), None)


# -- the import -------------------------------------------------------------------------------

def import_fairseq(path: str, dictionary: Optional[str] = None) -> FairseqImport:
    """A fairseq transformer_lm checkpoint as full tensors and a ModelConfig. ``dictionary``
    (``--fairseq-dict``) reorders the vocabulary to GPT-2 BPE ids; without it fairseq's indices are
    kept, and the dict.txt found beside the checkpoint or in its task's data directory is named
    in the result so that it can travel with the output."""
    state = read_checkpoint(path)
    opts, task = _options(state, path)
    cfg = model_config(opts, task, state["model"], path)
    full = convert_tensors(state["model"], cfg, path)
    notes = []
    dropout = max(float(opts["activation_dropout"] or 0), float(opts["relu_dropout"] or 0))
    if dropout > 0:
        notes.append(f"fairseq --activation-dropout {dropout} has no counterpart here: training "
                     "continues without it")
    if dictionary is not None:
        full, cfg, more = to_gpt2_ids(full, cfg, read_dictionary(dictionary), dictionary)
        return FairseqImport(full, cfg, None, notes + more)
    found = _find_dictionary(path, task)
    if found is not None:
        try:
            size = len(read_dictionary(found, "dictionary"))
        except ConfigError as error:
            size = str(error)
        if size != cfg.vocab_size:
            notes.append(f"{found} does not match the embedding's {cfg.vocab_size} rows ({size}): not used")
            found = None
    notes.append(f"fairseq's token indices kept (vocab_size {cfg.vocab_size}, </s> = {EOS}); "
                 + (f"its dictionary is {found}" if found else
                    "no dict.txt found beside the checkpoint or in its task's data directory: "
                    "encode text with the dictionary it was trained with"))
    return FairseqImport(full, cfg, found, notes)


def continuation_flags(cfg: ModelConfig) -> List[str]:
    """The model flags under which ``pretrain_gpt.py --load`` accepts a checkpoint of ``cfg``
    (its run config must describe the same model); the vocabulary size comes from the tokenizer."""
    default = ModelConfig(vocab_size=cfg.vocab_size)
    always = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
              "max_position_embeddings")
    skip = ("vocab_size", "hidden_dropout", "attention_dropout", "bidirectional")
    flags: List[str] = []
    for name in (f.name for f in dataclasses.fields(cfg)):
        value = getattr(cfg, name)
        if name in skip or (name not in always and value == getattr(default, name)):
            continue
        if name == "final_layernorm":
            flags.append("--no-decoder-final-norm")
        elif name == "scale_embedding":
            flags.append("--scale-embedding" if value else "--no-scale-embedding")
        elif name == "add_bias_linear":
            flags.append("--disable-bias-linear")
        elif name == "num_query_groups":
            flags += ["--group-query-attention", "--num-query-groups", str(value)]
        elif value is True:
            flags.append(_flag(name))
        else:
            flags += [_flag(name), str(value)]
    return flags
