"""DeepSpeed's engine: ZeRO stage, offload, activation-checkpointing options, a user config file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    zero_stage: int = field(default=0, metadata={"choices": (0, 1, 2, 3)})
    """ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also parameters."""
    cpu_offload: bool = False
    """Offload optimizer states (ZeRO 1-3) and parameters (ZeRO-3) to CPU memory; the optimizer
    step then runs in DeepSpeed's vectorised DeepSpeedCPUAdam."""
    cpu_torch_adam: bool = False
    """With --cpu-offload: step with torch's AdamW instead of DeepSpeedCPUAdam (which DeepSpeed
    compiles on first use)."""
    zero_param_persistence_threshold: Optional[int] = None
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank instead of being
    partitioned (DeepSpeed's stage3_param_persistence_threshold; its default, 100000, when unset).
    0 partitions every parameter."""
    partition_activations: bool = False
    """Split the kept activations of recomputed layers across the TP group
    (DeepSpeed activation checkpointing, ``--partition-activations``)."""
    contigious_checkpointing: bool = False
    """Copy kept activations into one contiguous buffer (DeepSpeed's flag, its spelling); needs
    ``--partition-activations``."""
    checkpoint_in_cpu: bool = False
    """Keep the recomputed layers' inputs in CPU memory (``--checkpoint-in-cpu``); needs
    ``--partition-activations``."""
    synchronize_each_layer: bool = False
    """Synchronize the device at every recomputed layer (``--synchronize-each-layer``)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON config; otherwise one is generated from the flags. A flag that contradicts
    it is an error."""
