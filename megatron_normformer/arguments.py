"""Command line -> typed configs.

Flag names are Megatron's wherever Megatron has the flag and fairseq's for the NormFormer switches.
Parsing never mutates what the user gave; validation raises :class:`ConfigError` naming the flag.
Model flags default to None so that "given explicitly" is visible: an explicit flag overrides
``--model-size``, which overrides the built-in defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from megatron_normformer.config import (ACTIVATIONS, CONFIG_CLASSES, HEAD_SCALE_POSITIONS,
                                        INIT_SCHEMES, MODEL_SIZE_PRESETS, NORMALIZATIONS,
                                        POSITION_EMBEDDING_TYPES,
                                        CheckpointConfig, ConfigError, DataConfig, DeepSpeedConfig,
                                        LoggingConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                        RunConfig, TrainingConfig, field_help)


def _help(name: str) -> str:
    return field_help(ModelConfig, name)


def _normalization(name: str) -> str:
    return {n.lower(): n for n in NORMALIZATIONS}.get(name.lower(), name)


def _query_groups(args: argparse.Namespace):
    """G from Megatron-LM's --group-query-attention --num-query-groups G or Megatron-DeepSpeed's
    --num-key-value-heads G; None when neither asks for grouped-query attention."""
    lm, ds = getattr(args, "num_query_groups", None), getattr(args, "num_key_value_heads", None)
    if lm is not None and ds is not None and lm != ds:
        raise ConfigError(f"--num-query-groups {lm} contradicts --num-key-value-heads {ds}")
    if lm is not None and not getattr(args, "group_query_attention", False):
        raise ConfigError("--num-query-groups needs --group-query-attention")
    if ds is not None:
        return ds
    if getattr(args, "group_query_attention", False):
        return 1 if lm is None else lm
    return None


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(MODEL_SIZE_PRESETS), default=None,
                   help="Size preset: the paper's GPT-3 shapes (ffn = 4 x hidden), bert-*, and "
                        "llama-* (Llama's shape and architecture: rope, SwiGLU, grouped-query "
                        "attention, RMSNorm, no linear biases, untied output). Explicit flags "
                        "override it.")
    for name, type_ in (("num_layers", int), ("hidden_size", int), ("num_attention_heads", int),
                        ("ffn_hidden_size", int), ("max_position_embeddings", int),
                        ("position_embedding_offset", int),
                        ("make_vocab_size_divisible_by", int), ("hidden_dropout", float),
                        ("attention_dropout", float), ("layernorm_epsilon", float),
                        ("init_method_std", float), ("rotary_percent", float)):
        g.add_argument("--" + name.replace("_", "-"), type=type_, default=None, help=_help(name))
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Vocabulary size for the NullTokenizer / mock data (other tokenizers tell it).")
    g.add_argument("--activation-fn", choices=ACTIVATIONS, default=None, help=_help("activation_fn"))
    g.add_argument("--position-embedding-type", choices=POSITION_EMBEDDING_TYPES, default=None,
                   help=_help("position_embedding_type"))
    g.add_argument("--use-rotary-position-embeddings", action="store_const", const="rope",
                   dest="position_embedding_type",
                   help="Megatron-DeepSpeed's spelling of --position-embedding-type rope.")
    g.add_argument("--rotary-base", "--rotary-position-embeddings-theta", type=int, default=None,
                   dest="rotary_base", help=_help("rotary_base"))
    g.add_argument("--swiglu", action="store_true", default=None, help=_help("swiglu"))
    g.add_argument("--group-query-attention", action="store_true", default=False,
                   help="Grouped-query attention with --num-query-groups key/value heads "
                        "(Megatron-LM's switch; 1 group, multi-query, when the count is not given).")
    g.add_argument("--num-query-groups", type=int, default=None, help=_help("num_query_groups"))
    g.add_argument("--num-key-value-heads", type=int, default=None,
                   help="Megatron-DeepSpeed's spelling of --group-query-attention --num-query-groups.")
    g.add_argument("--normalization", type=_normalization, choices=NORMALIZATIONS, default=None,
                   help=_help("normalization"))
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   default=None, help=_help("add_bias_linear"))
    g.add_argument("--qk-layernorm", action="store_true", default=None, help=_help("qk_layernorm"))
    g.add_argument("--head-scale-position", choices=HEAD_SCALE_POSITIONS, default=None,
                   help=_help("head_scale_position"))
    g.add_argument("--init-scheme", choices=INIT_SCHEMES, default=None, help=_help("init_scheme"))
    for name in ("untie_embeddings_and_output_weights", "scale_embedding"):
        g.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, help=_help(name))
    g.add_argument("--no-scale-embedding", action="store_false", dest="scale_embedding", default=None,
                   help="Do not scale token embeddings by sqrt(hidden) (fairseq's flag).")
    g.add_argument("--no-decoder-final-norm", action="store_false", dest="final_layernorm",
                   default=None, help=_help("final_layernorm"))

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
    g.add_argument("--sequence-parallel", action="store_true",
                   help=field_help(ParallelConfig, "sequence_parallel"))
    return parser


_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def model_config_from_args(args: argparse.Namespace, vocab_size: int | None = None,
                           bidirectional: bool = False) -> ModelConfig:
    """Defaults < ``--model-size`` preset < explicit flags. ``vocab_size`` comes from the tokenizer
    when one is built; ``--vocab-size`` wins only where no tokenizer tells it. ``bidirectional``
    builds a masked-LM encoder, with RoBERTa's learned positions unless the flags say otherwise."""
    values = {}
    size = getattr(args, "model_size", None)
    if size:
        values.update(MODEL_SIZE_PRESETS[size].fields())
    if bidirectional or (size or "").startswith("bert"):
        values.update(bidirectional=True, position_embedding_type="learned",
                      max_position_embeddings=512)
    for name in _MODEL_FIELDS:
        given = _query_groups(args) if name == "num_query_groups" else getattr(args, name, None)
        if given is not None:
            values[name] = given
    if getattr(args, "swiglu", None) and getattr(args, "activation_fn", None) is not None:
        raise ConfigError(f"--swiglu gates with silu; --activation-fn {args.activation_fn} "
                          "contradicts it")
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    cfg = ModelConfig(**values)
    if getattr(args, "init_method_std", None) is not None and cfg.init_scheme != "megatron":
        # Megatron launch scripts pass it; they run unchanged and train the paper's model, told so.
        if os.environ.get("RANK", "0") == "0":
            print(f"note: --init-method-std {args.init_method_std} is not used: this model is "
                  f"initialised by --init-scheme {cfg.init_scheme} (the paper's); add --init-scheme "
                  "megatron (with --position-embedding-type learned) for Megatron's", file=sys.stderr)
    return cfg.validate(getattr(args, "tensor_model_parallel_size", 1))


