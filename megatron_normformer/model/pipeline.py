"""What the GPT and masked-LM pipelines share: the stage rule and the ``PipelineModule`` built on it.

Each model is a flat list of DeepSpeed layer specs, ``embedding | L transformer layers | the rest``.
The L layers are split as evenly as possible and the first L mod P stages get one more; the
embedding goes to the first stage with its layers, everything after the last layer to the last
stage. The word embedding is a ``TiedLayerSpec`` on the first and last stages (the LM head's
projection); both copies are initialised from the same stream and DeepSpeed all-reduces their
gradients over the pair of stages.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

TIED_EMBEDDING_KEY = "word_embeddings"


def stage_layer_counts(num_layers: int, num_stages: int) -> List[int]:
    """Transformer layers per stage: as even as possible, earlier stages take the remainder."""
    if num_layers < num_stages:
        raise ValueError(f"--num-layers ({num_layers}) must be at least "
                         f"--pipeline-model-parallel-size ({num_stages})")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def build_pipeline_module(specs: Sequence, num_layers: int, pstate, loss_fn: Callable,
                          activation_checkpoint_interval: int, checkpointable_layer: str):
    """A ``PipelineModule`` over ``specs`` (embedding, ``num_layers`` layers, the rest) cut by our
    stage rule over ``pstate``'s layout (TP fastest, then DP, then PP)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron_normformer.parallel.state import init_deepspeed_comm

    # PipelineModule talks through deepspeed.comm, which wraps the already-initialised torch group.
    init_deepspeed_comm()
    counts = stage_layer_counts(num_layers, pstate.pp_size)
    bounds = [0]  # stage boundaries in the spec list: the embedding first, the rest last
    for s, n in enumerate(counts):
        bounds.append(bounds[-1] + n + (1 if s == 0 else 0))
    bounds[-1] = len(specs)

    class StageRulePipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):  # our stated rule, not DeepSpeed's
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

    topology = PipeModelDataParallelTopology(num_pp=pstate.pp_size, num_mp=pstate.tp_size,
                                             num_dp=pstate.dp_size)
    return StageRulePipelineModule(list(specs), topology=topology, loss_fn=loss_fn,
                                   activation_checkpoint_interval=activation_checkpoint_interval,
                                   checkpointable_layers=[checkpointable_layer])
