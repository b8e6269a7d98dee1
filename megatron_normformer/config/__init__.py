"""Typed configuration: one object per concern, threaded explicitly through the code.

    model      ModelConfig (architecture), the size presets       --num-layers, --scale-fc, ...
    parallel   ParallelConfig: world = TP x PP x DP, sequence parallelism
    optim      OptimizerConfig: AdamW and the learning-rate schedule
    training   TrainingConfig: batch, length, precision, recomputation, exit conditions
    data       DataConfig: paths, splits, tokenizer
    checkpoint CheckpointConfig: --save / --load and what a load restores
    logs       LoggingConfig: intervals, evaluation, TensorBoard, the metrics file
    deepspeed  DeepSpeedConfig: ZeRO stage, offload, a user's DeepSpeed config file
    run        RunConfig: all of the above and the checks that span them
    ds_config  the JSON config DeepSpeed reads, generated from a RunConfig (or a user's, checked)

Field docstrings are the reference documentation of the command-line flags (``arguments.py`` turns
them into ``--help``). No module reads global arguments; every builder takes the config it needs.
"""
from megatron_normformer.config.base import ConfigError, field_help
from megatron_normformer.config.checkpoint import CheckpointConfig
from megatron_normformer.config.data import DATA_IMPLS, TOKENIZER_TYPES, DataConfig
from megatron_normformer.config.deepspeed import DeepSpeedConfig
from megatron_normformer.config.logs import LoggingConfig
from megatron_normformer.config.model import (
    ACTIVATIONS,
    HEAD_SCALE_POSITIONS,
    INIT_SCHEMES,
    LLAMA_ARCHITECTURE,
    MODEL_SIZE_PRESETS,
    NORMALIZATIONS,
    POSITION_EMBEDDING_TYPES,
    ModelConfig,
    SizePreset,
    normformer_extra_parameters,
    swiglu_ffn_hidden_size,
)
from megatron_normformer.config.optim import LR_DECAY_STYLES, OptimizerConfig
from megatron_normformer.config.parallel import ParallelConfig
from megatron_normformer.config.run import CONFIG_CLASSES, BatchRamp, RunConfig
from megatron_normformer.config.training import (
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    Recompute,
    TrainingConfig,
)

__all__ = [
    "ACTIVATIONS", "BatchRamp", "CONFIG_CLASSES", "CheckpointConfig", "ConfigError", "DATA_IMPLS",
    "DataConfig", "DeepSpeedConfig", "HEAD_SCALE_POSITIONS", "INIT_SCHEMES", "LR_DECAY_STYLES",
    "LLAMA_ARCHITECTURE", "LoggingConfig", "MODEL_SIZE_PRESETS", "ModelConfig", "NORMALIZATIONS", "OptimizerConfig", "POSITION_EMBEDDING_TYPES",
    "ParallelConfig", "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS", "Recompute", "RunConfig",
    "SizePreset", "TOKENIZER_TYPES", "TrainingConfig", "field_help", "normformer_extra_parameters",
    "swiglu_ffn_hidden_size",
]