def checkpoint_model_config(args: argparse.Namespace) -> ModelConfig | None:
    """``--use-checkpoint-args`` (Megatron's): the model configuration saved in the ``--load``
    checkpoint's run.json, which replaces the model flags; None where ``--load`` holds no
    checkpoint yet (a run that saves and resumes in one directory), and the flags apply."""
    # Reading a checkpoint needs torch; parsing flags does not otherwise.
    from megatron_normformer.checkpoint.training import has_checkpoint, read_latest

    if not args.load:
        raise ConfigError("--use-checkpoint-args needs --load (the checkpoint to take the model from)")
    if not has_checkpoint(args.load):
        return None
    tag = read_latest(args.load)
    with open(os.path.join(args.load, tag, "run.json")) as f:
        saved = ModelConfig.from_dict(json.load(f)["run"]["model"])
    replaced = [f"--{name.replace('_', '-')}" for name in _MODEL_FIELDS
                if getattr(args, name, None) is not None and getattr(args, name) != getattr(saved, name)]
    if os.environ.get("RANK", "0") == "0":
        print(f"note: --use-checkpoint-args: the model configuration of {args.load}/{tag}"
              + (f" replaces {' '.join(replaced)}" if replaced else ""), file=sys.stderr)
    return saved


def parse_or_exit(parser: argparse.ArgumentParser, build, argv=None):
    """Parse and build configs; a ConfigError becomes one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return args, build(args)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


# -- training, data, checkpoint, logging, DeepSpeed ---------------------------------------------

def _add_dataclass_group(parser, title: str, cls, flag_names=None):
    """One argparse group from a config dataclass: ``--field-name``, help from the field docstring."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = (flag_names or {}).get(f.name) or ["--" + f.name.replace("_", "-")]
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        base = base[0]
        kwargs = dict(default=default, help=field_help(cls, f.name), dest=f.name)
        if base is bool:
            kwargs["action"] = "store_true"
        else:
            if typing.get_origin(base) in (list, typing.List):
                base = typing.get_args(base)[0]
            kwargs["type"] = base
            for key in ("choices", "nargs"):
                if key in f.metadata:
                    kwargs[key] = f.metadata[key]
        group.add_argument(*flags, **kwargs)
    return group


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    training = _add_dataclass_group(parser, "training", TrainingConfig)
    _add_dataclass_group(parser, "optimizer and learning-rate schedule", OptimizerConfig)
    _add_dataclass_group(parser, "data and tokenizer", DataConfig)
    _add_dataclass_group(parser, "checkpointing", CheckpointConfig, {
        # Megatron's spelling, with the underscore; the all-dashes one is accepted too.
        "override_opt_param_scheduler": ["--override-opt_param-scheduler",
                                         "--override-opt-param-scheduler"],
        "use_checkpoint_opt_param_scheduler": ["--use-checkpoint-opt_param-scheduler",
                                               "--use-checkpoint-opt-param-scheduler"]})
    logging = _add_dataclass_group(parser, "logging", LoggingConfig)
    logging.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false",
                         dest="log_loss_scale_to_tensorboard",
                         help="Leave the loss scale out of TensorBoard (Megatron's flag).")
    training.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                          dest="check_for_nan_in_loss_and_grad",
                          help="Train on through non-finite losses and gradient norms (Megatron's "
                               "flag; the check is on by default).")
    ds = _add_dataclass_group(parser, "DeepSpeed", DeepSpeedConfig,
                              {"deepspeed_config": ["--deepspeed_config", "--deepspeed-config"]})
    ds.add_argument("--deepspeed", action="store_true",
                    help="Accepted for Megatron-DeepSpeed compatibility: the DeepSpeed engine is always used.")
    training.add_argument(
        "--accumulate-allreduce-grads-in-fp32", action="store_true",
        help="Megatron's flag, accepted: with --bf16 gradients are accumulated and all-reduced in "
             "fp32 unless --no-accumulate-allreduce-grads-in-fp32 is given.")
    ds.add_argument("--no-pipeline-parallel", action="store_true",
                    help="The plain (non-pipeline) engine, which ZeRO-2/3 need. It is used whenever "
                         "--pipeline-model-parallel-size is 1; with a larger value this flag is an error.")
    ds.add_argument("--local_rank", "--local-rank", type=int, default=None, dest="local_rank",
                    help="Set by the deepspeed launcher; the LOCAL_RANK environment variable wins.")
    add_compatibility_args(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--dry-run", "--print-config", action="store_true", dest="dry_run",
                     help="Validate the flags, print the resolved configuration as JSON and exit "
                          "without starting processes or training.")
    return parser


