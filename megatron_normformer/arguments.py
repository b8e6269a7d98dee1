"""Command line -> typed configs.

Flag names are Megatron's wherever Megatron has the flag and fairseq's for the NormFormer switches.
Parsing never mutates what the user gave; validation raises :class:`ConfigError` naming the flag.
Model flags default to None so that "given explicitly" is visible: an explicit flag overrides
``--model-size``, which overrides the built-in defaults.
"""
from __future__ import annotations

import argparse
import dataclasses

from megatron_normformer.config import (
    ACTIVATIONS,
    HEAD_SCALE_POSITIONS,
    MODEL_SIZE_PRESETS,
    POSITION_EMBEDDING_TYPES,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    field_help,
)


def _help(name: str) -> str:
    return field_help(ModelConfig, name)


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(MODEL_SIZE_PRESETS), default=None,
                   help="Size preset (layers, hidden, heads; ffn = 4 x hidden). Explicit flags override it.")
    for name, type_ in (("num_layers", int), ("hidden_size", int), ("num_attention_heads", int),
                        ("ffn_hidden_size", int), ("max_position_embeddings", int),
                        ("make_vocab_size_divisible_by", int), ("hidden_dropout", float),
                        ("attention_dropout", float), ("layernorm_epsilon", float),
                        ("init_method_std", float)):
        g.add_argument("--" + name.replace("_", "-"), type=type_, default=None, help=_help(name))
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Vocabulary size for the NullTokenizer / mock data (other tokenizers tell it).")
    g.add_argument("--activation-fn", choices=ACTIVATIONS, default=None, help=_help("activation_fn"))
    g.add_argument("--position-embedding-type", choices=POSITION_EMBEDDING_TYPES, default=None,
                   help=_help("position_embedding_type"))
    g.add_argument("--head-scale-position", choices=HEAD_SCALE_POSITIONS, default=None,
                   help=_help("head_scale_position"))
    for name in ("untie_embeddings_and_output_weights", "scale_embedding"):
        g.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=_help(name))

    n = parser.add_argument_group("NormFormer (fairseq flag names)")
    for name in ("scale_attn", "scale_fc", "scale_heads", "scale_resids"):
        n.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=_help(name))
    return parser


def add_parallel_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help=field_help(ParallelConfig, "tensor_model_parallel_size"))
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help=field_help(ParallelConfig, "pipeline_model_parallel_size"))
    return parser


_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def model_config_from_args(args: argparse.Namespace, vocab_size: int | None = None) -> ModelConfig:
    """Defaults < ``--model-size`` preset < explicit flags. ``vocab_size`` comes from the tokenizer
    when one is built; ``--vocab-size`` wins only where no tokenizer tells it."""
    values = {}
    if getattr(args, "model_size", None):
        values.update(dataclasses.asdict(MODEL_SIZE_PRESETS[args.model_size]))
        if args.model_size.startswith("bert"):
            values["bidirectional"] = True
    for name in _MODEL_FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return ModelConfig(**values).validate(getattr(args, "tensor_model_parallel_size", 1))


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)


def parse_or_exit(parser: argparse.ArgumentParser, build, argv=None):
    """Parse and build configs; a ConfigError becomes argparse's usage error (exit 2, one line)."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except ConfigError as e:
        parser.error(str(e))
