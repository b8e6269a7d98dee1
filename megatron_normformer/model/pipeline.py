"""One model definition, two forms: a plain ``nn.Module`` (PP=1) and a DeepSpeed ``PipelineModule``.

A model is written once, as a flat list of ``Piece``s: the embedding, the L transformer layers, then
what follows them. A piece names the place of its module in the model (``embedding``, ``layers.3``,
``head``), the module's class and arguments, and its ``forward``: what it reads from the ``Flow``
that reaches it (the hidden states and whatever else the model's pieces pass on) and what it sends
to the next piece. ``build_pieces`` builds every piece into the plain model at its name; the
``PipelineModule`` of ``build_pipeline`` builds its own stage's pieces at the same names. Both forms
therefore have the same parameter names (``layers.3.mlp.fc1.weight``), and checkpoints, the
layout-independent state, conversion and inference map tensors by name, never by position: moving
pieces between stages, or cutting the stages differently, cannot give a tensor another name.

Both forms also run the same ``forward`` of each piece: the plain model in ``run_pieces``, each
stage in ``_StageCall``. Only the wire differs: where a flow may cross to another stage (or into
one of DeepSpeed's recomputed chunks) it travels as the tuple of tensors its model's ``Wire`` names.

The L layers are split as evenly as possible and the first L mod P stages get one more; the
embedding goes to the first stage with its layers, everything after the last layer to the last
stage. A model whose output layer is its word embedding lists the embedding twice: once as the
first piece and once, ``reuses`` set, as the output projection. The plain model builds it once; the
pipeline builds a copy on the last stage, initialised from the same stream, and DeepSpeed keeps the
two equal (it all-reduces their gradients over the pair of stages).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from itertools import groupby
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from megatron_normformer.config.parallel import stage_layer_counts
from megatron_normformer.model.layer import LayerRecompute, forward_layers
from megatron_normformer.parallel.layers import counted_on_tp_rank
from megatron_normformer.parallel.state import init_deepspeed_comm

TIED_KEY = "embedding"  # DeepSpeed's key for the tied word embedding: the piece's name


@dataclass
class Flow:
    """What travels from piece to piece: the hidden states (the token ids before the embedding)
    and, in a model's subclass, what its pieces read besides them."""

    hidden: torch.Tensor


@dataclass(frozen=True)
class Wire:
    """A model's flow as DeepSpeed's pipeline moves it (between stages, into recomputed chunks,
    and as the first stage's input, token ids in place of the hidden states): the tensors of
    ``fields``, in this order, alone when there is one."""

    flow: type                      # the model's Flow subclass
    fields: Tuple[str, ...] = ("hidden",)

    def pack(self, flow: Flow):
        values = tuple(getattr(flow, f) for f in self.fields)
        return values[0] if len(values) == 1 else values

    def unpack(self, inputs) -> Flow:
        values = (inputs,) if torch.is_tensor(inputs) else inputs
        return self.flow(**dict(zip(self.fields, values, strict=True)))


@dataclass(frozen=True)
class Piece:
    """One entry of a model's flat sequence of modules."""

    name: str                                      # the module's place: "embedding", "layers.3"
    make: Callable[..., nn.Module]                 # built as make(*args): a class or a factory
    args: Tuple
    forward: Callable[[nn.Module, Flow], object]   # (module, flow in) -> the flow on; the last
                                                   # piece returns the model's output instead
    reuses: bool = False                           # the earlier piece of this name's module, again
    tied: bool = False                             # its module is shared by two stages (the embedding)
    transformer_layer: bool = False                # recomputed under activation checkpointing; it
                                                   # changes only the flow's hidden states


def is_tied_copy(name: str, pstate) -> bool:
    """Whether parameter ``name`` is the last stage's copy of the tied word embedding (counted,
    saved and reported by the first stage only)."""
    return name.startswith(TIED_KEY + ".") and not pstate.is_first_stage


def counted_here(name: str, param, pstate) -> bool:
    """Whether this rank's copy of parameter ``name`` is the one counted in a sum over the model
    (norms) and written once (the layout-independent checkpoint): not the tied embedding's
    second copy, and of a TP-replicated parameter TP rank 0's."""
    return not is_tied_copy(name, pstate) and counted_on_tp_rank(param, pstate.tp_rank)


def _place(root: nn.Module, name: str, module: nn.Module, stack: type) -> None:
    """Register ``module`` at the dotted ``name`` below ``root``; ``layers.3`` goes into a ``stack``
    (``nn.ModuleList`` for the whole model, ``nn.ModuleDict`` for a stage's run of layers)."""
    parent, _, leaf = name.rpartition(".")
    if not parent:
        root.add_module(leaf, module)
        return
    if parent not in root._modules:
        root.add_module(parent, stack())
    container = root._modules[parent]
    if isinstance(container, nn.ModuleList):
        if int(leaf) != len(container):
            raise ValueError(f"piece {name} is out of order")
        container.append(module)
    else:
        container[leaf] = module


def build_pieces(root: nn.Module, pieces: Sequence[Piece]) -> None:
    """Build every piece of the plain (one-stage) model at its name."""
    for piece in pieces:
        if not piece.reuses:
            _place(root, piece.name, piece.make(*piece.args), nn.ModuleList)


def _hidden_step(forward: Callable, module: nn.Module, flow: Flow, hidden: torch.Tensor) -> torch.Tensor:
    return forward(module, replace(flow, hidden=hidden)).hidden