# Megatron-LM / Megatron-DeepSpeed flags that choose an implementation this code base does not
# have a choice of (its fused kernels are torch's, picked by torch). A launch script passing them
# runs unchanged; each is listed with its effect in docs/training.md.
NO_EFFECT_SWITCHES = {
    "--no-masked-softmax-fusion": "softmax fusion: SDPA's kernels are used",
    "--no-bias-gelu-fusion": "bias-GeLU fusion",
    "--no-bias-dropout-fusion": "bias-dropout fusion",
    "--no-gradient-accumulation-fusion": "gradient-accumulation fusion",
    "--no-persist-layer-norm": "persistent LayerNorm kernel",
    "--no-async-tensor-model-parallel-allreduce": "asynchronous TP all-reduce",
    "--use-flash-attn": "flash attention: SDPA picks it on GPUs when no mask is needed",
    "--use-flash-attn-v2": "flash attention: SDPA picks it on GPUs when no mask is needed",
    "--no-query-key-layer-scaling": "query-key layer scaling: softmax is computed in fp32 anyway",
    "--apply-query-key-layer-scaling": "query-key layer scaling: softmax is computed in fp32 anyway",
    "--attention-softmax-in-fp32": "SDPA accumulates the softmax in fp32",
    "--fp16-lm-cross-entropy": "the vocab-parallel cross entropy runs in fp32",
    "--log-batch-size-to-tensorboard": "the global batch size is always logged",
    "--log-validation-ppl-to-tensorboard": "validation perplexity is always logged",
    "--log-memory-to-tensorboard": "memory is not logged",
    "--log-world-size-to-tensorboard": "the world size is printed at start",
    "--deepspeed-activation-checkpointing": "recomputation always goes through DeepSpeed's checkpoint",
    "--scattered-embeddings": "embeddings are vocabulary-parallel",
    "--split-transformers": "layers are built whole",
}


