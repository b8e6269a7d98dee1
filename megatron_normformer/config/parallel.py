"""How the world is split across ranks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from megatron_normformer.config.base import ConfigError


@dataclass
class ParallelConfig:
    """How the world is split: world = TP x PP x DP (TP fastest, then DP, then PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree (``--tensor-model-parallel-size``)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree (``--pipeline-model-parallel-size``)."""
    sequence_parallel: bool = False
    """Split the activations outside the tensor-parallel regions (LayerNorms, ResScale, dropout,
    residuals) along the sequence across the TP group: all-gather before the column-parallel
    inputs, reduce-scatter after the row-parallel outputs. Same losses; less activation memory.
    No effect at TP=1 (``--sequence-parallel``)."""

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"({self.tensor_model_parallel_size}) x --pipeline-model-parallel-size "
                f"({self.pipeline_model_parallel_size})")
        return world_size // model_parallel


def stage_layer_counts(num_layers: int, num_stages: int) -> List[int]:
    """Transformer layers per pipeline stage: as even as possible, earlier stages take the
    remainder (``model/pipeline.py`` cuts the model so; ``memory.py`` counts so)."""
    if num_layers < num_stages:
        raise ConfigError(f"--num-layers ({num_layers}) must be at least "
                          f"--pipeline-model-parallel-size ({num_stages})")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]