def run_pieces(root: nn.Module, pieces: Sequence[Piece], flow: Flow,
               recompute: Optional[LayerRecompute] = None):
    """The plain model's forward: every piece's ``forward`` in order, on the module at its name,
    as the pipeline's stages run them. A run of transformer layers goes through
    ``forward_layers``, which recomputes their activations as ``recompute`` says."""
    for is_layer, run in groupby(pieces, key=lambda p: p.transformer_layer):
        if is_layer:
            steps = [partial(_hidden_step, p.forward, root.get_submodule(p.name), flow) for p in run]
            flow = replace(flow, hidden=forward_layers(steps, flow.hidden, recompute))
        else:
            for piece in run:
                flow = piece.forward(root.get_submodule(piece.name), flow)
    return flow


def stage_bounds(pieces: Sequence[Piece], num_stages: int) -> List[int]:
    """Where each stage starts in ``pieces`` (and where the last ends): our stated rule."""
    layers = [i for i, p in enumerate(pieces) if p.transformer_layer]
    counts = stage_layer_counts(len(layers), num_stages)
    bounds, seen = [0], 0
    for n in counts[:-1]:
        seen += n
        bounds.append(layers[seen - 1] + 1)
    bounds.append(len(pieces))
    return bounds


def stage_of_parameters(pieces: Sequence[Piece], num_stages: int) -> Callable[[str], int]:
    """``stage(name)``: the pipeline stage that owns parameter ``name`` (the first stage for the
    tied embedding), by the name of the piece it belongs to."""
    bounds = stage_bounds(pieces, num_stages)
    owner = {}
    for stage in range(num_stages):
        for piece in pieces[bounds[stage]:bounds[stage + 1]]:
            owner.setdefault(piece.name, stage)

    def stage(name: str) -> int:
        parts = name.split(".")
        for n in (2, 1):
            if ".".join(parts[:n]) in owner:
                return owner[".".join(parts[:n])]
        raise KeyError(f"parameter {name} belongs to no piece of the model")
    return stage


class _StageCall:
    """What DeepSpeed's engine runs for one piece: its ``forward``, the flow on the wire where it
    may cross a stage boundary or a recomputed chunk's edge (into and out of every transformer
    layer; the first stage's input comes on the wire too).

    DeepSpeed saves and loads a stage's checkpoint files through the ``state_dict`` of each entry
    it runs; the second use of a tied module has none (its first use, or the other stage, owns it).
    """

    def __init__(self, module: nn.Module, piece: Piece, wire: Wire, sends_wire: bool):
        self.module, self.piece, self.wire, self.sends_wire = module, piece, wire, sends_wire
        self.checkpointable = piece.transformer_layer
        if not piece.reuses:
            self.state_dict, self.load_state_dict = module.state_dict, module.load_state_dict

    def __call__(self, inputs):
        flow = inputs if isinstance(inputs, Flow) else self.wire.unpack(inputs)
        out = self.piece.forward(self.module, flow)
        return self.wire.pack(out) if self.sends_wire else out


def build_pipeline(pieces: Sequence[Piece], wire: Wire, pstate, loss_fn: Callable,
                   activation_checkpoint_interval: int = 0):
    """The ``PipelineModule`` of ``pieces`` over ``pstate``'s layout (TP fastest, then DP, then PP);
    ``wire``: how the model's flow crosses stages."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    # PipelineModule talks through deepspeed.comm, which wraps the already-initialised torch group.
    init_deepspeed_comm()
    pieces = list(pieces)
    sends_wire = [p.transformer_layer or (i + 1 < len(pieces) and pieces[i + 1].transformer_layer)
                  for i, p in enumerate(pieces)]
    bounds = stage_bounds(pieces, pstate.pp_size)
    # DeepSpeed finds the tied module's stages from its TiedLayerSpecs; the other pieces we build.
    specs = [TiedLayerSpec(TIED_KEY, p.make, *p.args, tied_weight_attr=["word_embeddings.weight"])
             if p.tied else p for p in pieces]

    # Private hooks of PipelineModule.__init__, overridden; a canary in
    # tests/test_deepspeed_repairs.py checks that DeepSpeed still builds through them.
    class ModelPipe(PipelineModule):
        def _partition_layers(self, method="uniform"):  # our stage rule, not DeepSpeed's
            self.parts = bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=bounds[stage], stop=bounds[stage + 1])

        def _build(self):  # each piece at its name; DeepSpeed's own build numbers them
            for index in range(self._local_start, self._local_stop):
                piece, spec = pieces[index], specs[index]
                if piece.tied:
                    if spec.key not in self.tied_modules:
                        self.tied_modules[spec.key] = spec.build()
                        self.tied_weight_attrs[spec.key] = spec.tied_weight_attr
                        _place(self, piece.name, self.tied_modules[spec.key], nn.ModuleDict)
                    module = self.tied_modules[spec.key]
                else:
                    module = piece.make(*piece.args)
                    _place(self, piece.name, module, nn.ModuleDict)
                self.forward_funcs.append(_StageCall(module, piece, wire, sends_wire[index]))
            for p in self.parameters():
                p.ds_pipe_replicated = False

        def _is_checkpointable(self, funcs):
            return all(getattr(f, "checkpointable", False) for f in funcs)

    topology = PipeModelDataParallelTopology(num_pp=pstate.pp_size, num_mp=pstate.tp_size,
                                             num_dp=pstate.dp_size)
    module = ModelPipe(specs, topology=topology, loss_fn=loss_fn,
                       activation_checkpoint_interval=activation_checkpoint_interval)
    # DeepSpeed registers the tied embedding a second time, under tied_modules.<key>: keep its
    # handle for the tied gradients but not the second registration, so that every parameter has
    # one name, the plain model's.
    module.__dict__["tied_modules"] = module._modules.pop("tied_modules")
    return module