def add_compatibility_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(
        "Megatron compatibility (accepted; see docs/training.md for what each means here)")
    for flag, what in NO_EFFECT_SWITCHES.items():
        g.add_argument(flag, action="store_true", help=f"No effect: {what}.")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo", "ccl", "hccl", "mpi"),
                   default=None, help="No effect: NCCL on GPUs (with gloo beside it for host-side "
                                      "collectives), gloo on CPUs.")
    g.add_argument("--DDP-impl", choices=("local", "torch", "FSDP"), default=None,
                   help="No effect: DeepSpeed's engine does the data-parallel reduction.")
    g.add_argument("--tensorboard-queue-size", type=int, default=None,
                   help="No effect: TensorBoard events are flushed at every log line.")
    return parser


def build_pretrain_parser(description: str = "NormFormer GPT pretraining on DeepSpeed"):
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_model_args(parser)
    add_parallel_args(parser)
    add_training_args(parser)
    return parser


def run_config_from_args(args: argparse.Namespace, vocab_size: int | None = None,
                         bidirectional: bool = False):
    """All typed configs of a training run. ``vocab_size`` comes from the tokenizer when one is
    built; otherwise ``--vocab-size`` (NullTokenizer / mock data) must be given. ``bidirectional``:
    the masked-LM encoder (``pretrain_bert.py``)."""
    parts = {}
    for cls in CONFIG_CLASSES:
        parts[cls.__name__] = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    if args.no_pipeline_parallel and args.pipeline_model_parallel_size > 1:
        raise ConfigError(f"--no-pipeline-parallel contradicts --pipeline-model-parallel-size "
                          f"{args.pipeline_model_parallel_size}")
    if getattr(args, "accumulate_allreduce_grads_in_fp32", False) and \
            args.no_accumulate_allreduce_grads_in_fp32:
        raise ConfigError("--accumulate-allreduce-grads-in-fp32 contradicts "
                          "--no-accumulate-allreduce-grads-in-fp32")
    saved = checkpoint_model_config(args) if args.use_checkpoint_args else None
    if vocab_size is None and args.vocab_size is None and saved is None:
        raise ConfigError("--vocab-size is required with --mock-data or --tokenizer-type NullTokenizer "
                          "(other tokenizers give it)")
    if saved is not None:
        if vocab_size is not None and vocab_size != saved.vocab_size:
            raise ConfigError(f"--use-checkpoint-args: the checkpoint's vocabulary has "
                              f"{saved.vocab_size} entries, the tokenizer's {vocab_size}")
        model = saved.validate(args.tensor_model_parallel_size)
    else:
        model = model_config_from_args(args, vocab_size, bidirectional)
    parallel = ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.sequence_parallel)
    run = RunConfig(model=model, parallel=parallel,
                    optim=parts["OptimizerConfig"], train=parts["TrainingConfig"],
                    data=parts["DataConfig"], ckpt=parts["CheckpointConfig"],
                    log=parts["LoggingConfig"], ds=parts["DeepSpeedConfig"])
    return run.validate()
