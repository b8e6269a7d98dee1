"""NormFormer diagnostics (paper Figs. 3 and 4), the TP-aware gradient and parameter norms.

Gradients are read between the last backward of an iteration and the optimizer step. Where they
live depends on the ZeRO stage: ``param.grad`` at stage 0 (already averaged over DP), DeepSpeed's
partitions at stages 1-3, read back whole with ``deepspeed.utils.safe_get_full_grad`` (a
collective over DP at stage 3, so every rank calls these functions together).
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.distributed as dist

from megatron_normformer.checkpoint.shards import full_tensor
from megatron_normformer.checkpoint.universal import MasterState
from megatron_normformer.model.layer import NormFormerLayer
from megatron_normformer.model.pipeline import counted_here
from megatron_normformer.parallel.layers import counted_on_tp_rank


def _grad(p: torch.Tensor, zero_stage: int):
    if zero_stage == 0:
        return p.grad
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def grad_norm(model, pstate, zero_stage: int, pipeline: bool = False) -> float:
    """Global L2 norm of the gradient, each TP-replicated parameter and a pipeline's tied
    embedding counted once. Collective over TP (and PP when ``pipeline``)."""
    total = torch.zeros(1, dtype=torch.float64)
    for name, p in model.named_parameters():
        g = _grad(p, zero_stage)
        if g is not None and counted_here(name, p, pstate):
            total += g.detach().double().pow(2).sum().cpu()
    for group, size in ((pstate.tp_group, pstate.tp_size), (pstate.pp_group, pstate.pp_size if pipeline else 1)):
        if size > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt().item()


def grad_zeros(model, pstate, zero_stage: int) -> int:
    """Number of zero entries of the gradient (``--log-num-zeros-in-grad``, Megatron's count),
    each TP-replicated parameter counted once. Collective over TP (and DP at ZeRO 1-3)."""
    total = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        g = _grad(p, zero_stage)
        if g is not None and counted_on_tp_rank(p, pstate.tp_rank):
            total += (g.detach() == 0).sum().cpu()
    if pstate.tp_size > 1:
        dist.all_reduce(total, group=pstate.tp_group)
    return int(total.item())


def params_norm(model, pstate, zero_stage: int, pipeline: bool) -> float:
    """Global L2 norm of the parameters (``--log-params-norm``), each TP-replicated parameter and
    the tied embedding of a pipeline counted once. Collective over TP, PP (and DP at ZeRO-3)."""
    total = torch.zeros(1, dtype=torch.float64)
    for name, p in model.named_parameters():
        if not counted_here(name, p, pstate):
            continue
        data = p.ds_tensor if zero_stage == 3 else p  # ZeRO-3: this rank's partition (zero-padded)
        total += data.detach().double().pow(2).sum().cpu()
    for group, size in ((pstate.tp_group, pstate.tp_size), (pstate.pp_group, pstate.pp_size),
                        (pstate.dp_group, pstate.dp_size if zero_stage == 3 else 1)):
        if size > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt().item()


def optimizer_state_norms(engine, model, pstate) -> Dict[str, float]:
    """``--log-optimizer-states-to-tensorboard`` (Megatron-DeepSpeed's): the L2 norm, L1 norm and
    largest magnitude of the fp32 master weights (``weight``) and of the optimizer's states: Adam's
    first moment (``momentum``), second moment (``variance``) and its square root
    (``variance_sqrt``), SGD's momentum buffer (``momentum``). Over the whole model in any layout:
    each rank reads the piece it owns (its ZeRO partition, or data-parallel rank 0 the replicated
    state, as the layout-independent checkpoint does), each TP-replicated parameter and the tied
    embedding once. Collective over the world."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = {"momentum": "momentum_buffer"} if isinstance(base, torch.optim.SGD) else \
        {"momentum": "exp_avg", "variance": "exp_avg_sq"}
    if not base.state:  # no step applied yet (fp16 overflows): no state to read
        moments = {}
    names = ["weight", *moments, *(["variance_sqrt"] if "variance" in moments else [])]
    sums = torch.zeros(2, len(names), dtype=torch.float64)  # squares, magnitudes
    largest = torch.zeros(len(names), dtype=torch.float64)
    masters = MasterState(engine, pstate)
    for name, p in model.named_parameters():
        if not counted_here(name, p, pstate):
            continue
        piece = masters.piece(p)
        if piece is None:
            continue
        get = piece[2]
        values = [get(None)] + [get(key) for key in moments.values()]
        if "variance" in moments:
            values.append(values[-1].clamp(min=0).sqrt())
        for i, v in enumerate(values):
            v = v.detach().double()
            sums[0, i] += v.pow(2).sum().cpu()
            sums[1, i] += v.abs().sum().cpu()
            if v.numel():
                largest[i] = torch.maximum(largest[i], v.abs().max().cpu())
    dist.all_reduce(sums)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    out = {}
    for i, n in enumerate(names):
        out.update({f"optimizer/{n}_l2": sums[0, i].sqrt().item(),
                    f"optimizer/{n}_l1": sums[1, i].item(), f"optimizer/{n}_abs_max": largest[i].item()})
    return out


def fc2_grad_mean_abs(model, pstate, zero_stage: int) -> Dict[str, float]:
    """Per layer, the mean absolute value of the fc2 weight's gradient over the whole (TP-gathered)
    matrix: the paper's "average L1 norm" (Fig. 3). One definition for the trainer's logs and
    ``tools/analyze_grad_norms.py``. Collective over TP (and DP at ZeRO-3)."""
    sums, sizes = [], []
    for layer in model.layers:
        weight = layer.mlp.fc2.weight
        g = _grad(weight, zero_stage)
        sums.append(torch.zeros((), dtype=torch.float64) if g is None
                    else g.detach().double().abs().sum().cpu())
        sizes.append(getattr(weight, "ds_numel", weight.numel()) * pstate.tp_size)
    stacked = torch.stack(sums)
    if pstate.tp_size > 1:
        dist.all_reduce(stacked, group=pstate.tp_group)
    return {f"normformer/fc2_grad_mean_abs/layer_{i}": (v / n).item()
            for i, (v, n) in enumerate(zip(stacked, sizes))}


def scale_parameters(model, pstate, zero_stage: int) -> Dict[str, torch.Tensor]:
    """Full (TP-gathered) HeadScale gamma, FFN-LN weight, post-attention-LN weight and ResScale
    lambda of every layer (Fig. 4). Collective over TP (and over DP at ZeRO-3)."""
    wanted = []
    # This pipeline stage's layers (all of them without pipelining), by global layer number.
    layers = [(m.layer_number, m) for m in model.modules() if isinstance(m, NormFormerLayer)]
    for i, layer in layers:
        for tag, p in (("head_scale", getattr(layer.attention, "head_scale", None)),
                       ("ffn_ln_weight", getattr(getattr(layer.mlp, "ffn_layernorm", None), "weight", None)),
                       ("post_attn_ln_weight", getattr(layer.post_attention_layernorm, "weight", None)),
                       ("resid_scale", layer.resid_scale)):
            if p is not None:
                wanted.append((f"normformer/{tag}/layer_{i}", p))
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in wanted], modifier_rank=None)
    out = {}
    with gather:
        for tag, p in wanted:
            out[tag] = full_tensor(p, p.detach().clone(), pstate.tp_group).cpu()
    if pstate.pp_size > 1:  # every stage's layers, for whichever rank writes the events
        stages = [None] * pstate.pp_size
        dist.all_gather_object(stages, out, group=pstate.pp_group)
        out = {k: v for stage in stages for k, v in stage.items()}
    return out
